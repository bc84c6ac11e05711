"""Fixtures of the end-to-end tests: ``vmigrate worker`` processes started by a test."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.config import Settings


@pytest.fixture
def worker_env(settings: Settings, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMIGRATE_")}
    env.update({
        "VMIGRATE_DATABASE_URL": database_url,
        "VMIGRATE_DATA_DIR": str(settings.data_dir),
        "VMIGRATE_ENCRYPTION_KEYS": ",".join(
            k.get_secret_value() for k in settings.encryption_keys),
        "VMIGRATE_WORKER_LEASE_SECONDS": "3",
        "VMIGRATE_WORKER_HEARTBEAT_SECONDS": "0.5",
        "VMIGRATE_WORKER_POLL_SECONDS": "0.1",
        "VMIGRATE_LOG_LEVEL": "WARNING",
    })
    return env


@pytest.fixture
def spawn(worker_env: dict[str, str], tmp_path: Path
          ) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=worker_env,
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:  # only what this test started, by PID
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
