"""Benchmark: the live stream's data path against ``dd | ssh dd``.

Not a test. Starts two SSH hosts in network namespaces of their own (``tests.infra``:
real OpenSSH sshd, veth pairs), each with a loop device on a tmpfs file (so the
figure measures the transport, not this machine's disk), and copies the source device
onto the destination device two ways, over the same hosts:

* vmigrate: :func:`app.engines.live_stream_data.stream`, as the transfer step runs it
  (source helper -> service -> destination helper: zero blocks skipped at the source,
  ``vmd1`` digest, durable offsets), in a child process so its peak RSS is its own;
* reference: ``dd if=SRC bs=4M | ssh -c aes128-gcm@openssh.com DEST 'dd of=DEV bs=4M'``
  run on this machine, which is the source host's kernel and device.

Volumes: dense (all random) and 50 % zero (alternating 1 MiB random and zero runs).
Prints MB/s (10^6 bytes of volume per second), the vmigrate/dd ratio and vmigrate's
peak RSS; medians of ``--runs`` runs. Needs root (namespaces, loop devices).

    .venv/bin/python -m bench.live_stream [--size-mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tests.infra import SshHost, generate_keypair, run_local
from tests.infra.nshost import running_ns_host

MiB = 1024 * 1024


def _fill(path: Path, size: int, zero_fraction: float) -> None:
    """Random data; with ``zero_fraction`` 0.5, every other MiB left zero."""
    with path.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            if zero_fraction and (off // MiB) % 2:
                continue
            f.seek(off)
            f.write(os.urandom(min(MiB, size - off)))


def _reference(src_dev: str, dest: SshHost, dest_dev: str) -> float:
    """``dd if=SRC bs=4M | ssh -c aes128-gcm@openssh.com DEST 'dd of=DEV bs=4M'``."""
    ssh = dest.ssh_argv(f"dd of={dest_dev} bs=4M status=none")
    ssh[1:1] = ["-c", "aes128-gcm@openssh.com"]
    started = time.monotonic()
    reader = subprocess.Popen(["dd", f"if={src_dev}", "bs=4M", "status=none"],
                              stdout=subprocess.PIPE)
    assert reader.stdout is not None
    writer = subprocess.run(ssh, stdin=reader.stdout, check=False, timeout=3600)
    reader.stdout.close()
    if reader.wait(timeout=60) != 0 or writer.returncode != 0:
        raise RuntimeError("dd | ssh dd failed")
    return time.monotonic() - started


def _vmigrate(args: list[str]) -> tuple[float, int, dict[str, object]]:
    """Run the stream in a child; (seconds, peak RSS bytes, its report)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bench.live_stream", "--child", *args],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - started
    if status != 0:
        raise RuntimeError(f"vmigrate child failed ({status})")
    report = json.loads(out)
    return float(report["seconds"]) or elapsed, usage.ru_maxrss * 1024, report


async def _child(argv: list[str]) -> None:
    """In the child: connect both hosts and stream (argv from :func:`_host_args`)."""
    from app.engines.live_stream_data import Endpoint, stream
    from app.transports.ssh import SshOptions, SshTarget, ssh_session

    (sh, sp, sfp, sdev, dh, dp, dfp, ddev, key, size) = argv
    src = SshTarget(sh, int(sp), "root", private_key=key, fingerprint=sfp)
    dst = SshTarget(dh, int(dp), "root", private_key=key, fingerprint=dfp)
    async with ssh_session(src, SshOptions()) as a, ssh_session(dst, SshOptions()) as b:
        started = time.monotonic()
        result = await stream(Endpoint(a, sdev), Endpoint(b, ddev), int(size))
        seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "digest": result.digest,
                      "data_bytes": result.data_bytes}))


def _host_args(a: SshHost, sdev: str, b: SshHost, ddev: str, size: int) -> list[str]:
    return [a.host, str(a.port), a.host_key_fingerprint, sdev, b.host, str(b.port),
            b.host_key_fingerprint, ddev, str(a.key_path), str(size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        argv = list(args.child)
        argv[8] = Path(argv[8]).read_text()  # the private key itself
        asyncio.run(_child(argv))
        return 0
    size = args.size_mib * MiB
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="vmigrate-bench-") as tmp, \
            ExitStack() as stack:
        work = Path(tmp)
        key = generate_keypair(work / "id_ed25519")
        a = stack.enter_context(running_ns_host(key, device_mib=1))
        b = stack.enter_context(running_ns_host(key, device_mib=1))
        src_file, dst_file = work / "src.img", work / "dst.img"
        dst_file.write_bytes(b"")
        os.truncate(dst_file, size)
        for name, zeros in (("dense", 0.0), ("50% zeros", 0.5)):
            _fill(src_file, size, zeros)
            src_dev = run_local(["losetup", "--find", "--show", str(src_file)]).strip()
            dst_dev = run_local(["losetup", "--find", "--show", str(dst_file)]).strip()
            try:
                ref, ours, rss = [], [], []
                for _ in range(args.runs):
                    run_local(["blkdiscard", dst_dev], check=False)
                    ref.append(_reference(src_dev, b, dst_dev))
                    run_local(["blkdiscard", dst_dev], check=False)
                    seconds, peak, report = _vmigrate(_host_args(a, src_dev, b, dst_dev, size))
                    ours.append(seconds)
                    rss.append(peak)
                check = subprocess.run(["cmp", src_dev, dst_dev], capture_output=True,
                                       check=False)
            finally:
                run_local(["losetup", "-d", src_dev], check=False)
                run_local(["losetup", "-d", dst_dev], check=False)
            rows.append((name, size / statistics.median(ref) / 1e6,
                         size / statistics.median(ours) / 1e6, max(rss), check.returncode == 0,
                         int(str(report["data_bytes"]))))
    print(f"{'volume':<10} {'dd|ssh MB/s':>12} {'vmigrate MB/s':>14} {'ratio':>6} "
          f"{'peak RSS':>9} {'sent':>8}  identical")
    for name, ref_rate, our_rate, peak, same, sent in rows:
        print(f"{name:<10} {ref_rate:>12.0f} {our_rate:>14.0f} {our_rate / ref_rate:>6.2f} "
              f"{peak / MiB:>7.0f} MiB {sent / MiB:>6.0f}Mi  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
