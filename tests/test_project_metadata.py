"""pyproject.toml as packaging tools read it today."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_license_is_an_spdx_expression_with_a_backend_that_reads_it() -> None:
    # A `license = { text = ... }` table is deprecated (PEP 639); setuptools warns on
    # every build. The string form needs setuptools 77 or newer.
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    (requirement,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    found = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", requirement)
    assert found is not None
    assert int(found.group(1)) >= 77


def test_the_slow_marker_is_declared() -> None:
    markers = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


class _Item:
    """What the marking hook reads of a collected test."""

    def __init__(self, *fixtures: str) -> None:
        self.fixturenames = list(fixtures)
        self.markers: list[str] = []

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.markers.append(marker.name)


def test_tests_that_boot_a_guest_or_the_simulator_are_slow() -> None:
    from tests import conftest

    guest, simulator, plain = _Item("lvm_guest", "tmp_path"), _Item("vcsim"), _Item("db")
    items: list[Any] = [guest, simulator, plain]
    conftest.pytest_collection_modifyitems(cast(pytest.Config, None), items)
    assert (guest.markers, simulator.markers, plain.markers) == (["slow"], ["slow"], [])
