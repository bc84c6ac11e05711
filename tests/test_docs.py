"""The README's configuration table is the one generated from the settings class, and
``vmigrate config`` (which generates it) does what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import (
    SETTINGS_END,
    SETTINGS_START,
    WHAT_WORKS_END,
    WHAT_WORKS_START,
    between,
    main,
    replace_between,
)
from app.config import Settings, env_var, settings_markdown
from app.drivers.registry import what_works

README = Path(__file__).resolve().parent.parent / "README.md"
REGENERATE = ".venv/bin/vmigrate config --markdown --readme README.md"


def test_readme_settings_table_is_the_generated_one() -> None:
    documented = between(README.read_text(), SETTINGS_START, SETTINGS_END)
    assert documented == settings_markdown(), (
        f"README.md's settings table differs from app/config.py; regenerate it: {REGENERATE}")


def test_every_setting_is_documented_once() -> None:
    text = README.read_text()
    for name in Settings.model_fields:
        var = env_var(name)
        rows = [line for line in text.splitlines() if line.startswith(f"| `{var}`")]
        assert len(rows) == 1, f"{var}: {len(rows)} table rows in README.md, expected one"
    rows = [line for line in text.splitlines() if line.startswith("| `VMIGRATE_")]
    assert len(rows) == len(Settings.model_fields), "a README row names no setting"


def test_every_setting_has_a_description() -> None:
    bare = [name for name, field in Settings.model_fields.items()
            if not (field.description or "").strip()]
    assert bare == [], f"give these a Field(description=...) in app/config.py: {bare}"


def test_the_table_rows() -> None:
    lines = settings_markdown().splitlines()
    assert lines[:2] == ["| env var | default | description |", "|---|---|---|"]
    assert len(lines) == 2 + len(Settings.model_fields)
    by_var = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    assert by_var["`VMIGRATE_PORT`"].startswith("| `VMIGRATE_PORT` | `8080` | Port ")
    assert by_var["`VMIGRATE_DATABASE_URL`"].startswith("| `VMIGRATE_DATABASE_URL` | unset |")
    assert " | unset | " in by_var["`VMIGRATE_ENCRYPTION_KEYS`"]  # an empty list
    assert " | `30` | " in by_var["`VMIGRATE_WORKER_LEASE_SECONDS`"]  # 30.0, as one writes it
    assert " | `2199023255552` | " in by_var["`VMIGRATE_MAX_IMAGE_BYTES`"]
    for line in lines:  # three cells each: a "|" inside a cell is escaped
        assert len(re.split(r"(?<!\\)\|", line)) == 5, line


def test_a_field_without_a_description_is_refused() -> None:
    class Bare(Settings):
        undocumented: int = 1

    with pytest.raises(ValueError, match=r"Bare\.undocumented has no Field\(description"):
        settings_markdown(Bare)


def test_config_markdown_rewrites_only_the_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{SETTINGS_START}\n| stale |\n{SETTINGS_END}\n\nafter\n")
    result = CliRunner().invoke(main, ["config", "--markdown", "--readme", str(readme)])
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert text.startswith(f"# title\n\n{SETTINGS_START}\n| env var |")
    assert text.endswith(f"{SETTINGS_END}\n\nafter\n")
    assert "stale" not in text
    assert between(text, SETTINGS_START, SETTINGS_END) == settings_markdown()
    again = CliRunner().invoke(main, ["config", "--markdown", "--readme", str(readme)])
    assert again.exit_code == 0
    assert readme.read_text() == text


def test_config_markdown_needs_both_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"{SETTINGS_START}\nno end marker\n")
    result = CliRunner().invoke(main, ["config", "--markdown", "--readme", str(readme)])
    assert result.exit_code != 0
    assert SETTINGS_END in result.output
    assert readme.read_text() == f"{SETTINGS_START}\nno end marker\n"


def test_markers_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="comes before"):
        replace_between(f"{SETTINGS_END}\n{SETTINGS_START}\n", SETTINGS_START, SETTINGS_END,
                        "x\n")


def test_config_prints_the_values_in_effect_with_secrets_masked() -> None:
    key = "q" * 43 + "="
    result = CliRunner().invoke(main, ["config"], env={
        "VMIGRATE_PORT": "9000", "VMIGRATE_ENCRYPTION_KEYS": f"{key},{key}",
        "VMIGRATE_DATABASE_URL": "postgresql+asyncpg://u:hunter2@db/v"})
    assert result.exit_code == 0, result.output
    values = dict(line.split(maxsplit=1) for line in result.output.splitlines())
    assert set(values) == {env_var(name) for name in Settings.model_fields}
    assert values["VMIGRATE_PORT"] == "9000"
    assert values["VMIGRATE_ENCRYPTION_KEYS"] == "(secret),(secret)"
    assert values["VMIGRATE_DATABASE_URL"] == "(secret)"
    assert key not in result.output
    assert "hunter2" not in result.output


def test_readme_names_every_format_convert_writes() -> None:
    from app.formats.base import FORMATS
    from app.formats.registry import format_module

    text = " ".join(README.read_text().split())
    writes = re.search(r"`convert` reads (.*?), and writes (.*?); no database needed", text)
    assert writes is not None, "the README's sentence on what `vmigrate convert` does is gone"
    for fmt in FORMATS:
        assert hasattr(format_module(fmt), "create_writer")
        assert re.search(rf"\b{fmt}\b", writes.group(2)), f"README: convert also writes {fmt}"
        assert re.search(rf"\b{fmt}\b", writes.group(1)), f"README: convert also reads {fmt}"
    assert f"all {('', 'one', 'two', 'three', 'four', 'five', 'six')[len(FORMATS)]}:" in (
        writes.group(2))


def test_readme_what_works_table_is_derived_from_the_registry() -> None:
    inner = between(README.read_text(), WHAT_WORKS_START, WHAT_WORKS_END)
    assert inner == what_works().markdown(), (
        "README.md's What works table is stale; regenerate it with "
        "`.venv/bin/vmigrate platforms --readme README.md`")
    # The table says what the API accepts: a kind marked as a hypervisor source is one.
    assert "| vmware | VMware vSphere | yes | yes |" in inner
    assert "| openstack | no driver yet |" in inner


def test_platforms_prints_the_table_and_rewrites_only_its_section(tmp_path: Path) -> None:
    printed = CliRunner().invoke(main, ["platforms"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == what_works().markdown()
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{WHAT_WORKS_START}\nold\n{WHAT_WORKS_END}\noutro\n")
    result = CliRunner().invoke(main, ["platforms", "--readme", str(doc)])
    assert result.exit_code == 0, result.output
    assert doc.read_text() == (
        f"intro\n{WHAT_WORKS_START}\n{what_works().markdown()}{WHAT_WORKS_END}\noutro\n")
