"""Benchmark: the live stream's data path against ``dd | ssh dd``.

Not a test. Starts two SSH hosts in network namespaces of their own (``tests.infra``:
real OpenSSH sshd, veth pairs), each with a loop device on a tmpfs file (so the
figure measures the transport, not this machine's disk), and copies the source device
onto the destination device two ways, over the same hosts:

* vmigrate: :func:`app.engines.live_stream.data.stream`, as the transfer step runs it
  (source helper -> service -> destination helper: zero blocks skipped at the source,
  ``vmd1`` digest, durable offsets), in a child process so its peak RSS is its own;
* reference: ``dd if=SRC bs=4M | ssh -c aes128-gcm@openssh.com DEST 'dd of=DEV bs=4M'``
  run on this machine, which is the source host's kernel and device.

Volumes: dense (all random) and 50 % zero (alternating 1 MiB random and zero runs);
with ``--text``, also 50 % zeros whose data is text-like (compresses about 4:1).
``--link RATE`` (``tc`` units, "200mbit") slows the link into the destination host,
which both paths cross. Prints MB/s (10^6 bytes of volume per second), the vmigrate/dd
ratio and vmigrate's peak RSS; medians of ``--runs`` runs. Needs root (namespaces, loop
devices).

    .venv/bin/python -m bench.live_stream [--size-mib 1024] [--runs 3] [--text] [--link R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tests.infra import SshHost, generate_keypair, run_local
from tests.infra.nshost import NsHost, running_ns_host

MiB = 1024 * 1024


def _fill(path: Path, size: int, zero_fraction: float, text: bool = False) -> None:
    """Random data; with ``zero_fraction`` 0.5, every other MiB left zero; with ``text``,
    words of hex digits instead of random bytes."""
    rng = random.Random(5)
    words = [rng.randbytes(3).hex() for _ in range(2000)]
    with path.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            if zero_fraction and (off // MiB) % 2:
                continue
            f.seek(off)
            n = min(MiB, size - off)
            if text:
                f.write(" ".join(rng.choices(words, k=n // 6 + 1)).encode()[:n])
            else:
                f.write(os.urandom(n))


class CpuSampler:
    """CPU seconds used by the descendants of some processes (the sshd listeners: their
    sessions and what those run) while it runs: a thread reads ``/proc/<pid>/stat`` of
    every descendant every 20 ms and keeps each one's last figure, minus what it had
    used before. (sshd reaps its sessions without their CPU reaching its own
    ``cutime``, so rusage cannot tell.) A process's last < 20 ms can be missed."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self._base: dict[tuple[int, str], float] = {}
        self._last: dict[tuple[int, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> dict[tuple[int, str], float]:
        stats: dict[int, list[str]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    text = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                stats[int(entry)] = text.rsplit(")", 1)[1].split()
        children: dict[int, list[int]] = {}
        for pid, fields in stats.items():
            children.setdefault(int(fields[1]), []).append(pid)
        found: dict[tuple[int, str], float] = {}
        todo = list(self.roots)
        while todo:
            for pid in children.get(todo.pop(), []):
                fields = stats[pid]
                found[(pid, fields[19])] = (int(fields[11]) + int(fields[12])) / self._tick
                todo.append(pid)
        return found

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._last.update(self._sample())
            time.sleep(0.02)

    def __enter__(self) -> CpuSampler:
        self._base = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(v - self._base.get(k, 0.0) for k, v in self._last.items())


def _own_children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    seconds: float
    service_cpu: float  # vmigrate: the service process; reference: local dd + ssh
    hosts_cpu: float  # sshd sessions and what they ran, on both hosts
    python_cpu: float = 0.0  # vmigrate: the service's own Python process (no ssh children)
    peak_rss: int = 0
    rss_before: int = 0
    sent: int = 0
    zstd: bool = False  # vmigrate: the stream switched to zstd


def _reference(src_dev: str, dest: NsHost, dest_dev: str) -> Run:
    """``dd if=SRC bs=4M | ssh -c aes128-gcm@openssh.com DEST 'dd of=DEV bs=4M'``."""
    assert dest.sshd is not None
    ssh = dest.ssh_argv(f"dd of={dest_dev} bs=4M status=none")
    ssh[1:1] = ["-c", "aes128-gcm@openssh.com"]
    cpu0 = _own_children_cpu()
    with CpuSampler([dest.sshd.pid]) as hosts:
        started = time.monotonic()
        reader = subprocess.Popen(["dd", f"if={src_dev}", "bs=4M", "status=none"],
                                  stdout=subprocess.PIPE)
        assert reader.stdout is not None
        writer = subprocess.run(ssh, stdin=reader.stdout, check=False, timeout=3600)
        reader.stdout.close()
        if reader.wait(timeout=60) != 0 or writer.returncode != 0:
            raise RuntimeError("dd | ssh dd failed")
        seconds = time.monotonic() - started
    return Run(seconds, _own_children_cpu() - cpu0, hosts.seconds)


def _vmigrate(args: list[str], a: NsHost, b: NsHost) -> Run:
    """Run the stream in a child process (its own CPU time and peak RSS)."""
    assert a.sshd is not None
    assert b.sshd is not None
    with CpuSampler([a.sshd.pid, b.sshd.pid]) as hosts:
        proc = subprocess.Popen([sys.executable, "-m", "bench.live_stream", "--child", *args],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"vmigrate child failed ({status})")
    report = json.loads(out)
    return Run(float(report["seconds"]), usage.ru_utime + usage.ru_stime, hosts.seconds,
               python_cpu=float(report["python_cpu"]), peak_rss=int(report["peak_rss"]),
               rss_before=int(report["rss_before"]),
               sent=int(report["data_bytes"]), zstd=bool(report.get("zstd")))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def _child(argv: list[str]) -> None:
    """In the child: connect both hosts and stream (argv from :func:`_host_args`)."""
    from app.engines.live_stream import HostDevice, stream
    from app.transports.ssh import SshOptions, SshTarget, ssh_session

    (sh, sp, sfp, sdev, dh, dp, dfp, ddev, key, size) = argv
    src = SshTarget(sh, int(sp), "root", private_key=key, fingerprint=sfp)
    dst = SshTarget(dh, int(dp), "root", private_key=key, fingerprint=dfp)
    options = SshOptions(native_data=not os.environ.get("VMIGRATE_BENCH_ASYNCSSH"))
    async with ssh_session(src, options) as a, ssh_session(dst, options) as b:
        before = _rss("VmRSS")
        started = time.monotonic()
        result = await stream(HostDevice(a, sdev), HostDevice(b, ddev), int(size))
        seconds = time.monotonic() - started
    me = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "digest": result.digest, "rss_before": before,
                      "python_cpu": me.ru_utime + me.ru_stime,
                      "peak_rss": _rss("VmHWM"), "data_bytes": result.data_bytes,
                      "zstd": result.compressed}))


def _host_args(a: SshHost, sdev: str, b: SshHost, ddev: str, size: int) -> list[str]:
    return [a.host, str(a.port), a.host_key_fingerprint, sdev, b.host, str(b.port),
            b.host_key_fingerprint, ddev, str(a.key_path), str(size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="also write the raw runs to this file")
    parser.add_argument("--asyncssh-data", action="store_true",
                        help="stream over asyncssh channels, not the OpenSSH client")
    parser.add_argument("--text", action="store_true",
                        help="also a 50%% zeros volume of text-like (compressible) data")
    parser.add_argument("--link", help="slow the link into the destination to this rate "
                        "(tc units: 200mbit)")
    parser.add_argument("--child", nargs=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        argv = list(args.child)
        argv[8] = Path(argv[8]).read_text()  # the private key itself
        asyncio.run(_child(argv))
        return 0
    if args.asyncssh_data:
        os.environ["VMIGRATE_BENCH_ASYNCSSH"] = "1"
    size = args.size_mib * MiB
    rows: list[tuple[str, list[Run], list[Run], bool]] = []
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="vmigrate-bench-") as tmp, \
            ExitStack() as stack:
        work = Path(tmp)
        key = generate_keypair(work / "id_ed25519")
        a = stack.enter_context(running_ns_host(key, device_mib=1))
        b = stack.enter_context(running_ns_host(key, device_mib=1))
        if args.link:
            b.limit_ingress(args.link)
        src_file, dst_file = work / "src.img", work / "dst.img"
        dst_file.write_bytes(b"")
        os.truncate(dst_file, size)
        volumes = [("dense", 0.0, False), ("50% zeros", 0.5, False)]
        if args.text:
            volumes.append(("50% text", 0.5, True))
        for name, zeros, text in volumes:
            _fill(src_file, size, zeros, text)
            src_dev = run_local(["losetup", "--find", "--show", str(src_file)]).strip()
            dst_dev = run_local(["losetup", "--find", "--show", str(dst_file)]).strip()
            try:
                ref: list[Run] = []
                ours: list[Run] = []
                for _ in range(args.runs):
                    run_local(["blkdiscard", dst_dev], check=False)
                    ref.append(_reference(src_dev, b, dst_dev))
                    run_local(["blkdiscard", dst_dev], check=False)
                    ours.append(_vmigrate(_host_args(a, src_dev, b, dst_dev, size), a, b))
                same = subprocess.run(["cmp", src_dev, dst_dev], capture_output=True,
                                      check=False).returncode == 0
            finally:
                run_local(["losetup", "-d", src_dev], check=False)
                run_local(["losetup", "-d", dst_dev], check=False)
            rows.append((name, ref, ours, same))
    _report(rows, size, args.json)
    return 0


def _report(rows: list[tuple[str, list[Run], list[Run], bool]], size: int,
            json_path: str | None) -> None:
    med = statistics.median
    print(f"{'volume':<10} {'dd|ssh MB/s':>11} {'vmigrate MB/s':>13} {'ratio':>5} "
          f"{'dd|ssh CPU s':>12} {'vmigrate CPU s (svc[py]+hosts)':>30} {'CPU ratio':>9} "
          f"{'RSS before/peak':>15} {'sent MiB':>8}  identical")
    out = []
    for name, ref, ours, same in rows:
        r_rate = size / med([r.seconds for r in ref]) / 1e6
        o_rate = size / med([r.seconds for r in ours]) / 1e6
        r_cpu = med([r.service_cpu + r.hosts_cpu for r in ref])
        o_svc = med([r.service_cpu for r in ours])
        o_hosts = med([r.hosts_cpu for r in ours])
        o_py = med([r.python_cpu for r in ours])
        peak = max(r.peak_rss for r in ours) / MiB
        before = min(r.rss_before for r in ours) / MiB
        print(f"{name:<10} {r_rate:>11.0f} {o_rate:>13.0f} {o_rate / r_rate:>5.2f} "
              f"{r_cpu:>12.2f} {o_svc + o_hosts:>10.2f} ({o_svc:.2f}[py {o_py:.2f}]+{o_hosts:.2f})"
              f"{r_cpu / (o_svc + o_hosts):>11.2f} {before:>7.0f}/{peak:<5.0f}MiB "
              f"{ours[0].sent / MiB:>8.0f}  {same}"
              + ("  zstd" if any(r.zstd for r in ours) else ""))
        print(f"{'':<10} runs MB/s: dd|ssh "
              + " / ".join(f"{size / r.seconds / 1e6:.0f}" for r in ref) + ", vmigrate "
              + " / ".join(f"{size / r.seconds / 1e6:.0f}" for r in ours))
        out.append({"volume": name, "reference": [vars(r) for r in ref],
                    "vmigrate": [vars(r) for r in ours], "identical": same})
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
