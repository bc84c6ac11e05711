"""The live-stream engine: an LVM snapshot of a running Linux volume, streamed over SSH
onto another Linux host's block device (``docs/live-stream.md``).

Steps (:mod:`app.engines.plans`) and what each leaves in its step result:

- ``validate`` changes nothing. Both hosts reachable, host keys verified, root or
  passwordless sudo; the LV exists (active, not thin, not itself a snapshot) and its VG
  has free space for the snapshot; the destination device exists, is a block device,
  holds at least the LV's size, is not mounted read-write (unless ``overwrite_mounted``)
  and does not hold the source volume. Records sizes, the snapshot's name and size and
  whether each host can run the python helper (else the ``dd`` path).
- ``provision`` (new VMs): no cloud driver can provision yet; the API refuses such
  migrations, this is the guard behind it.
- ``snapshot``: removes a leftover snapshot of this migration, then ``lvcreate
  --snapshot`` (optionally inside a bounded ``fsfreeze``). Records the snapshot's uuid:
  a checkpoint is only valid for the snapshot it was taken from.
- ``transfer``: :func:`~app.engines.live_stream_data.stream`; durable offsets reported
  by the destination become the checkpoint (persisted about once a second), and a retry
  or a resumed attempt starts from there. Ends by checking the snapshot did not overflow.
- ``verify``: the destination's ``vmd1`` digest of the first ``size`` bytes must equal
  the source's; the snapshot is checked for overflow once more.
- ``remove_snapshot`` (cleanup, always): removes the snapshot by its derived name; after
  a failure or cancel it records that the destination is incomplete; after success it
  reboots the destination when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.engines import live_stream_lvm as lvm
from app.engines import live_stream_wire as wire
from app.engines.live_stream_data import Endpoint, SourceReadError, stream
from app.engines.registry import EngineDeps
from app.engines.runner import Engine, JSONDict, MigrationView, StepContext
from app.errors import AppError
from app.transports.ssh import (
    SshConnectionError,
    SshOptions,
    SshSession,
    SshTarget,
    ssh_session,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class VerifyMismatch(AppError):
    status = 409
    code = "verify-mismatch"
    title = "Destination differs from the source"


@dataclass(frozen=True, slots=True)
class Tuning:
    """Engine knobs that are not part of the API (tests and benchmarks use them)."""

    #: Use dd even where python3 exists (exercises the fallback path).
    force_dd: bool = False
    checkpoint_seconds: float = 1.0
    cleanup_attempts: int = 3


def live_stream_engine(deps: EngineDeps) -> Callable[[MigrationView], Engine]:
    options = SshOptions(known_hosts=deps.settings.ssh_known_hosts_file,
                         connect_timeout=deps.settings.ssh_connect_timeout_seconds)
    return lambda view: LiveStreamEngine(view, options)


class LiveStreamEngine(Engine):
    platform = "ssh"

    def __init__(self, view: MigrationView, ssh: SshOptions,
                 tuning: Tuning | None = None) -> None:
        self.view = view
        self.ssh = ssh
        self.tuning = tuning or Tuning()
        self.spec = view.spec
        self.options: dict[str, Any] = dict(view.spec.get("options") or {})
        self.snapshot = lvm.snapshot_name(view.id)

    # -- plumbing ------------------------------------------------------------------

    def _target(self, side: str) -> SshTarget:
        part: dict[str, Any] = self.spec[side]
        secrets = self.view.secrets
        return SshTarget(host=str(part["host"]), port=int(part.get("port", 22)),
                         username=str(part["username"]),
                         password=secrets.get(f"{side}.password"),
                         private_key=secrets.get(f"{side}.private_key"),
                         fingerprint=part.get("host_key_fingerprint"))

    def _session(self, side: str) -> contextlib.AbstractAsyncContextManager[SshSession]:
        return ssh_session(self._target(side), self.ssh)

    @property
    def source_device(self) -> str:
        return str(self.spec["source"]["device"])

    @property
    def dest(self) -> dict[str, Any]:
        return dict(self.spec["destination"])

    def _validated(self) -> JSONDict:
        result = self.view.result_of("validate")
        if not result:
            raise AppError("the validate step has no result; run the migration again")
        return result

    async def run_step(self, ctx: StepContext) -> JSONDict | None:
        steps: dict[str, Callable[[StepContext], Awaitable[JSONDict | None]]] = {
            "validate": self._validate, "provision": self._provision,
            "snapshot": self._snapshot, "transfer": self._transfer, "verify": self._verify,
        }
        return await steps[ctx.step.name](ctx)

    async def run_cleanup(self, ctx: StepContext, outcome: str) -> JSONDict | None:
        if ctx.step.name != "remove_snapshot":
            raise AppError(f"live stream has no cleanup step {ctx.step.name}")
        return await self._retrying(lambda: self._remove_snapshot(ctx, outcome))

    async def _retrying(self, action: Callable[[], Awaitable[T]]) -> T:
        """Cleanup is not retried by the runner: ride out a short connection blip here."""
        for attempt in range(1, self.tuning.cleanup_attempts + 1):
            try:
                return await action()
            except SshConnectionError:
                if attempt == self.tuning.cleanup_attempts:
                    raise
                await asyncio.sleep(2.0 * attempt)
        raise AssertionError("unreachable")

    # -- validate ------------------------------------------------------------------

    async def _validate(self, ctx: StepContext) -> JSONDict:
        dest = self.dest
        if dest.get("kind") != "existing":
            raise lvm.HostCheckFailed("live stream onto a new VM needs a cloud driver that "
                                      "can provision one; none is available")
        async with self._session("source") as src:
            lv = await lvm.lv_info(src, self.source_device)
            _check_lv(lv, self.source_device, src.label)
            snap_size = _round_up(int(self.options.get("snapshot_size_bytes") or lv.size),
                                  lv.extent_size)
            leftover = await lvm.snapshot_status(src, lv.vg, self.snapshot)
            free = lv.vg_free + (leftover.size if leftover else 0)
            if free < snap_size:
                raise lvm.HostCheckFailed(
                    f"volume group {lv.vg} on {src.label} has {free} bytes free; the "
                    f"snapshot needs {snap_size} (options.snapshot_size_bytes, default the "
                    "volume's size)")
            lv_dev = await lvm.device_info(src, self.source_device)
            src_python = await lvm.python_version(src)
            src_boot = await lvm.boot_id(src)
        async with self._session("destination") as dst:
            info = await lvm.device_info(dst, str(dest["device"]))
            _check_destination(info, lv.size, bool(dest.get("overwrite_mounted")), dst.label)
            if await lvm.boot_id(dst) == src_boot and lv.majmin in info.tree:
                raise lvm.HostCheckFailed(
                    f"destination {info.path} holds the source volume {self.source_device}")
            dst_python = await lvm.python_version(dst)
        helpers = {"source": src_python is not None and not self.tuning.force_dd,
                   "destination": dst_python is not None and not self.tuning.force_dd}
        for side, ok in helpers.items():
            if not ok:
                await ctx.event("live_stream.dd_fallback", {"host": side, "reason": (
                    "no python3 >= 3.6" if not self.tuning.force_dd else "forced")})
        return {
            "size": lv.size, "vg": lv.vg, "lv": lv.lv, "snapshot": self.snapshot,
            "snapshot_size": snap_size, "helpers": helpers,
            "source_mounts": [m.mountpoint for m in lv_dev.rw_mounts],
            "destination": {"device": info.path, "size": info.size,
                            "exclusive": not info.mounts and not info.swap},
        }

    async def _provision(self, ctx: StepContext) -> JSONDict:
        raise lvm.HostCheckFailed("no cloud driver can provision a live-stream destination")

    # -- snapshot ------------------------------------------------------------------

    async def _snapshot(self, ctx: StepContext) -> JSONDict:
        v = self._validated()
        vg, name = str(v["vg"]), self.snapshot
        async with self._session("source") as src:
            lv = await lvm.lv_info(src, self.source_device)
            if await lvm.remove_snapshot(src, vg, name):
                await ctx.event("live_stream.snapshot.stale_removed", {"snapshot": name})
            freeze = None
            if self.options.get("freeze"):
                mounts = list(v.get("source_mounts") or [])
                freeze = mounts[0] if mounts else None
                if freeze is None:
                    await ctx.event("live_stream.freeze.skipped", {"reason": "not mounted"})
            await lvm.create_snapshot(src, lv, name, int(v["snapshot_size"]), freeze=freeze,
                                      freeze_seconds=int(self.options.get(
                                          "freeze_timeout_seconds", 5)))
            status = await lvm.check_snapshot(src, vg, name)
        await ctx.event("live_stream.snapshot.created", {
            "snapshot": f"{vg}/{name}", "cow_bytes": status.size, "frozen": freeze})
        return {"name": name, "vg": vg, "path": f"/dev/{vg}/{name}", "uuid": status.uuid,
                "cow_bytes": status.size}

    # -- transfer ------------------------------------------------------------------

    async def _transfer(self, ctx: StepContext) -> JSONDict:
        v = self._validated()
        snap = self.view.result_of("snapshot")
        size, vg, name = int(v["size"]), str(v["vg"]), str(snap["name"])
        checkpoint = ctx.migration.checkpoint or {}
        resume = 0
        if checkpoint.get("snapshot_uuid") == snap["uuid"] and checkpoint.get("size") == size:
            resume = int(checkpoint.get("offset", 0))
        helpers = v["helpers"]
        async with self._session("source") as src, self._session("destination") as dst:
            status = await lvm.check_snapshot(src, vg, name)
            if status.uuid != snap["uuid"]:
                raise lvm.HostCheckFailed(f"snapshot {vg}/{name} was replaced since the "
                                          "snapshot step; run the migration again")
            if resume:
                await ctx.event("live_stream.transfer.resumed", {"offset": resume})
            reporter = _Reporter(ctx, size, snap["uuid"], resume,
                                 self.tuning.checkpoint_seconds)
            throttle = self.options.get("throttle_bytes_per_second")
            try:
                async with reporter.running():
                    result = await stream(
                        Endpoint(src, str(snap["path"]), bool(helpers["source"])),
                        Endpoint(dst, str(self.dest["device"]), bool(helpers["destination"])),
                        size, resume_from=resume,
                        throttle_bps=float(throttle) if throttle else None,
                        exclusive=bool(v["destination"]["exclusive"])
                        and not self.dest.get("overwrite_mounted"),
                        on_durable=reporter.durable, on_progress=reporter.progress)
            except SourceReadError:
                await lvm.check_snapshot(src, vg, name)  # an overflow explains the I/O error
                raise
            await lvm.check_snapshot(src, vg, name)
        await ctx.checkpoint({"snapshot_uuid": snap["uuid"], "size": size, "offset": size})
        await ctx.progress(size, size, force=True)
        payload = {"bytes": size, "resumed_from": result.resumed_from,
                   "data_bytes": result.data_bytes, "zero_bytes": result.zero_bytes,
                   "seconds": round(result.seconds, 3)}
        await ctx.event("live_stream.transfer.completed", payload)
        return {"digest": result.digest, **payload}

    # -- verify --------------------------------------------------------------------

    async def _verify(self, ctx: StepContext) -> JSONDict:
        v = self._validated()
        size, expected = int(v["size"]), str(self.view.result_of("transfer")["digest"])
        async with self._session("source") as src:
            await lvm.check_snapshot(src, str(v["vg"]), self.snapshot)
        async with self._session("destination") as dst:
            digest = await destination_digest(dst, str(self.dest["device"]), size,
                                              helper=bool(v["helpers"]["destination"]))
        if digest != expected:
            raise VerifyMismatch(f"the destination's first {size} bytes have digest {digest}, "
                                 f"the source's {expected}")
        return {"digest": digest}

    # -- cleanup -------------------------------------------------------------------

    async def _remove_snapshot(self, ctx: StepContext, outcome: str) -> JSONDict:
        v = self._validated()
        async with self._session("source") as src:
            removed = await lvm.remove_snapshot(src, str(v["vg"]), self.snapshot)
        result: JSONDict = {"snapshot": f"{v['vg']}/{self.snapshot}", "removed": removed}
        if outcome != "completed":
            offset = int((ctx.migration.checkpoint or {}).get("offset", 0))
            result["destination"] = "incomplete"
            await ctx.event("live_stream.destination.incomplete", {
                "device": self.dest.get("device"), "durable_offset": offset,
                "outcome": outcome})
        elif self.dest.get("reboot_after"):
            async with self._session("destination") as dst:
                # Detached and delayed, so this session closes cleanly first.
                await dst.run("nohup sh -c 'sleep 2; reboot' >/dev/null 2>&1 </dev/null &",
                              what="reboot")
            result["rebooted"] = True
            await ctx.event("live_stream.destination.rebooting", {})
        return result


async def destination_digest(session: SshSession, device: str, size: int, *,
                             helper: bool) -> str:
    """``vmd1`` digest of ``device``'s first ``size`` bytes, computed on its host."""
    if helper:
        process = await session.start(wire.helper_command("digest", device, size))
        with session.errors():
            process.stdin.write(wire.helper_script())
            process.stdin.write_eof()
            out = await process.stdout.read()
            await process.wait_closed()
        if process.exit_status != 0:
            err = (await process.stderr.read()).decode(errors="replace")
            raise lvm.HostCheckFailed(f"digest of {device} on {session.label} failed: "
                                      f"{wire.failure_text(err)}")
        return out.decode().strip()
    result = await session.run(wire.dd_digest_command(device, size), what="dd digest",
                               seconds=3600 + size / 2**20)
    return wire.vmd1_from_block_hashes(size, result.stdout.splitlines())


class _Reporter:
    """Persists checkpoints and progress from the pipeline's synchronous callbacks,
    at most once per ``interval``, from a task of its own."""

    def __init__(self, ctx: StepContext, size: int, uuid: str, start: int,
                 interval: float) -> None:
        self.ctx = ctx
        self.size = size
        self.uuid = uuid
        self.interval = interval
        self._durable = self._saved = start
        self._done = start

    def durable(self, offset: int) -> None:
        self._durable = max(self._durable, offset)

    def progress(self, done: int, total: int) -> None:
        self._done = done

    async def _flush(self) -> None:
        if self._durable > self._saved:
            self._saved = self._durable
            await self.ctx.checkpoint({"snapshot_uuid": self.uuid, "size": self.size,
                                       "offset": self._durable})
        await self.ctx.progress(self._done, self.size)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._flush()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self._loop(), name="live-stream-checkpoints")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # What became durable before a failure is still worth keeping.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flush())


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit if unit > 0 else value


def _check_lv(lv: lvm.LvInfo, device: str, where: str) -> None:
    if lv.is_snapshot:
        raise lvm.HostCheckFailed(f"{device} on {where} is itself a snapshot")
    if lv.is_thin:
        raise lvm.HostCheckFailed(f"{device} on {where} is a thin volume; thin volumes "
                                  "are not supported yet")
    if not lv.active:
        raise lvm.HostCheckFailed(f"{device} on {where} is not active")


def _check_destination(info: lvm.DeviceInfo, size: int, overwrite_mounted: bool,
                       where: str) -> None:
    if not info.exists:
        raise lvm.HostCheckFailed(f"destination device {info.path} does not exist on {where}")
    if not info.is_block:
        raise lvm.HostCheckFailed(f"destination {info.path} on {where} is not a block device")
    if info.size < size:
        raise lvm.HostCheckFailed(f"destination device {info.path} on {where} holds "
                                  f"{info.size} bytes, less than the source's {size}")
    if overwrite_mounted:
        return
    busy = [f"{m.source} on {m.mountpoint}" for m in info.rw_mounts]
    busy += [f"{s} (swap)" for s in info.swap]
    if busy:
        raise lvm.HostCheckFailed(
            f"destination device {info.path} on {where} is in use read-write: "
            f"{', '.join(busy)}; set destination.overwrite_mounted to overwrite it anyway")

