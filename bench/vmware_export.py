"""Benchmark: VMware disk export (vcsim) into the image library, against a plain download.

Not a test. Starts the govmomi vCenter simulator the tests use (``tests/infra/vcsim.py``),
gives one VM a disk of ``--size`` MiB (512; random data in half of its 1 MiB extents,
holes elsewhere, ``bench.convert.make_raw``; ``--disk e2e``: the e2e tests'
``disk_with_holes``, about 1/7 data in short runs), powers it off, and then measures,
each in its own child process:

* ``plain download``: ``ExportVm`` through pyvmomi, then the lease's device URL
  streamed with ``httpx.AsyncClient`` (``aiter_bytes``, as the driver reads it)
  straight into a file. No parsing, no zero detection, no digest: the transfer itself,
  the reference of the ratio column.
* ``vmigrate -> raw`` / ``vmigrate -> qcow2``: the code a migration's export step runs
  (``VmwareDriver.export_disks`` -> ``DiskStream`` -> ``open_reader`` ->
  ``Converter(reader, create_writer(fmt, FileSink(staging file)))``) into a
  ``LocalStore`` staging file, zero detection and the ``vmd1`` digest on, as in a
  migration. Publishing (fsync + rename) is not timed, and no download fsyncs either.
* context rows (``--no-references`` skips them): the same download with the sync
  ``httpx.Client`` and with ``curl``, to show what the transfer costs with less
  client-side overhead.

Throughput is MB/s of the disk's *virtual* size (1 MB = 10^6 bytes), timed from the
GET (``export.open``) to the last byte written and the file closed; logging in,
finding the VM and getting the lease are outside the clock (the same for all). Client
CPU is the child's user + system time over that interval, all threads (curl's for the
curl row); "MB per client CPU s" divides the virtual size by it: the ceiling the
client's CPU cost alone sets, the figure to compare when the machine is busy. vcsim
CPU is the simulator's over the whole child (``psutil``, if installed). Peak RSS is
the child's own ``VmHWM`` (``/proc/self/status``), not its ``ru_maxrss`` from
``wait4`` / ``RUSAGE_CHILDREN``: that one starts from the RSS of the process that
forked the child (this benchmark, with pyvmomi loaded and the disk written), so it
would show the parent's size. "RSS before" is the child's resident set just before
the transfer started (interpreter, pyvmomi, a logged-in session), and "peak RSS during
transfer" its ``VmHWM`` after the transfer, reset at the start (``/proc/self/clear_refs``):
what moving the disk cost is the difference of these two.
Medians of ``--runs`` runs (3; ``--quick``: 1), paths interleaved within each run,
after one untimed warm-up download. Every output is compared with the uploaded disk
once (``qemu-img compare``). The load average is printed: on a shared machine other
processes compete for the same cores, so compare rows of one run, not across runs.

    .venv/bin/python -m bench.vmware_export [--quick] [--runs N] [--size MiB]
        [--disk half|e2e] [--no-references] [--profile DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from tests.infra.vcsim import Vcsim

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
VM = "DC0_H0_VM0"
CHILD_TIMEOUT = 900.0
PLAIN = "plain download"
SYNC = "httpx sync download"
CURL = "curl download"
PATHS = (PLAIN, "vmigrate -> raw", "vmigrate -> qcow2")
REFERENCES = (SYNC, CURL)  # context rows: the same transfer with less client overhead
FORMAT_OF = {"vmigrate -> raw": "raw", "vmigrate -> qcow2": "qcow2"}


# --- child side: one measured transfer per process ---------------------------------------


@dataclass(frozen=True)
class Job:
    """What a child process measures (passed as JSON on its command line)."""

    path: str  # one of PATHS
    vcsim: dict[str, Any]  # tests.infra.vcsim.Vcsim fields, Paths as str
    vm: str
    out: str  # output file (the plain download) or LocalStore root (vmigrate)
    profile: str | None = None  # write cProfile stats of the transfer here


@dataclass(frozen=True)
class Sample:
    """What a child reports (JSON on its stdout)."""

    seconds: float  # GET to file closed
    virtual_size: int
    data_bytes: int | None  # non-zero bytes the converter wrote (vmigrate paths)
    rss_before_kib: int  # resident set just before the transfer
    cpu_seconds: float  # of the transfer only (user + system, this process / curl)
    output: str
    startup_peak_kib: int | None = None  # peak RSS before the transfer (VmHWM)
    transfer_peak_kib: int | None = None  # peak RSS since the transfer started (VmHWM)

    @property
    def peak_kib(self) -> int | None:
        """This process's peak RSS since its exec."""
        peaks = [p for p in (self.startup_peak_kib, self.transfer_peak_kib) if p is not None]
        return max(peaks) if peaks else None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _vm_hwm() -> int | None:
    """This process's peak RSS in KiB since its exec (or the last reset), Linux only.

    Not ``ru_maxrss``: a child's ``ru_maxrss`` is at least the RSS of the process that
    forked it (the memory map it ran in until ``exec``), here the whole benchmark.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _mark() -> tuple[int, int | None, bool]:
    """Before a transfer: (RSS now, peak so far, whether the peak could be reset to now)."""
    peak = _vm_hwm()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    return _rss_now(), peak, reset


def _peak_since(reset: bool) -> int | None:
    return _vm_hwm() if reset else None


def _rss_now() -> int:
    """Current resident set in KiB (``/proc/self/statm``; the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _vcsim(fields: dict[str, Any]) -> Vcsim:
    from tests.infra.vcsim import Vcsim

    paths = {"ca_bundle", "workdir", "log_path"}
    values: dict[str, Any] = {k: Path(v) if k in paths else v for k, v in fields.items()}
    return Vcsim(**values)


@contextlib.contextmanager
def _clock(job: Job) -> Iterator[dict[str, float]]:
    """Time the block (wall and this process's CPU), under cProfile if asked."""
    measured: dict[str, float] = {}
    # thread CPU time, not wall time: the machine may be busy with other work
    profiler = cProfile.Profile(time.thread_time) if job.profile else None
    cpu, start = _cpu(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    try:
        yield measured
    finally:
        if profiler is not None:
            profiler.disable()
        measured["seconds"] = time.perf_counter() - start
        measured["cpu"] = _cpu() - cpu
    if profiler is not None and job.profile:
        profiler.dump_stats(job.profile)


def _export_lease(vm: Any) -> Any:
    """``ExportVm`` and wait for the lease to be ready (vcsim: at once)."""
    lease: Any = vm.ExportVm()
    deadline = time.monotonic() + 60.0
    while str(lease.state) == "initializing" and time.monotonic() < deadline:
        time.sleep(0.05)
    if str(lease.state) != "ready":
        raise SystemExit(f"export lease is {lease.state}: {lease.error}")
    return lease


async def _download_async(url: str, headers: dict[str, str], f: BinaryIO, job: Job,
                          verify: ssl.SSLContext) -> tuple[int, dict[str, float]]:
    """httpx.AsyncClient, as the driver uses it; blocking writes (the simplest consumer)."""
    import httpx

    n = 0
    timeout = httpx.Timeout(120.0, connect=30.0)
    async with (
        asyncio.timeout(CHILD_TIMEOUT),
        httpx.AsyncClient(verify=verify, trust_env=False, timeout=timeout) as client,
    ):
        with _clock(job) as measured:
            async with client.stream("GET", url, headers=headers) as response:
                response.raise_for_status()
                async for chunk in response.aiter_bytes():
                    f.write(chunk)
                    n += len(chunk)
    return n, measured


def _download_sync(url: str, headers: dict[str, str], f: BinaryIO, job: Job,
                   verify: ssl.SSLContext) -> tuple[int, dict[str, float]]:
    import httpx

    n = 0
    timeout = httpx.Timeout(120.0, connect=30.0)
    with httpx.Client(verify=verify, trust_env=False, timeout=timeout) as client, _clock(
        job
    ) as measured, client.stream("GET", url, headers=headers) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            f.write(chunk)
            n += len(chunk)
    return n, measured


def child_download(job: Job) -> Sample:
    """ExportVm with pyvmomi, then the device URL streamed into a file as it comes
    (httpx async: the reference; httpx sync and curl: context rows)."""
    from pyVmomi import vim

    from tests.infra.vcsim import find_vm

    vcsim = _vcsim(job.vcsim)
    with vcsim.connect() as si:
        vm: Any = find_vm(si, job.vm)
        disks: list[Any] = [
            d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        ]
        capacity = int(disks[0].capacityInBytes)
        lease = _export_lease(vm)
        url = vcsim.lease_url(str(lease.info.deviceUrl[0].url))
        cookie = SimpleCookie(str(si._stub.cookie or "")).get("vmware_soap_session")
        headers = {"Cookie": f"vmware_soap_session={cookie.value}"} if cookie else {}
        rss_before, startup_peak, reset = _mark()
        try:
            if job.path == CURL:
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                with _clock(job) as measured:
                    subprocess.run(
                        ["curl", "--silent", "--show-error", "--fail", "--globoff",
                         "--cacert", str(vcsim.ca_bundle), *(f"-H{k}: {v}" for k, v in
                                                             headers.items()),
                         "--output", job.out, url],
                        check=True, timeout=CHILD_TIMEOUT,
                    )
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                measured["cpu"] = (after.ru_utime + after.ru_stime
                                   - children.ru_utime - children.ru_stime)
                received = Path(job.out).stat().st_size
            else:
                with open(job.out, "wb") as f:
                    if job.path == PLAIN:
                        received, measured = asyncio.run(
                            _download_async(url, headers, f, job, vcsim.ssl_context())
                        )
                    else:
                        received, measured = _download_sync(
                            url, headers, f, job, vcsim.ssl_context()
                        )
        except BaseException:
            lease.HttpNfcLeaseAbort()
            raise
        peak = _peak_since(reset)
        lease.HttpNfcLeaseProgress(100)
        lease.HttpNfcLeaseComplete()
    if received != capacity:
        raise SystemExit(f"downloaded {received} bytes of a {capacity}-byte disk")
    return Sample(measured["seconds"], capacity, None, rss_before, measured["cpu"], job.out,
                  startup_peak, peak)


async def child_vmigrate(job: Job) -> Sample:
    """The export step of a hypervisor migration (app/engines/hypervisor.py), one disk."""
    from app.dataplane.convert import Converter
    from app.drivers.base import ServerLookup
    from app.drivers.vmware.driver import VmwareDriver
    from app.drivers.vmware.models import VsphereSettings
    from app.formats.base import WriterOptions
    from app.formats.io import FileSink
    from app.formats.registry import create_writer, open_reader
    from app.models.enums import CloudKind
    from app.models.schemas.cloud_fields import PasswordCredentials
    from app.storage.local import LocalStore

    vcsim = _vcsim(job.vcsim)
    fmt = FORMAT_OF[job.path]
    settings = VsphereSettings(
        host=vcsim.host,
        port=vcsim.port,
        ca_bundle=vcsim.ca_bundle.read_text(),
        datacenter=vcsim.datacenter,
    )
    creds = PasswordCredentials.model_validate(
        {"username": vcsim.username, "password": vcsim.password}
    )
    staged = LocalStore(Path(job.out)).stage(f"bench-export-{fmt}", stable=True)
    async with VmwareDriver(CloudKind.vmware, settings, creds) as driver:
        info = await driver.validate_source(ServerLookup(name=job.vm))
        async with driver.export_disks(info.id, None) as export:
            disk = export.disks[0]
            rss_before, startup_peak, reset = _mark()
            with _clock(job) as measured:
                stream = await export.open(disk)
                try:
                    reader = await open_reader(
                        stream.source, stream.format.value, virtual_size=disk.capacity
                    )
                    sink = FileSink(staged.path)
                    try:
                        writer = create_writer(fmt, sink, reader.virtual_size, WriterOptions())
                        result = await Converter(reader, writer).run()
                    finally:
                        await sink.close()
                finally:
                    await stream.close()
            peak = _peak_since(reset)
    return Sample(measured["seconds"], disk.capacity, result.data_bytes, rss_before,
                  measured["cpu"], str(staged.path), startup_peak, peak)


def child_main(raw: str) -> int:
    job = Job(**json.loads(raw))
    if job.path not in FORMAT_OF:
        sample = child_download(job)
    else:

        async def bounded() -> Sample:
            async with asyncio.timeout(CHILD_TIMEOUT):
                return await child_vmigrate(job)

        sample = asyncio.run(bounded())
    print(json.dumps(dataclasses.asdict(sample)), flush=True)
    return 0


# --- parent side ------------------------------------------------------------------------


@dataclass
class Run:
    sample: Sample
    wait4_maxrss_kib: int  # the child's ru_maxrss (os.wait4): includes the forking parent
    vcsim_cpu_seconds: float | None  # the simulator's CPU time during the child
    load: float  # 1-minute load average after the run


@dataclass
class Row:
    path: str
    runs: list[Run] = field(default_factory=list)
    out_bytes: int = 0  # allocated size of the output (first run)

    def rate(self) -> float:
        """MB/s of virtual size, median over runs."""
        rates = [r.sample.virtual_size / r.sample.seconds / 1e6 for r in self.runs]
        return float(statistics.median(rates))

    def seconds(self) -> float:
        return float(statistics.median(r.sample.seconds for r in self.runs))

    def cpu(self) -> float:
        return float(statistics.median(r.sample.cpu_seconds for r in self.runs))

    def per_cpu(self) -> float:
        """MB of virtual size per client CPU second (median): what a free core would do."""
        rates = [r.sample.virtual_size / r.sample.cpu_seconds / 1e6 for r in self.runs]
        return float(statistics.median(rates))

    def vcsim_cpu(self) -> str:
        values = [r.vcsim_cpu_seconds for r in self.runs if r.vcsim_cpu_seconds is not None]
        return f"{statistics.median(values):.2f}" if values else "-"

    def rss_mib(self) -> str:
        """Peak RSS of the child (its VmHWM; not measured for curl)."""
        peaks = [r.sample.peak_kib for r in self.runs]
        if self.path == CURL or None in peaks:
            return "-"
        return f"{max(p or 0 for p in peaks) / 1024:.0f}"

    def rss_before(self) -> str:
        if self.path == CURL:
            return "-"
        return f"{max(r.sample.rss_before_kib for r in self.runs) / 1024:.0f}"

    def transfer_peak(self) -> str:
        peaks = [r.sample.transfer_peak_kib for r in self.runs]
        if self.path == CURL or None in peaks:
            return "-"
        return f"{max(p or 0 for p in peaks) / 1024:.0f}"


def child_env(work: Path) -> dict[str, str]:
    """Byte-code cached in the work dir (as an installed package would have it)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def _process_cpu(pid: int) -> float | None:
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except Exception:  # psutil is a dev dependency; the column is optional
        return None


def run_child(job: Job, work: Path, vcsim_pid: int) -> Run:
    """One measured transfer in its own process; its sample, peak RSS and CPU time."""
    spec = json.dumps(dataclasses.asdict(job))
    argv = [sys.executable, "-m", "bench.vmware_export", "--child", spec]
    server_cpu = _process_cpu(vcsim_pid)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=child_env(work), stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{job.path} failed ({proc.returncode}):\n{err.read().decode()}")
        sample = Sample(**json.loads(out.read().decode().strip().splitlines()[-1]))
    after = _process_cpu(vcsim_pid)
    server = after - server_cpu if after is not None and server_cpu is not None else None
    return Run(sample, usage.ru_maxrss, server, os.getloadavg()[0])


def verify(source: Path, output: Path, fmt: str) -> None:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(source), str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{output} differs from the uploaded disk: {proc.stdout}{proc.stderr}")


def prepare(vcsim: Vcsim, work: Path, size: int, layout: str) -> Path:
    """Give ``VM`` a ``size``-byte disk with data and holes; power it off."""
    from bench.convert import make_raw
    from tests.e2e.vmware_support import disk_with_holes, resize_disk, set_power

    disk = work / "disk.raw"
    if layout == "half":
        make_raw(disk, size, 0.5, seed=7)
    else:
        disk_with_holes(disk, size, seed=7)
    resize_disk(vcsim, VM, size)
    vcsim.upload_disk(VM, disk)
    set_power(vcsim, VM, on=False)
    return disk


@dataclass
class Results:
    rows: list[Row]
    virtual_size: int
    allocated: int  # data bytes of the uploaded disk (blocks allocated in the source file)
    runs: int
    load_before: float


def measure(args: argparse.Namespace, work: Path) -> Results:
    from tests.infra.vcsim import VcsimOptions, running_vcsim

    size = args.size * MiB
    runs = args.runs or (1 if args.quick else 3)
    paths = list(PATHS)
    if not args.no_references:
        paths += [p for p in REFERENCES if p != CURL or shutil.which("curl")]
    rows = {p: Row(p) for p in paths}
    load_before = os.getloadavg()[0]
    with running_vcsim(VcsimOptions(vms=1)) as vcsim:
        fields = {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(vcsim).items()
        }
        print(f"vcsim on {vcsim.base_url}; preparing a {args.size} MiB disk", flush=True)
        disk = prepare(vcsim, work, size, args.disk)
        allocated = disk.stat().st_blocks * 512
        print(
            f"disk: {size / MiB:.0f} MiB virtual, {allocated / MiB:.0f} MiB of it data; "
            f"{runs} run(s) per path, medians; {os.cpu_count()} CPUs, "
            f"load average {load_before:.1f}",
            flush=True,
        )

        def job(path: str, profile: str | None = None) -> Job:
            out = work / ("library" if path in FORMAT_OF else "download.raw")
            return Job(path, fields, VM, str(out), profile)

        run_child(job(PLAIN), work, vcsim.pid)  # warm-up: byte-code cache, vcsim
        Path(job(PLAIN).out).unlink()
        for i in range(runs):
            for path in paths:
                run = run_child(job(path), work, vcsim.pid)
                rows[path].runs.append(run)
                output = Path(run.sample.output)
                if i == 0:
                    verify(disk, output, FORMAT_OF.get(path, "raw"))
                    rows[path].out_bytes = output.stat().st_blocks * 512
                output.unlink()
                s = run.sample
                server = "-" if run.vcsim_cpu_seconds is None else f"{run.vcsim_cpu_seconds:.2f}"
                print(
                    f"  run {i + 1} {path:<20} {s.virtual_size / s.seconds / 1e6:6.0f} MB/s "
                    f"{s.seconds:6.2f} s  cpu {s.cpu_seconds:5.2f} s  vcsim cpu {server} s  "
                    f"rss {(s.peak_kib or 0) / 1024:4.0f} MiB  "
                    f"load {run.load:.1f}",
                    flush=True,
                )
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for path in (p for p in paths if p != CURL):
                name = "".join(c if c.isalnum() else "_" for c in path)
                stats_path = args.profile / f"{name}.prof"
                run = run_child(job(path, str(stats_path)), work, vcsim.pid)
                Path(run.sample.output).unlink()
                print(f"\nprofile of {path} ({stats_path}; CPU time of the event-loop "
                      "thread only):")
                stats = pstats.Stats(str(stats_path))
                stats.sort_stats("tottime").print_stats(15)
    return Results(list(rows.values()), size, allocated, runs, load_before)


def table(rows: list[Row]) -> str:
    plain = rows[0].rate()
    head = (
        "| path | MB/s (virtual) | ratio vs plain download | seconds | client CPU s | "
        "MB per client CPU s | CPU ratio vs plain | vcsim CPU s | peak RSS MiB | "
        "RSS before transfer MiB | peak RSS during transfer MiB | output MiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    plain_cpu = rows[0].per_cpu()
    lines = [
        f"| {r.path}{' (context)' if r.path in REFERENCES else ''} | {r.rate():.0f} | "
        f"{r.rate() / plain:.2f} | {r.seconds():.2f} | {r.cpu():.2f} | {r.per_cpu():.0f} | "
        f"{r.per_cpu() / plain_cpu:.2f} | {r.vcsim_cpu()} | "
        f"{r.rss_mib()} | {r.rss_before()} | {r.transfer_peak()} | {r.out_bytes / MiB:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run per path")
    ap.add_argument("--runs", type=int, help="runs per path (default 3, quick 1)")
    ap.add_argument("--size", type=int, default=512, help="disk size in MiB (default 512)")
    ap.add_argument("--disk", choices=("half", "e2e"), default="half",
                    help="half: random data in half of the 1 MiB extents (bench.convert); "
                    "e2e: disk_with_holes of the e2e tests (about 1/7 data, short runs)")
    ap.add_argument("--no-references", action="store_true",
                    help="skip the httpx sync and curl context rows")
    ap.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")
    ap.add_argument("--profile", type=Path, help="also run each path once under cProfile "
                    "(main-thread CPU time), write the stats into this directory and "
                    "print the top functions")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is not installed (needed to check the outputs)")
    work = Path(tempfile.mkdtemp(prefix="vmigrate-bench-vmware-", dir=args.dir))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{results.virtual_size / MiB:.0f} MiB disk ({results.allocated / MiB:.0f} MiB data), "
        f"medians of {results.runs} run(s); load average {results.load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print(table(results.rows))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
