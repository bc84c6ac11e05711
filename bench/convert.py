"""Benchmark: ``vmigrate convert`` against ``qemu-img convert``.

Not a test. Builds a sparse raw image (about half of it random data in scattered
1 MiB extents, the rest holes) in a temporary directory, converts it along each path
with both tools, and prints throughput (MB/s of *virtual* size, 1 MB = 10^6 bytes),
the vmigrate/qemu-img throughput ratio, and the peak RSS of each child process
(``os.wait4`` rusage of that one child, so runs do not mask each other). Medians of
``--runs`` runs (3; ``--quick``: 1 run on a 1 GiB image). A last row converts a
32 GiB sparse image to show that memory does not grow with disk size.

Both tools read the same input files, which stay in the page cache after the first
run (the caches are not dropped); outputs are written to the same directory and
deleted after each run. Per path, each tool first runs once untimed (vmigrate's
output of that run is checked with ``qemu-img compare``), then the timed runs
alternate which tool goes first. On a VM whose kernel reports
freed memory to the host (virtio-balloon free page reporting), a run whose page cache
lands on reported memory faults it back in from the host and takes 2-4x longer, for
either tool; always running one tool first would hand it that cost. Each run records
how much memory the guest reported meanwhile (where the kernel shows it), and as root
``--hold-freed-memory`` asks the kernel to keep freed memory for 60 s before reporting
it, however much is waiting (``min_free_ms`` and ``max_waiting_mib`` of the
page_reporting module, put back afterwards), which takes that noise out of the
comparison.

    .venv/bin/python -m bench.convert [--quick] [--runs N] [--dir DIR] [--only NAME]
                                      [--skip NAME]
                                      [--hold-freed-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO = Path(__file__).resolve().parents[1]
#: The command users run: the console script installed next to this interpreter.
VMIGRATE = [str(Path(sys.executable).with_name("vmigrate")), "convert"]
QEMU_FMT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx"}


@dataclass(frozen=True)
class BenchPath:
    name: str
    src: str  # input kind: raw | qcow2 | vmdk | vhd (see prepare_inputs)
    out_ext: str
    vmigrate: list[str]  # options after IN OUT
    qemu: list[str]  # options after -f FMT
    target: float | None  # wanted vmigrate/qemu-img throughput ratio (None: informational)


PATHS = [
    BenchPath("raw -> qcow2", "raw", "qcow2", ["--to", "qcow2"], ["-O", "qcow2"], 1.0),
    BenchPath(
        "raw -> vmdk streamOptimized",
        "raw",
        "vmdk",
        ["--to", "vmdk", "--subformat", "streamOptimized"],
        ["-O", "vmdk", "-o", "subformat=streamOptimized"],
        2.0,
    ),
    BenchPath(
        "raw -> vhd fixed",
        "raw",
        "vhd",
        ["--to", "vhd", "--subformat", "fixed"],
        ["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
        1.0,
    ),
    BenchPath(
        "raw -> vhd dynamic",
        "raw",
        "vhd",
        ["--to", "vhd", "--subformat", "dynamic"],
        ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
        1.0,
    ),
    BenchPath("raw -> vhdx", "raw", "vhdx", ["--to", "vhdx"], ["-O", "vhdx"], 1.0),
    BenchPath("qcow2 -> raw", "qcow2", "raw", ["--to", "raw"], ["-O", "raw"], 1.0),
    BenchPath("vmdk (stream) -> raw", "vmdk", "raw", ["--to", "raw"], ["-O", "raw"], 1.0),
    BenchPath("vhd dynamic -> raw", "vhd", "raw", ["--to", "raw"], ["-O", "raw"], 1.0),
    BenchPath(  # qemu-img computes no digest: shows what the digest costs
        "raw -> qcow2 + vmd1 digest",
        "raw",
        "qcow2",
        ["--to", "qcow2", "--digest"],
        ["-O", "qcow2"],
        None,
    ),
    BenchPath(
        "raw -> qcow2 compressed",
        "raw",
        "qcow2",
        ["--to", "qcow2", "--compress"],
        ["-O", "qcow2", "-c"],
        2.0,
    ),
    BenchPath(  # the same zlib level as qemu-img: what is left is parallelism
        "raw -> qcow2 compressed, zlib 6",
        "raw",
        "qcow2",
        ["--to", "qcow2", "--compress", "--compression-level", "6"],
        ["-O", "qcow2", "-c"],
        None,
    ),
]
#: Shows that memory does not grow with the disk; at 1 GiB of data the interpreter's
#: start (about 0.1 s) is a large part of the time, so its ratio is informational.
SPARSE_PATH = BenchPath(
    "32 GiB sparse raw -> qcow2", "sparse", "qcow2", ["--to", "qcow2"], ["-O", "qcow2"], None
)


@dataclass
class Run:
    seconds: float
    max_rss_kib: int
    cpu_seconds: float
    reported_mib: float | None = None  # freed memory the guest reported to the host meanwhile


#: The page_reporting module's settings (a virtio-balloon guest with free page reporting).
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")


def reported_kib() -> int | None:
    """KiB of free memory reported to the host since boot, where the kernel says."""
    try:
        return int((PAGE_REPORTING / "reported_kib").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def hold_freed_memory(hold_ms: int = 60_000, waiting_mib: int = 1 << 20) -> Iterator[None]:
    """Keep freed memory in the guest for ``hold_ms`` before it is reported to the
    host, however much of it is waiting (the module reports early once more than
    ``max_waiting_mib`` waits, 1 GiB by default: less than one output), so the outputs'
    page cache is not faulted back in from the host run after run. The previous
    settings are put back afterwards."""
    wanted = {"min_free_ms": hold_ms, "max_waiting_mib": waiting_mib}
    before: dict[str, str] = {}

    def restore() -> None:
        for name, previous in before.items():
            (PAGE_REPORTING / name).write_text(previous)

    try:
        for name, value in wanted.items():
            knob = PAGE_REPORTING / name
            previous = knob.read_text().strip()
            knob.write_text(str(value))
            before[name] = previous
    except OSError as exc:
        restore()
        raise SystemExit(f"--hold-freed-memory: cannot set {PAGE_REPORTING} ({exc})") from exc
    print(f"holding freed memory in the guest: {wanted} (was {before})", flush=True)
    try:
        yield
    finally:
        restore()


@dataclass
class Row:
    name: str
    virtual_size: int
    target: float | None
    vmigrate: list[Run] = field(default_factory=list)
    qemu: list[Run] = field(default_factory=list)
    out_bytes: dict[str, int] = field(default_factory=dict)  # allocated size of the output

    @staticmethod
    def _median(runs: list[Run], attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in runs))

    def rate(self, which: str) -> float:
        runs: list[Run] = getattr(self, which)
        return self.virtual_size / self._median(runs, "seconds") / 1e6

    def rss_mib(self, which: str) -> float:
        runs: list[Run] = getattr(self, which)
        return max(r.max_rss_kib for r in runs) / 1024

    def cpu(self, which: str) -> float:
        runs: list[Run] = getattr(self, which)
        return self._median(runs, "cpu_seconds")

    @property
    def ratio(self) -> float:
        return self.rate("vmigrate") / self.rate("qemu")

    @property
    def best_ratio(self) -> float:
        """Fastest run against fastest run: what each tool does when the machine is in
        a quick phase (informational; the targets are on the medians)."""
        return min(r.seconds for r in self.qemu) / min(r.seconds for r in self.vmigrate)


def child_env(work: Path) -> dict[str, str]:
    """Let Python cache bytecode (in the work dir), as an installed package would:
    compiling every module on each start would be measured otherwise."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def run_child(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Run:
    """Run one process; wall time, peak RSS and CPU time of exactly that child."""
    with tempfile.TemporaryFile() as err:
        reported = reported_kib()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        after = reported_kib()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.read().decode()}")
    mib = None if reported is None or after is None else (after - reported) / 1024
    return Run(seconds, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, mib)


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def make_raw(path: Path, size: int, data_fraction: float, seed: int) -> int:
    """Sparse raw file: ``data_fraction`` of its 1 MiB slots hold random data."""
    rng = random.Random(seed)
    slots = size // MiB
    chosen = sorted(rng.sample(range(slots), int(slots * data_fraction)))
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in chosen:
            f.seek(slot * MiB)
            f.write(os.urandom(MiB))
    return len(chosen) * MiB


def prepare_inputs(work: Path, size: int, quick: bool, with_sparse: bool) -> dict[str, Path]:
    inputs = {"raw": work / "src.raw"}
    print(f"creating {size / GiB:.0f} GiB raw image (half random data) in {work}", flush=True)
    make_raw(inputs["raw"], size, 0.5, seed=1)
    for kind, opts in (
        ("qcow2", ["-O", "qcow2"]),
        ("vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        ("vhd", ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"]),
    ):
        inputs[kind] = work / f"src.{kind}"
        print(f"  qemu-img: preparing {kind} input", flush=True)
        qemu_img("convert", "-f", "raw", *opts, inputs["raw"], inputs[kind])
    if with_sparse:
        inputs["sparse"] = work / "sparse.raw"
        frac = (256 * MiB if quick else 1 * GiB) / (32 * GiB)
        print("  creating 32 GiB sparse raw image", flush=True)
        make_raw(inputs["sparse"], 32 * GiB, frac, seed=2)
    return inputs


def verify(src: Path, src_kind: str, out: Path, out_ext: str) -> None:
    src_fmt = "raw" if src_kind == "sparse" else QEMU_FMT[src_kind]
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", src_fmt, "-F", QEMU_FMT[out_ext], str(src), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"vmigrate output {out} differs from {src}: {proc.stdout}{proc.stderr}")


def bench_path(p: BenchPath, inputs: dict[str, Path], work: Path, runs: int) -> Row:
    """One untimed warm-up run per tool (vmigrate's output is the one verified), then
    ``runs`` timed runs per tool, the tool that goes first alternating (ABBA), so that
    neither tool always runs right after the other's output was deleted."""
    src = inputs[p.src]
    size = src.stat().st_size if p.src in ("raw", "sparse") else inputs["raw"].stat().st_size
    row = Row(p.name, size, p.target)
    out = work / f"out.{p.out_ext}"
    src_fmt = "raw" if p.src == "sparse" else QEMU_FMT[p.src]
    commands = {
        "vmigrate": ([*VMIGRATE, str(src), str(out), *p.vmigrate], REPO, child_env(work)),
        "qemu": (["qemu-img", "convert", "-f", src_fmt, *p.qemu, str(src), str(out)], work, None),
    }
    for tool, (argv, cwd, env) in commands.items():  # warm-up, not timed
        run_child(argv, cwd, env)
        if tool == "vmigrate":
            verify(src, p.src, out, p.out_ext)
        row.out_bytes[tool] = out.stat().st_blocks * 512
        out.unlink()
    for i in range(runs):
        order = ("vmigrate", "qemu") if i % 2 == 0 else ("qemu", "vmigrate")
        for tool in order:
            argv, cwd, env = commands[tool]
            getattr(row, tool).append(run_child(argv, cwd, env))
            out.unlink()
    print(
        f"  {p.name:<30} vmigrate {row.rate('vmigrate'):8.0f} MB/s  "
        f"qemu-img {row.rate('qemu'):8.0f} MB/s  ratio {row.ratio:5.2f} "
        f"(best {row.best_ratio:5.2f})  "
        f"rss {row.rss_mib('vmigrate'):6.0f} / {row.rss_mib('qemu'):4.0f} MiB",
        flush=True,
    )
    for tool in ("vmigrate", "qemu"):
        runs_of: list[Run] = getattr(row, tool)
        times = " ".join(f"{r.seconds:.2f}" for r in runs_of)
        reported = [r.reported_mib for r in runs_of if r.reported_mib is not None]
        note = f"  ({sum(reported):.0f} MiB reported to the host meanwhile)" if reported else ""
        print(f"    {tool:<8} runs: {times} s{note}", flush=True)
    return row


def table(rows: list[Row]) -> str:
    head = (
        "| path | virtual | vmigrate MB/s | qemu-img MB/s | ratio | best-run ratio | target | "
        "vmigrate CPU s | qemu-img CPU s | vmigrate peak RSS | qemu-img peak RSS | "
        "output MiB vmigrate / qemu-img | meets |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        rss_ok = r.rss_mib("vmigrate") <= 256
        if r.target is None:
            target, meets = "-", "RSS" if rss_ok else "NO (RSS)"
        else:
            target = f">= {r.target:.1f}"
            meets = "yes" if r.ratio >= r.target and rss_ok else "NO"
        lines.append(
            f"| {r.name} | {r.virtual_size / GiB:.0f} GiB | {r.rate('vmigrate'):.0f} | "
            f"{r.rate('qemu'):.0f} | {r.ratio:.2f} | {r.best_ratio:.2f} | {target} | "
            f"{r.cpu('vmigrate'):.1f} | {r.cpu('qemu'):.1f} | "
            f"{r.rss_mib('vmigrate'):.0f} MiB | {r.rss_mib('qemu'):.0f} MiB | "
            f"{r.out_bytes['vmigrate'] / MiB:.0f} / {r.out_bytes['qemu'] / MiB:.0f} | "
            f"{meets} |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run, 1 GiB image")
    ap.add_argument("--runs", type=int, help="runs per tool and path (default 3, quick 1)")
    ap.add_argument("--size-gib", type=int, help="image size (default 4, quick 1)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")
    ap.add_argument("--only", action="append", help="run paths whose name contains this")
    ap.add_argument("--skip", action="append", help="leave out paths whose name contains this")
    ap.add_argument("--no-sparse", action="store_true", help="skip the 32 GiB sparse row")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument(
        "--hold-freed-memory",
        action="store_true",
        help="(root, VMs with free page reporting) keep freed memory in the guest for\n"
        "60 s before reporting it to the host, however much waits, for the duration\n"
        "of the benchmark",
    )
    args = ap.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    size = (args.size_gib or (1 if args.quick else 4)) * GiB
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is not installed")

    def wanted(name: str) -> bool:
        return (not args.only or any(o in name for o in args.only)) and not any(
            o in name for o in args.skip or ()
        )

    paths = [p for p in PATHS if wanted(p.name)]
    with_sparse = not args.no_sparse and wanted(SPARSE_PATH.name)
    work = Path(tempfile.mkdtemp(prefix="vmigrate-bench-", dir=args.dir))
    if not args.hold_freed_memory and reported_kib() is not None:
        print("note: this guest reports freed memory to the host; see --hold-freed-memory")
    hold = hold_freed_memory() if args.hold_freed_memory else contextlib.nullcontext()
    with hold:
        rows = run_all(paths, work, size, runs, args.quick, with_sparse)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def run_all(
    paths: list[BenchPath], work: Path, size: int, runs: int, quick: bool, with_sparse: bool
) -> list[Row]:
    try:
        inputs = prepare_inputs(work, size, quick, with_sparse)
        print(f"benchmark: {runs} run(s) per tool, medians; {os.cpu_count()} CPUs", flush=True)
        warm = [
            sys.executable,
            "-c",
            "import app.cli, app.formats.registry as r; "
            "[r.format_module(f) for f in ('raw', 'qcow2', 'vmdk', 'vhd', 'vhdx')]",
        ]
        run_child(warm, REPO, child_env(work))  # fills the bytecode cache
        rows = [bench_path(p, inputs, work, runs) for p in paths]
        if with_sparse:
            rows.append(bench_path(SPARSE_PATH, inputs, work, runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
