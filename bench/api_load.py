"""Benchmark: the API under an open-loop load, as a user would run it.

Not a test. Starts a fresh ``vmigrate serve --workers N`` on loopback with its own data
directory (so an embedded PostgreSQL of its own), makes a token and a cloud, seeds
``--seed`` migrations for one tenant through ``POST /v1/migrations/batch``, then offers
``--rate`` requests per second for ``--duration`` seconds, open loop: request *i* is
due at ``start + i / rate`` whether or not earlier ones were answered, and its latency
is measured from when it was due (a late generator counts against the server, never
for it). The mix, in turn: create (``run: false``), list (``limit=50``, following
``next_cursor`` of earlier pages half of the time) and get by id (a seeded migration).
Then ``--overload-rate`` requests per second for ``--overload-duration`` seconds, to see
how the server refuses what it cannot take (503 with ``Retry-After``) and that no
request waits longer than a second for an answer.

Prints, per phase and operation: count, p50, p99, max (ms), errors (anything but the
expected status, a 503 counted apart, timeouts after ``--timeout`` s), the achieved rate,
the RSS of the server's processes and of PostgreSQL's, and the load average. Everything
it starts (the server, then the PostgreSQL the server started in the bench's directory)
is stopped by PID at the end; the directory is removed.

    .venv/bin/python -m bench.api_load [--seed 100000] [--rate 200] [--duration 60]
        [--overload-rate 1000] [--overload-duration 10] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

BATCH = 500
SEED_CONCURRENCY = 2
SEED_ATTEMPTS = 20
#: Most requests the generator keeps outstanding; past it a due request is counted as
#: "not sent" (the generator, not the server, is the limit then).
MAX_OUTSTANDING = 4000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def migration_body(cloud_id: str, n: int) -> dict[str, Any]:
    return {
        "type": "hypervisor", "name": f"bench-{n}", "mode": "store", "platform": "linux",
        "source": {"cloud_id": cloud_id, "server": {"name": f"vm-{n % 5000}"},
                   "host": f"esx{n % 40}.example.com", "username": "administrator@vsphere.local",
                   "password": "bench-Secret-1"},
    }


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)


@dataclass
class Stats:
    #: Seconds from due to answered, for the expected status ...
    latencies: list[float] = field(default_factory=list)
    #: ... and for 503 + Retry-After answers (overload refusals).
    refusals: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def row(self) -> dict[str, Any]:
        answers = self.latencies + self.refusals
        return {"ok": len(self.latencies), "p50_ms": _pct(self.latencies, 0.50),
                "p99_ms": _pct(self.latencies, 0.99),
                "max_ms": _pct(self.latencies, 1.0),
                "overloaded_503": len(self.refusals),
                "p99_503_ms": _pct(self.refusals, 0.99),
                "longest_wait_for_any_answer_ms": _pct(answers, 1.0),
                "errors": dict(self.errors)}


class Server:
    """``vmigrate serve --workers N`` in a directory of its own."""

    def __init__(self, workers: int, root: Path) -> None:
        self.port = free_port()
        self.root = root
        self.env = {**os.environ, "VMIGRATE_DATA_DIR": str(root / "data"),
                    "VMIGRATE_LOG_LEVEL": "WARNING"}
        self.env.pop("VMIGRATE_DATABASE_URL", None)
        vmigrate = str(Path(sys.executable).with_name("vmigrate"))
        self.log = (root / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [vmigrate, "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(workers)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        vmigrate = str(Path(sys.executable).with_name("vmigrate"))
        out = subprocess.run(
            [vmigrate, "tokens", "create", "--tenant", "bench",
             "--scopes", "migrations:write,clouds:write"],
            env=self.env, check=True, capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1]

    def postmaster(self) -> psutil.Process | None:
        pid_file = self.root / "data" / "postgres" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            return psutil.Process(int(pid_file.read_text().split()[0]))
        return None

    def rss_mib(self) -> dict[str, float]:
        def tree(p: psutil.Process | None) -> float:
            if p is None:
                return 0.0
            total = 0
            for q in [p, *p.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += q.memory_info().rss
            return round(total / 2**20, 1)
        with contextlib.suppress(psutil.Error):
            return {"server_rss_mib": tree(psutil.Process(self.proc.pid)),
                    "postgres_rss_mib": tree(self.postmaster())}
        return {}

    def cpu_seconds(self) -> float:
        total = 0.0
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.proc.pid)
            for q in [parent, *parent.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = q.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self) -> None:
        postmaster = self.postmaster()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The embedded PostgreSQL outlives `serve` by design; this one is ours alone.
        if postmaster is not None:
            with contextlib.suppress(psutil.Error):
                postmaster.send_signal(signal.SIGINT)  # fast shutdown
                postmaster.wait(60)
        self.log.close()


async def wait_ready(http: aiohttp.ClientSession, url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(url + "/healthz") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.5)
    raise SystemExit("the server did not become ready")


async def seed(http: aiohttp.ClientSession, url: str, headers: dict[str, str],
               cloud_id: str, count: int) -> tuple[list[str], float, int]:
    ids: list[str] = []
    refused = [0]
    started = time.monotonic()
    todo = collections.deque(range(0, count, BATCH))

    async def loader() -> None:
        while todo:
            first = todo.popleft()
            items = [migration_body(cloud_id, n) for n in range(first, min(count, first + BATCH))]
            for _attempt in range(SEED_ATTEMPTS):  # a 503 says when to try again
                async with http.post(url + "/v1/migrations/batch", json={"items": items},
                                     headers=headers) as r:
                    if r.status == 503 and "retry-after" in r.headers:
                        refused[0] += 1
                        await asyncio.sleep(float(r.headers["retry-after"]))
                        continue
                    if r.status != 201:
                        raise SystemExit(f"seeding failed: {r.status} {await r.text()}")
                    ids.extend(m["id"] for m in (await r.json())["items"])
                    break
            else:
                raise SystemExit(f"seeding failed: overloaded {SEED_ATTEMPTS} times in a row")

    await asyncio.gather(*(loader() for _ in range(SEED_CONCURRENCY)))
    return ids, time.monotonic() - started, refused[0]


async def offer(http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                cloud_id: str, ids: list[str], rate: float, duration: float,
                timeout_s: float) -> dict[str, Any]:
    """Open loop: request i is due at start + i/rate; latency counts from then."""
    stats = {op: Stats() for op in ("create", "list", "get")}
    expected = {"create": 201, "list": 200, "get": 200}
    cursors: collections.deque[str] = collections.deque(maxlen=200)
    total = int(rate * duration)
    not_sent = 0
    lag: list[float] = []
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(i: int, due: float) -> None:
        op = ("create", "list", "get")[i % 3]
        s = stats[op]
        try:
            if op == "create":
                req = http.post(url + "/v1/migrations", json=migration_body(cloud_id, 10**7 + i),
                                headers=headers, timeout=client_timeout)
            elif op == "list":
                params = {"limit": "50"}
                if i % 2 and cursors:
                    params["cursor"] = cursors.popleft()
                req = http.get(url + "/v1/migrations", params=params, headers=headers,
                               timeout=client_timeout)
            else:
                req = http.get(f"{url}/v1/migrations/{ids[(i * 7919) % len(ids)]}",
                               headers=headers, timeout=client_timeout)
            async with req as r:
                body = await r.read()
                elapsed = time.monotonic() - due
                if r.status == expected[op]:
                    s.latencies.append(elapsed)
                    if op == "list":
                        nxt = json.loads(body).get("next_cursor")
                        if nxt:
                            cursors.append(nxt)
                elif r.status == 503 and "retry-after" in r.headers:
                    s.refusals.append(elapsed)  # an answer, and how long it took
                else:
                    s.errors[f"http {r.status}"] += 1
        except TimeoutError:
            s.errors["timeout"] += 1
        except aiohttp.ClientError as exc:
            s.errors[type(exc).__name__] += 1

    tasks: set[asyncio.Task[None]] = set()
    load0 = os.getloadavg()
    start = time.monotonic() + 0.2
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(time.monotonic() - due)
        if len(tasks) >= MAX_OUTSTANDING:
            not_sent += 1
            continue
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_by = time.monotonic()
    if tasks:
        await asyncio.wait(tasks)
    elapsed = time.monotonic() - start
    answered = sum(len(s.latencies) + len(s.refusals) for s in stats.values())
    lag.sort()
    return {
        "offered_per_s": rate, "duration_s": duration,
        "achieved_answers_per_s": round(answered / elapsed, 1),
        "send_rate_per_s": round((total - not_sent) / (sent_by - start), 1),
        "generator_lag_p99_ms": round(lag[int(0.99 * (len(lag) - 1))] * 1000, 1) if lag else 0,
        "not_sent": not_sent,
        "load_avg_1m_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        **{op: s.row() for op, s in stats.items()},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="vmigrate-bench-api-"))
    server = Server(args.workers, root)
    result: dict[str, Any] = {"workers": args.workers, "cpus": os.cpu_count(),
                              "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        connector = aiohttp.TCPConnector(limit=MAX_OUTSTANDING, limit_per_host=MAX_OUTSTANDING)
        async with aiohttp.ClientSession(connector=connector) as http:
            await wait_ready(http, server.url, time.monotonic() + 180)
            token = await asyncio.to_thread(server.token)
            headers = {"Authorization": f"Bearer {token}"}
            cloud = {"name": "bench-vc", "kind": "vmware",
                     "settings": {"host": "vcenter.example.com", "datacenter": "DC1"},
                     "credentials": {"username": "administrator@vsphere.local",
                                     "password": "bench-Secret-1"}}
            async with http.post(server.url + "/v1/clouds", json=cloud, headers=headers) as r:
                if r.status != 201:
                    raise SystemExit(f"cloud: {r.status} {await r.text()}")
                cloud_id = (await r.json())["id"]
            ids, took, refused = await seed(http, server.url, headers, cloud_id, args.seed)
            result["seed"] = {"migrations": len(ids), "seconds": round(took, 1),
                              "per_s": round(len(ids) / took, 1),
                              "batches_refused_503_and_retried": refused}
            print(json.dumps({"seed": result["seed"]}), flush=True)
            await asyncio.sleep(2)  # let autovacuum/analyze see the new rows
            cpu0 = server.cpu_seconds()
            result["steady"] = await offer(http, server.url, headers, cloud_id, ids,
                                           args.rate, args.duration, args.timeout)
            result["steady"]["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 1)
            result["steady"].update(server.rss_mib())
            print(json.dumps({"steady": result["steady"]}), flush=True)
            if args.overload_rate:
                cpu0 = server.cpu_seconds()
                result["overload"] = await offer(http, server.url, headers, cloud_id, ids,
                                                 args.overload_rate, args.overload_duration,
                                                 args.timeout)
                result["overload"]["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 1)
                result["overload"].update(server.rss_mib())
                print(json.dumps({"overload": result["overload"]}), flush=True)
    finally:
        server.stop()
        if args.server_log:
            shutil.copy(root / "server.log", args.server_log)
        shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--overload-rate", type=float, default=1000.0)
    parser.add_argument("--overload-duration", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2, help="API processes")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--server-log", type=Path, help="Keep the server's output here.")
    args = parser.parse_args()
    if not (0 < args.seed <= 1_000_000 and 0 < args.rate <= 5000
            and 0 < args.duration <= 600 and 0 <= args.overload_rate <= 5000
            and 0 < args.overload_duration <= 120):
        parser.error("out of the bench's bounds (seed <= 1e6, rates <= 5000/s, "
                     "durations <= 600 s / 120 s)")
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
