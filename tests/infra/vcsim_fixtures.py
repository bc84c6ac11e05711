"""pytest fixture ``vcsim``: one simulated vCenter per test session (see ``vcsim.py``).

Register it once, e.g. in ``tests/conftest.py``::

    pytest_plugins = ["tests.infra.vcsim_fixtures"]

Without ``go`` / Debian's govmomi sources the fixture skips locally and fails under CI
(``CI`` set), so a machine that misses ``apt-get install golang-go
golang-github-vmware-govmomi-dev`` cannot pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.infra.vcsim import Vcsim, missing_prerequisites, running_vcsim


def require(what: str, missing: list[str]) -> None:
    """Skip (locally) or fail (under CI) when prerequisites are missing."""
    if not missing:
        return
    message = f"{what} needs: " + ", ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def vcsim() -> Iterator[Vcsim]:
    """A running vcsim on 127.0.0.1 over TLS (test CA in ``vcsim.ca_bundle``).

    Shared by the whole session: tests must not depend on each other's changes (use
    distinct VMs, or create what you change). Inventory: ``VcsimOptions()`` defaults.
    """
    require("vcsim", missing_prerequisites())
    with running_vcsim() as sim:
        yield sim
