"""The README's quick start, run as a reader runs it: every shell block of the section,
in order, against a started service.

- The first block starts the service (``scripts/serve`` with the settings it names), the
  second the webhook receiver: both are started here as processes on free loopback ports
  (the README says to change ``API`` and ``HOOKS`` when the ports differ, and that is
  all the test changes), on the test PostgreSQL (``VMIGRATE_DATABASE_URL``, which
  ``vmigrate tokens create`` gets too, as the README says it must).
- Every other block runs in one ``bash`` with ``set -euo pipefail``, real ``curl``,
  ``jq`` and ``qemu-img``, in a scratch directory that sees the checkout's ``.venv``.
  A refused request stops it (the README's ``curl --fail-with-body``).

It ends with a library image converted by the service's worker, downloaded, and
``qemu-img compare`` finding it identical to the uploaded disk; the receiver must have
printed the deliveries the README promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.db import Database
from app.models.db import Migration, MigrationEvent
from tests.readme_examples import Block, DocError, shell_blocks

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "Quick start"
#: The variables the README tells the reader to set to where the two processes listen.
ADDRESSES = ("API", "HOOKS")
START_TIMEOUT = 90.0
SCRIPT_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Started:
    """A process a block starts: its environment additions and its argv."""

    where: str
    env: dict[str, str]
    argv: list[str]


def started(block: Block, program: str) -> Started:
    """The one command of a block that starts ``program`` (``NAME=value ... program``)."""
    where = f"{README.name}:{block.line}"
    lines = [line for line in block.text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise DocError(f"{where}: expected one command starting {program}, got {lines}")
    words = shlex.split(lines[0], comments=True)
    env: dict[str, str] = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words or words[0] != program:
        raise DocError(f"{where}: expected {program}, got {lines[0]!r}")
    return Started(where, env, words)


def with_port(argv: list[str], port: int) -> list[str]:
    """``argv`` listening on ``port``: its ``--port N`` replaced, or one added."""
    if "--port" in argv:
        i = argv.index("--port")
        return [*argv[:i + 1], str(port), *argv[i + 2:]]
    return [*argv, "--port", str(port)]


def session_script(blocks: list[Block], addresses: dict[str, str]) -> str:
    """The blocks as one bash script; each ``NAME=...`` of ``addresses`` set to the
    test's value instead (each must be assigned exactly once in the README)."""
    seen: dict[str, int] = {}
    parts = ["set -euo pipefail"]
    for block in blocks:
        lines = []
        for line in block.text.splitlines():
            found = re.match(rf"^({'|'.join(addresses)})=\S+", line)
            if found:
                name = found.group(1)
                seen[name] = seen.get(name, 0) + 1
                line = f"{name}={shlex.quote(addresses[name])}  # README: {line}"
            lines.append(line)
        parts.append(f"echo '### {README.name}:{block.line}'")
        parts.append("\n".join(lines))
    if seen != dict.fromkeys(addresses, 1):
        raise DocError(f"{README.name}: the quick start must set each of {list(addresses)} "
                       f"once, found {seen}")
    return "\n".join(parts) + "\n"


@contextlib.asynccontextmanager
async def running(argv: list[str], env: dict[str, str], cwd: Path, log: Path
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process of ours, stopped (SIGTERM, then SIGKILL) by its PID at the end."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_ready(base: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"the service exited ({proc.returncode}):\n"
                                     f"{log.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/readyz")).status_code == 200:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not ready after {START_TIMEOUT:g} s:\n"
                                     f"{log.read_text(errors='replace')[-4000:]}")
            await asyncio.sleep(0.25)


async def wait_for_text(log: Path, wanted: list[str], timeout: float) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        text = log.read_text(errors="replace")
        if all(w in text for w in wanted) or asyncio.get_running_loop().time() > deadline:
            return text
        await asyncio.sleep(0.25)


async def test_the_quick_start_runs_as_written(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    blocks = shell_blocks(README, SECTION)
    assert len(blocks) >= 8, "the quick start lost its examples"
    serve, receiver = started(blocks[0], "scripts/serve"), started(
        blocks[1], "scripts/webhook-receiver")
    api_port, hooks_port = free_port(), free_port()
    addresses = {"API": f"http://127.0.0.1:{api_port}", "HOOKS": f"http://127.0.0.1:{hooks_port}"}
    script = session_script(blocks[2:], addresses)

    work = tmp_path / "work"  # the reader's checkout, without writing into ours
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "scripts").symlink_to(ROOT / "scripts")
    env = {**os.environ, "VMIGRATE_DATABASE_URL": database_url,
           "VMIGRATE_DATA_DIR": str(tmp_path / "data"), "VMIGRATE_WORKER_POLL_SECONDS": "0.2"}
    env.pop("VMIGRATE_ENCRYPTION_KEYS", None)
    serve_log, receiver_log = tmp_path / "serve.log", tmp_path / "receiver.log"

    async with (
        running(with_port(serve.argv, api_port), {**env, **serve.env}, ROOT, serve_log)
        as service,
        running(with_port(receiver.argv, hooks_port), env, ROOT, receiver_log),
    ):
        await wait_ready(addresses["API"], service, serve_log)
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", script, cwd=work, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(shell.communicate(), SCRIPT_TIMEOUT)
        except TimeoutError:
            shell.kill()
            output, _ = await shell.communicate()
            raise AssertionError(f"the quick start did not finish in {SCRIPT_TIMEOUT:g} s:\n"
                                 f"{output.decode(errors='replace')}") from None
        shown = output.decode(errors="replace")
        (tmp_path / "session.log").write_text(shown)  # kept by pytest's tmp_path for a look
        assert shell.returncode == 0, (
            f"the quick start stopped ({shell.returncode}) after the block marked last:\n"
            f"{shown}\n--- service log (tail) ---\n"
            f"{serve_log.read_text(errors='replace')[-4000:]}")
        deliveries = await wait_for_text(
            receiver_log, ["image.created", "migration.completed"], timeout=30)

    # What the README says happened, happened.
    assert "Images are identical." in shown
    assert qemu_identical(work / "disk.raw", work / "disk.qcow2")
    types = re.findall(r"^msg_\w+ (\S+) ", deliveries, flags=re.MULTILINE)
    assert types.count("image.created") == 2, deliveries  # the upload, the conversion
    assert "migration.completed" in types, deliveries
    async with db.session() as session:
        left = (await session.execute(select(Migration.type))).scalars().all()
        deleted = (await session.execute(select(MigrationEvent.seq).where(
            MigrationEvent.type == "migration.deleted"))).scalars().all()
    assert left == ["conversion"]  # the README's migration was cancelled, then deleted
    assert deleted == [0]


def qemu_identical(a: Path, b: Path) -> bool:
    import subprocess

    proc = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True,
                          check=False, timeout=60)
    return proc.returncode == 0


def test_the_session_script_sets_the_addresses_once() -> None:
    blocks = shell_blocks(README, SECTION)
    script = session_script(blocks[2:], {"API": "http://127.0.0.1:1", "HOOKS": "http://h:2"})
    assert "API=http://127.0.0.1:1  # README: API=http://127.0.0.1:8080" in script
    with pytest.raises(DocError, match="must set each of"):
        session_script(blocks[3:], {"API": "x", "HOOKS": "y"})
