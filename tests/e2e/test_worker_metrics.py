"""``vmigrate worker --metrics-address``: a worker process (which has no API) serves its
own metrics on the address given, and refuses a taken one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

VMIGRATE = str(Path(sys.executable).parent / "vmigrate")


def _env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMIGRATE_")}
    env.update(VMIGRATE_DATABASE_URL=database_url, VMIGRATE_LOG_FORMAT="json",
               VMIGRATE_DATA_DIR=tempfile.mkdtemp(prefix="vmigrate-worker-"))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_worker_serves_its_metrics(database_url: str, tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([VMIGRATE, "worker", "--metrics-address", f"127.0.0.1:{port}"],
                                env=_env(database_url), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                if r.status_code == 200 and "worker" in log.read_text():
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "vmigrate_worker_leases_held 0.0" in r.text
        assert "# TYPE vmigrate_migrations_finished_total counter" in r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    with socket.socket() as s:  # the listener went with the process
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_taken_metrics_address_is_refused(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([VMIGRATE, "worker", "--metrics-address", f"127.0.0.1:{port}"],
                                env=_env(database_url), capture_output=True, text=True,
                                timeout=60, check=False)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    bad = subprocess.run([VMIGRATE, "worker", "--metrics-address", "nope"],
                         env=_env(database_url), capture_output=True, text=True, timeout=60,
                         check=False)
    assert bad.returncode == 2
    assert "HOST:PORT" in bad.stderr
