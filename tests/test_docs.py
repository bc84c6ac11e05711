"""The README's configuration table names every setting the service reads."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented() -> None:
    text = README.read_text()
    missing = [f"VMIGRATE_{name.upper()}" for name in Settings.model_fields
               if f"`VMIGRATE_{name.upper()}`" not in text]
    assert missing == [], f"add these to the README's configuration table: {missing}"
