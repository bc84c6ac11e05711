"""``vmigrate serve --workers 2`` as a real process tree: two API processes under
uvicorn's process manager on one socket, one ``vmigrate worker`` process beside them;
the API answers; SIGTERM stops all of them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import TokenFactory, auth


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    children: list[psutil.Process] = psutil.Process(proc.pid).children(recursive=True)
    return children


async def test_serve_with_workers_runs_api_and_worker_processes(
    worker_env: dict[str, str], make_token: TokenFactory, tmp_path: Path
) -> None:
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--workers", "2"],
        env={**worker_env, "VMIGRATE_SERVE_WORKER_PROCESSES": "1"},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        token = await make_token("acme", "migrations:write")
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 120
            ready = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    ready = False
                if ready:
                    break
                await asyncio.sleep(0.2)
            assert ready, (tmp_path / "serve.log").read_text()[-2000:]
            for _ in range(20):
                r = await client.get("/v1/migrations", headers=auth(token))
                assert r.status_code == 200, r.text
        commands = [" ".join(c.cmdline()) for c in _children(proc)]
        workers = [c for c in commands if c.endswith("app.cli worker")]
        api = [c for c in commands if "multiprocessing.spawn" in c]
        assert len(workers) == 1, commands
        assert len(api) == 2, commands
        children = _children(proc)
        proc.terminate()
        assert proc.wait(timeout=90) == 0
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
    finally:
        if proc.poll() is None:  # only what this test started, by PID
            for child in _children(proc):
                child.kill()
            proc.kill()
            proc.wait(timeout=10)
        log.close()
