"""``convert`` and ``info`` as a user runs them: CliRunner in-process, and one
subprocess run through ``python -m app.commands.images``. qemu-img is the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from app.commands.images import images_commands, main, parse_size, progress_line
from app.dataplane import stages as stages_module
from app.dataplane.core import TransferProgress
from app.formats.base import Extent, MiB
from app.formats.digest import digest_file
from tests.formats.oracle import make_sparse_raw, qemu_img, random_layout

pytestmark = pytest.mark.timeout(120)

SIZE = 24 * MiB + 64 * 1024
LAYOUT = [(0, 4096), *random_layout(SIZE, 12, MiB + 1000, seed=3), (SIZE - 777, 777)]
QEMU_FMT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "disk.raw"
    make_sparse_raw(path, SIZE, LAYOUT, seed=4)
    return path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_same_disk(raw: Path, image: Path, fmt: str) -> None:
    proc = qemu_img("compare", "-f", "raw", "-F", QEMU_FMT[fmt], raw, image, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def assert_one_line_error(result: Result, code: int) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("vmigrate: error: ")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def test_commands_are_exported() -> None:
    assert [c.name for c in images_commands] == ["convert", "info"]


@pytest.mark.parametrize(
    ("fmt", "extra"),
    [
        ("raw", []),
        ("qcow2", []),
        ("qcow2", ["--compress", "--cluster-size", "64K"]),
        ("qcow2", ["--subformat", "v2"]),
        ("vmdk", ["--subformat", "streamOptimized"]),
        ("vhd", ["--subformat", "fixed"]),
        ("vhd", ["--subformat", "dynamic"]),
        ("vhdx", []),
    ],
)
def test_convert_round_trip(source: Path, tmp_path: Path, fmt: str, extra: list[str]) -> None:
    image = tmp_path / f"disk.{fmt}"
    result = run("convert", source, image, "--to", fmt, *extra, "--digest")
    assert result.exit_code == 0, result.output
    expected = digest_file(source)
    assert result.output.strip() == expected  # no progress output: not a TTY
    assert_same_disk(source, image, fmt)
    if fmt in ("qcow2", "vmdk", "vhdx"):  # qemu-img cannot check vpc
        qemu_img("check", "-f", QEMU_FMT[fmt], image)
    back = tmp_path / "back.raw"
    result = run("convert", image, back, "--to", "raw", "--digest")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected
    assert digest_file(back) == expected
    assert leftovers(tmp_path) == []


def test_convert_reads_what_qemu_img_wrote(source: Path, tmp_path: Path) -> None:
    """qemu-img writes, we read: every format including VHDX (read-only for us)."""
    expected = digest_file(source)
    for fmt in ("qcow2", "vmdk", "vhd", "vhdx"):
        image = tmp_path / f"q.{fmt}"
        opts = ["-o", "force_size=on"] if fmt == "vhd" else []  # else CHS rounding
        qemu_img("convert", "-f", "raw", "-O", QEMU_FMT[fmt], *opts, source, image)
        out = tmp_path / f"{fmt}.raw"
        result = run("convert", image, out, "--to", "raw", "--digest")
        assert result.exit_code == 0, result.output
        assert result.output.strip() == expected, fmt
        info = json.loads(run("info", image, "--json").output)
        assert info["format"] == fmt
        assert info["virtual_size"] == SIZE


def test_info_json_and_digest(source: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", source, image)
    result = run("info", image, "--json", "--digest")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "qcow2"
    assert info["subformat"] == "v3"
    assert info["virtual_size"] == SIZE
    assert info["cluster_size"] == 65536
    assert info["allocated_ranges"] >= 1
    assert 0 < info["allocated_bytes"] <= SIZE
    assert info["digest"] == digest_file(source)
    text = run("info", image).output
    assert "format: qcow2 (v3)" in text
    assert f"({SIZE} bytes)" in text
    assert "digest: " not in text


def test_info_json_ends_with_a_newline_from_the_real_command(source: Path) -> None:
    # The installed `vmigrate` ends without the interpreter's teardown (app.cli.run):
    # the JSON must still end its last line, so a shell prompt does not follow it.
    vmigrate = Path(sys.executable).with_name("vmigrate")
    proc = subprocess.run([str(vmigrate), "info", str(source), "--json"],
                          capture_output=True, check=True, timeout=60)
    assert proc.stdout.endswith(b"}\n")
    assert json.loads(proc.stdout)["format"] == "raw"


def test_info_of_a_raw_file_counts_its_data_ranges(source: Path) -> None:
    info = json.loads(run("info", source, "--json").output)
    assert info["format"] == "raw"
    assert info["virtual_size"] == SIZE
    assert info["allocated_ranges"] >= 1


def test_sync_makes_the_output_durable(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "o.raw"
    assert run("convert", source, out, "--to", "raw").exit_code == 0
    assert synced == []  # like qemu-img convert: the page cache, no fsync
    out.unlink()
    assert run("convert", source, out, "--to", "raw", "--sync").exit_code == 0
    assert len(synced) == 2  # the file, then its directory after the rename
    assert_same_disk(source, out, "raw")


def test_throttle_and_progress_options(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.qcow2"
    result = run("convert", source, out, "--to", "qcow2", "--throttle", "10G", "--progress")
    assert result.exit_code == 0, result.output
    assert "\r" in result.output
    assert "100.0%" in result.output
    assert_same_disk(source, out, "qcow2")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--to", "qcow2", "--subformat", "v9"], 2),
        (["--to", "vmdk", "--subformat", "monolithicFlat"], 2),
        (["--to", "qcow2", "--from", "qcow2"], 2),  # declared format disagrees
        (["--to", "qcow2", "--throttle", "fast"], 2),  # usage error
    ],
)
def test_errors_are_one_line_and_leave_nothing(
    source: Path, tmp_path: Path, args: list[str], code: int
) -> None:
    out = tmp_path / "out.img"
    result = run("convert", source, out, *args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_missing_input_and_bad_output_directory(source: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("convert", tmp_path / "nope.raw", tmp_path / "o", "--to", "raw"), 2)
    assert_one_line_error(run("convert", source, tmp_path / "no" / "dir" / "o", "--to", "raw"), 2)
    assert_one_line_error(run("info", tmp_path / "nope.qcow2"), 2)


def test_a_corrupt_image_is_exit_2(source: Path, tmp_path: Path) -> None:
    image = tmp_path / "bad.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", source, image)
    with open(image, "r+b") as f:
        f.truncate(3 * 65536)  # header and tables survive, data clusters are gone
    out = tmp_path / "out.raw"
    result = run("convert", image, out, "--to", "raw")
    assert_one_line_error(result, 2)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_a_failure_midway_keeps_the_old_output_and_removes_the_partial(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"previous content")
    partial_seen: list[str] = []
    original = stages_module.ZeroDetect.process

    async def failing(self: stages_module.ZeroDetect, extent: Extent) -> AsyncIterator[Extent]:
        if extent.offset >= SIZE // 2:
            partial_seen.extend(leftovers(tmp_path))
            raise OSError(5, "Input/output error")
        async for ext in original(self, extent):
            yield ext

    monkeypatch.setattr(stages_module.ZeroDetect, "process", failing)
    fds = len(os.listdir("/proc/self/fd"))
    result = run("convert", source, out, "--to", "qcow2")
    assert_one_line_error(result, 1)
    assert "zero-detect" in result.output
    assert "Input/output error" in result.output
    assert partial_seen  # the output was being written to a temporary file...
    assert leftovers(tmp_path) == []  # ...which is gone
    assert out.read_bytes() == b"previous content"
    assert len(os.listdir("/proc/self/fd")) == fds  # no file left open


def test_python_dash_m_runs_quietly(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.vhd"
    command = ["convert", str(source), str(out), "--to", "vhd"]
    proc = subprocess.run(
        [sys.executable, "-m", "app.commands.images", *command],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""
    assert_same_disk(source, out, "vhd")
    bad = subprocess.run(
        [sys.executable, "-m", "app.commands.images", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("vmigrate: error: ")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("65536", 65536),
        ("64K", 65536),
        ("64k", 65536),
        ("64KiB", 65536),
        ("10M", 10 * MiB),
        ("10MB/s", 10 * MiB),
        ("1.5M", 3 * MiB // 2),
        ("2G", 2 << 30),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "fast", "-1", "0", "10X", "1..2M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_progress_line() -> None:
    line = progress_line(TransferProgress(MiB, 4 * MiB, 2.0 * MiB, 0))
    assert line.startswith(" 25.0%")
    assert "1.0 MiB / 4.0 MiB" in line
    assert "2.0 MiB/s" in line
    assert progress_line(TransferProgress(MiB, None, 0.0, 0)) == "1.0 MiB  0 B/s"
