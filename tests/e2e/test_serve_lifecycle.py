"""``vmigrate serve`` and ``vmigrate db`` as real processes on loopback, each with a data
directory of its own: serve stops the embedded PostgreSQL it started (not one it found
running, nor with --keep-db), a busy port is refused before anything starts, and
``db status | start | stop`` say and do what they should."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from app import pgserver

VMIGRATE = str(Path(sys.executable).parent / "vmigrate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Env:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.pgdata = data / "postgres"
        self.port = free_port()
        self.vars = {k: v for k, v in os.environ.items() if not k.startswith("VMIGRATE_")}
        self.vars.update(VMIGRATE_DATA_DIR=str(data), VMIGRATE_HOST="127.0.0.1",
                         VMIGRATE_PORT=str(self.port), VMIGRATE_LOG_FORMAT="json")
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VMIGRATE, *args], env=self.vars, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def serve(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.data.parent / f"serve-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([VMIGRATE, "serve", *args], env=self.vars, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code \
                        == 200:
                    return proc, log
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    def close(self) -> None:
        for proc in self.procs:  # only the processes this test started, by PID
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        pgserver.stop(self.pgdata)  # the server on this test's own data directory


@pytest.fixture
def env() -> Iterator[Env]:
    # Not under pytest's tmp_path: as root, PostgreSQL runs as another user, who must
    # traverse the path, and any pytest session starting meanwhile makes
    # /tmp/pytest-of-root private again.
    root = Path(tempfile.mkdtemp(prefix="vmigrate-serve-"))
    e = Env(root / "data")
    try:
        yield e
    finally:
        e.close()
        shutil.rmtree(root, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while psutil.pid_exists(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_serve_stops_the_database_it_started(env: Env) -> None:
    assert env.run("db", "status").returncode == 3  # nothing there yet
    proc, log = env.serve()
    running = pgserver.status(env.pgdata)
    assert running.running
    assert running.pid is not None
    assert psutil.pid_exists(running.pid)
    said = env.run("db", "status")
    assert said.returncode == 0
    assert said.stdout.startswith(f"running: pid {running.pid}")

    assert stop(proc) == 0, log.read_text()
    assert gone(running.pid), f"postmaster {running.pid} still runs"
    after = env.run("db", "status")
    assert after.returncode == 3
    assert after.stdout.startswith("stopped")
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert any(line["msg"].startswith("embedded PostgreSQL stopped") for line in lines)


def test_serve_leaves_a_database_it_did_not_start(env: Env) -> None:
    started = env.run("db", "start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("started: pid")
    pid = pgserver.status(env.pgdata).pid
    assert pid is not None
    assert env.run("db", "start").stdout.startswith("already running")

    proc, log = env.serve()
    assert stop(proc) == 0, log.read_text()
    assert pgserver.status(env.pgdata).pid == pid  # still the same server

    stopped = env.run("db", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("stopped")
    assert gone(pid)
    assert env.run("db", "stop").stdout.startswith("stopped: data")  # says it is not running


def test_keep_db_leaves_it_running(env: Env) -> None:
    side = free_port()
    proc, log = env.serve("--keep-db", "--no-worker", "--metrics-address", f"127.0.0.1:{side}")
    pid = pgserver.status(env.pgdata).pid
    assert pid is not None
    # the unauthenticated side listener shows the API's own counts (one registry)
    scrape = httpx.get(f"http://127.0.0.1:{side}/metrics", timeout=5).text
    assert 'vmigrate_http_requests_total{method="GET",route="/readyz",status="200"}' in scrape
    assert stop(proc) == 0, log.read_text()
    assert pgserver.status(env.pgdata).running
    assert "db stop" in log.read_text()  # tells how to stop it
    assert env.run("db", "stop").returncode == 0
    assert gone(pid)


def test_a_busy_port_is_refused_before_anything_starts(env: Env) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", env.port))
        taken.listen()
        began = time.monotonic()
        result = env.run("serve", timeout=60)
    assert result.returncode == 1
    assert f"127.0.0.1:{env.port} is already in use" in result.stderr
    assert time.monotonic() - began < 30
    # neither the database nor a worker was started
    assert not (env.pgdata / "PG_VERSION").exists()
    assert not pgserver.status(env.pgdata).running
    assert "worker" not in result.stderr
