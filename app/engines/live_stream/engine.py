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
- ``transfer``: :func:`~app.engines.live_stream.data.stream`; durable offsets reported
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
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, SecretStr

from app.engines.deps import EngineDeps
from app.engines.live_stream import lvm
from app.engines.live_stream.data import HostDevice, SourceReadError, StreamResult, stream
from app.engines.live_stream.delta import DeltaResult, delta_stream, destination_digest
from app.engines.runner import (
    Checkpoint,
    Engine,
    MigrationRun,
    StepContext,
    StepResult,
)
from app.errors import AppError
from app.models.json import EventPayload
from app.models.schemas.migrations import (
    ExistingHostDestinationOut,
    LiveStreamOptions,
    LiveStreamSourceOut,
)
from app.models.schemas.specs import LiveStreamSpec, SideSecrets
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


# -- what the steps record (typed; stored in the step rows) ---------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Helpers(_Frozen):
    """Whether each host runs the python helper (else the ``dd`` path)."""

    source: bool
    destination: bool


class DestinationDevice(_Frozen):
    device: str
    size: int
    #: Nothing else has it open (not mounted, not swap): written with O_EXCL.
    exclusive: bool


class LiveStreamValidateResult(StepResult):
    size: int
    vg: str
    lv: str
    snapshot: str
    snapshot_size: int
    helpers: Helpers
    source_mounts: tuple[str, ...]
    destination: DestinationDevice


class WarmPass(_Frozen):
    number: int
    bytes: int
    changed_blocks: int
    seconds: float


class LiveStreamPrecopyResult(StepResult):
    passes: tuple[WarmPass, ...]


class LiveStreamSnapshotResult(StepResult):
    name: str
    vg: str
    path: str
    uuid: str
    cow_bytes: int


class LiveStreamTransferResult(StepResult):
    digest: str
    bytes: int
    resumed_from: int
    data_bytes: int
    zero_bytes: int
    seconds: float
    handed_over: bool
    zstd: bool


class LiveStreamVerifyResult(StepResult):
    digest: str


class LiveStreamRemoveSnapshotResult(StepResult):
    snapshot: str
    removed: bool
    destination: Literal["incomplete"] | None = None
    rebooted: bool | None = None


class StreamCheckpoint(Checkpoint):
    """Durable offset of the destination, valid only for the snapshot it came from."""

    snapshot_uuid: str
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class Tuning:
    """Engine knobs that are not part of the API (tests and benchmarks use them)."""

    #: Use dd even where python3 exists (exercises the fallback path).
    force_dd: bool = False
    checkpoint_seconds: float = 1.0
    cleanup_attempts: int = 3
    #: Pause between warm passes (lets a test change blocks between them).
    warm_pause_seconds: float = 0.0


def live_stream_engine(deps: EngineDeps) -> Callable[[MigrationRun], Engine]:
    options = SshOptions(known_hosts=deps.settings.ssh_known_hosts_file,
                         connect_timeout=deps.settings.ssh_connect_timeout_seconds)
    return lambda view: LiveStreamEngine(view, options)


class LiveStreamEngine(Engine):
    platform = "ssh"

    def __init__(self, run: MigrationRun, ssh: SshOptions,
                 tuning: Tuning | None = None) -> None:
        self.run = run
        self.ssh = ssh
        self.tuning = tuning or Tuning()
        self.spec = run.spec_as(LiveStreamSpec)
        self.options: LiveStreamOptions = self.spec.options
        self.snapshot = lvm.snapshot_name(run.id)

    # -- plumbing ------------------------------------------------------------------

    def _target(self, side: Literal["source", "destination"]) -> SshTarget:
        host: LiveStreamSourceOut | ExistingHostDestinationOut
        secrets: SideSecrets
        if side == "source":
            host, secrets = self.spec.source, self.run.secrets.source
        else:
            host, secrets = self.dest, self.run.secrets.destination
        return SshTarget(host=host.host, port=host.port, username=host.username,
                         password=_reveal(secrets.password),
                         private_key=_reveal(secrets.private_key),
                         fingerprint=host.host_key_fingerprint)

    def _session(self, side: Literal["source", "destination"]
                 ) -> contextlib.AbstractAsyncContextManager[SshSession]:
        return ssh_session(self._target(side), self.ssh)

    @property
    def source_device(self) -> str:
        return self.spec.source.device

    @property
    def dest(self) -> ExistingHostDestinationOut:
        if not isinstance(self.spec.destination, ExistingHostDestinationOut):
            raise lvm.HostCheckFailed("live stream onto a new VM needs a cloud driver that "
                                      "can provision one; none is available")
        return self.spec.destination

    def _validated(self) -> LiveStreamValidateResult:
        return self.run.result_of("validate", LiveStreamValidateResult)

    async def run_step(self, ctx: StepContext) -> StepResult | None:
        steps: dict[str, Callable[[StepContext], Awaitable[StepResult]]] = {
            "validate": self._validate, "provision": self._provision,
            "precopy": self._precopy, "snapshot": self._snapshot,
            "transfer": self._transfer, "verify": self._verify,
        }
        return await steps[ctx.step.name](ctx)

    async def run_cleanup(self, ctx: StepContext, outcome: str) -> StepResult | None:
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

    async def _validate(self, ctx: StepContext) -> LiveStreamValidateResult:
        dest = self.dest
        async with self._session("source") as src:
            lv = await lvm.lv_info(src, self.source_device)
            lvm.check_source_lv(lv, self.source_device, src.label)
            snap_size = _round_up(self.options.snapshot_size_bytes or lv.size,
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
            info = await lvm.device_info(dst, dest.device)
            lvm.check_destination(info, lv.size, dest.overwrite_mounted, dst.label)
            if await lvm.boot_id(dst) == src_boot and lv.majmin in info.tree:
                raise lvm.HostCheckFailed(
                    f"destination {info.path} holds the source volume {self.source_device}")
            dst_python = await lvm.python_version(dst)
        helpers = Helpers(source=src_python is not None and not self.tuning.force_dd,
                          destination=dst_python is not None and not self.tuning.force_dd)
        if self.warm and not (helpers.source and helpers.destination):
            raise lvm.HostCheckFailed("sync: warm compares block hashes on both hosts and "
                                      "needs python3 (3.6 or newer) on both")
        for side, ok in (("source", helpers.source), ("destination", helpers.destination)):
            if not ok:
                await ctx.event("live_stream.dd_fallback", {"host": side, "reason": (
                    "no python3 >= 3.6" if not self.tuning.force_dd else "forced")})
        return LiveStreamValidateResult(
            size=lv.size, vg=lv.vg, lv=lv.lv, snapshot=self.snapshot,
            snapshot_size=snap_size, helpers=helpers,
            source_mounts=tuple(m.mountpoint for m in lv_dev.rw_mounts),
            destination=DestinationDevice(device=info.path, size=info.size,
                                          exclusive=not info.mounts and not info.swap))

    async def _provision(self, ctx: StepContext) -> StepResult:
        raise lvm.HostCheckFailed("no cloud driver can provision a live-stream destination")

    # -- precopy (warm mode) ------------------------------------------------------

    @property
    def warm(self) -> bool:
        return self.options.sync == "warm"

    async def _precopy(self, ctx: StepContext) -> LiveStreamPrecopyResult:
        """Delta passes from the running volume until one sends little enough."""
        size = self._validated().size
        limit = self.options.warm_delta_bytes or max(size // 100, 4 * 2**20)
        passes: list[WarmPass] = []
        async with self._session("source") as src, self._session("destination") as dst:
            for number in range(1, self.options.warm_max_passes + 1):
                if passes and self.tuning.warm_pause_seconds:
                    await asyncio.sleep(self.tuning.warm_pause_seconds)
                ctx.raise_if_cancelled()
                result = await self._delta(ctx, src, dst, self.source_device, size, 0)
                done = WarmPass(number=number, bytes=result.data_bytes,
                                changed_blocks=result.changed_blocks,
                                seconds=round(result.seconds, 3))
                passes.append(done)
                await ctx.event("live_stream.warm.pass", {
                    "pass": done.number, "bytes": done.bytes,
                    "changed_blocks": done.changed_blocks, "seconds": done.seconds})
                if result.data_bytes <= limit:
                    break
        return LiveStreamPrecopyResult(passes=tuple(passes))

    async def _delta(self, ctx: StepContext, src: SshSession, dst: SshSession, device: str,
                     size: int, start: int, reporter: _StreamReporter | None = None) -> DeltaResult:
        v = self._validated()
        throttle = self.options.throttle_bytes_per_second
        result = await delta_stream(
            HostDevice(src, device), HostDevice(dst, self.dest.device), size, start=start,
            throttle_bps=float(throttle) if throttle else None,
            exclusive=self._exclusive(v),
            on_durable=reporter.durable if reporter else None,
            on_progress=reporter.progress if reporter else None)
        await ctx.progress(size, size, force=True)
        return result

    def _exclusive(self, v: LiveStreamValidateResult) -> bool:
        return v.destination.exclusive and not self.dest.overwrite_mounted

    # -- snapshot ------------------------------------------------------------------

    async def _snapshot(self, ctx: StepContext) -> LiveStreamSnapshotResult:
        v = self._validated()
        vg, name = v.vg, self.snapshot
        async with self._session("source") as src:
            lv = await lvm.lv_info(src, self.source_device)
            if await lvm.remove_snapshot(src, vg, name):
                await ctx.event("live_stream.snapshot.stale_removed", {"snapshot": name})
            freeze = None
            if self.options.freeze:
                mounts = v.source_mounts
                freeze = mounts[0] if mounts else None
                if freeze is None:
                    await ctx.event("live_stream.freeze.skipped", {"reason": "not mounted"})
            await lvm.create_snapshot(src, lv, name, v.snapshot_size, freeze=freeze,
                                      freeze_seconds=self.options.freeze_timeout_seconds)
            status = await lvm.check_snapshot(src, vg, name)
        await ctx.event("live_stream.snapshot.created", {
            "snapshot": f"{vg}/{name}", "cow_bytes": status.size, "frozen": freeze})
        return LiveStreamSnapshotResult(name=name, vg=vg, path=f"/dev/{vg}/{name}",
                                        uuid=status.uuid, cow_bytes=status.size)

    # -- transfer ------------------------------------------------------------------

    async def _transfer(self, ctx: StepContext) -> LiveStreamTransferResult:
        v = self._validated()
        snap = self.run.result_of("snapshot", LiveStreamSnapshotResult)
        size, vg, name = v.size, v.vg, snap.name
        checkpoint = self.run.checkpoint_as(StreamCheckpoint)
        resume = 0
        if checkpoint is not None and checkpoint.snapshot_uuid == snap.uuid \
                and checkpoint.size == size:
            resume = checkpoint.offset
        helpers = v.helpers
        async with self._session("source") as src, self._session("destination") as dst:
            status = await lvm.check_snapshot(src, vg, name)
            if status.uuid != snap.uuid:
                raise lvm.HostCheckFailed(f"snapshot {vg}/{name} was replaced since the "
                                          "snapshot step; run the migration again")
            if resume:
                await ctx.event("live_stream.transfer.resumed", {"offset": resume})
            reporter = _StreamReporter(ctx, size, snap.uuid, resume,
                                 self.tuning.checkpoint_seconds)
            throttle = self.options.throttle_bytes_per_second
            try:
                async with reporter.running():
                    if self.warm:  # the last delta pass, from the snapshot
                        result: StreamResult | DeltaResult = await self._delta(
                            ctx, src, dst, snap.path, size, resume, reporter)
                    else:
                        result = await stream(
                            HostDevice(src, snap.path, helpers.source),
                            HostDevice(dst, self.dest.device, helpers.destination),
                            size, resume_from=resume,
                            throttle_bps=float(throttle) if throttle else None,
                            exclusive=self._exclusive(v), on_durable=reporter.durable,
                            on_progress=reporter.progress)
            except SourceReadError:
                await lvm.check_snapshot(src, vg, name)  # an overflow explains the I/O error
                raise
            await lvm.check_snapshot(src, vg, name)
        await ctx.checkpoint(StreamCheckpoint(snapshot_uuid=snap.uuid, size=size, offset=size))
        await ctx.progress(size, size, force=True)
        done = LiveStreamTransferResult(
            digest=result.digest, bytes=size, resumed_from=result.resumed_from,
            data_bytes=result.data_bytes, zero_bytes=result.zero_bytes,
            seconds=round(result.seconds, 3),
            # the frames went from one host's ssh straight into the other's
            handed_over=isinstance(result, StreamResult) and result.handed_over,
            zstd=isinstance(result, StreamResult) and result.compressed)
        payload: EventPayload = done.model_dump(mode="json", exclude={"digest"})
        await ctx.event("live_stream.transfer.completed", payload)
        return done

    # -- verify --------------------------------------------------------------------

    async def _verify(self, ctx: StepContext) -> LiveStreamVerifyResult:
        v = self._validated()
        size, expected = v.size, self.run.result_of("transfer", LiveStreamTransferResult).digest
        async with self._session("source") as src:
            await lvm.check_snapshot(src, v.vg, self.snapshot)
        async with self._session("destination") as dst:
            digest = await destination_digest(dst, self.dest.device, size,
                                              helper=v.helpers.destination)
        if digest != expected:
            raise VerifyMismatch(f"the destination's first {size} bytes have digest {digest}, "
                                 f"the source's {expected}")
        return LiveStreamVerifyResult(digest=digest)

    # -- cleanup -------------------------------------------------------------------

    async def _remove_snapshot(self, ctx: StepContext,
                               outcome: str) -> LiveStreamRemoveSnapshotResult:
        v = self._validated()
        async with self._session("source") as src:
            removed = await lvm.remove_snapshot(src, v.vg, self.snapshot)
        snapshot = f"{v.vg}/{self.snapshot}"
        if outcome != "completed":
            checkpoint = self.run.checkpoint_as(StreamCheckpoint)
            await ctx.event("live_stream.destination.incomplete", {
                "device": self.dest.device,
                "durable_offset": checkpoint.offset if checkpoint else 0,
                "outcome": outcome})
            return LiveStreamRemoveSnapshotResult(snapshot=snapshot, removed=removed,
                                        destination="incomplete")
        if self.dest.reboot_after:
            async with self._session("destination") as dst:
                # Detached and delayed, so this session closes cleanly first.
                await dst.run("nohup sh -c 'sleep 2; reboot' >/dev/null 2>&1 </dev/null &",
                              what="reboot")
            await ctx.event("live_stream.destination.rebooting", {})
            return LiveStreamRemoveSnapshotResult(snapshot=snapshot, removed=removed, rebooted=True)
        return LiveStreamRemoveSnapshotResult(snapshot=snapshot, removed=removed)


class _StreamReporter:
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
            await self.ctx.checkpoint(StreamCheckpoint(snapshot_uuid=self.uuid,
                                                       size=self.size, offset=self._durable))
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


def _reveal(secret: SecretStr | None) -> str | None:
    """A secret's value for the SSH login (the one place it leaves its wrapper)."""
    return None if secret is None else secret.get_secret_value()


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit if unit > 0 else value
