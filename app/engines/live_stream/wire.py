"""The service's side of the live-stream helper protocol (:mod:`.remote`).

How a helper is started (:func:`helper_command`), how its frames are encoded and parsed,
and how its errors are read back. The frame format is defined once, in
:mod:`app.engines.live_stream.remote` (the file shipped to the hosts); this module
imports its constants so the two ends cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from app.engines.live_stream import remote
from app.transports.ssh import quote_argv

HEAD = remote.HEAD
MAGIC = remote.MAGIC
DATA, ZERO, SYNC, END = remote.DATA, remote.ZERO, remote.SYNC, remote.END
#: Largest data frame the service sends or accepts.
MAX_FRAME = remote.MAX_FRAME
ERROR_PREFIX = "vmls-error "
#: Exit status of a helper whose output pipe closed (the service went away).
EXIT_PIPE = 4


@cache
def helper_script() -> bytes:
    """The helper's source text, exactly as shipped."""
    return Path(remote.__file__).read_bytes()


def helper_command(mode: str, *args: str | int) -> str:
    """Shell command that runs the helper in ``mode``; the caller then writes
    :func:`helper_script` to its stdin, followed by data for ``write`` mode."""
    size = len(helper_script())
    boot = f'import sys;exec(compile(sys.stdin.buffer.read({size}),"vmls-helper","exec"))'
    return f"python3 -c {shlex.quote(boot)} {size} {quote_argv(mode, *args)}"


def data_header(offset: int, length: int) -> bytes:
    return HEAD.pack(DATA, offset, length)


def zero_frame(offset: int, length: int) -> bytes:
    return HEAD.pack(ZERO, offset, length)


def sync_frame() -> bytes:
    return HEAD.pack(SYNC, 0, 0)


def end_frame(size: int, info: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(info or {}).encode()
    return HEAD.pack(END, size, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class HelperFailure:
    """What a helper reported on stderr before exiting non-zero."""

    kind: str
    message: str
    errno: str | None = None
    offset: int | None = None


def parse_failure(stderr: str) -> HelperFailure | None:
    """The last ``vmls-error`` line of a helper's stderr, if any."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(ERROR_PREFIX):
            try:
                data = json.loads(line[len(ERROR_PREFIX):])
            except ValueError:
                continue
            offset = data.get("offset")
            return HelperFailure(str(data.get("kind", "unknown")), str(data.get("message", "")),
                                 str(data["errno"]) if data.get("errno") else None,
                                 int(offset) if isinstance(offset, int) else None)
    return None


def failure_text(stderr: str) -> str:
    """A one-line reason from a helper's (or dd's) stderr."""
    failure = parse_failure(stderr)
    if failure is not None:
        return failure.message
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return " ".join(lines[-3:])[-400:] if lines else "no error output"


# --- the dd path (hosts without python3) --------------------------------------------

#: Block size of the dd path: resume offsets and dd segments are multiples of it.
DD_BLOCK = 1024 * 1024


def dd_read_command(device: str, start: int) -> str:
    """POSIX dd reading ``device`` from ``start`` (a multiple of :data:`DD_BLOCK`) to
    its end: snapshot devices are exactly the size being streamed."""
    return quote_argv("dd", f"if={device}", f"bs={DD_BLOCK}", f"skip={start // DD_BLOCK}")


def dd_write_command(device: str, offset: int) -> str:
    """dd writing its stdin to ``device`` at ``offset`` (a multiple of :data:`DD_BLOCK`),
    flushed to stable storage before it exits (``conv=fsync``)."""
    return quote_argv("dd", f"of={device}", f"bs={DD_BLOCK}", f"seek={offset // DD_BLOCK}",
                      "conv=notrunc,fsync")


def dd_digest_command(device: str, size: int) -> str:
    """Shell printing the SHA-256 of each ``vmd1`` block of ``device``'s first ``size``
    bytes, one per line (dd and sha256sum only): :func:`vmd1_from_block_hashes` turns
    them into the digest."""
    block = remote.BLOCK
    full, rest = divmod(size, block)
    dev = shlex.quote(device)
    script = (f"i=0; while [ $i -lt {full} ]; do dd if={dev} bs={block} skip=$i count=1 "
              f"2>/dev/null | sha256sum || exit 1; i=$((i+1)); done")
    if rest:
        script += (f"; dd if={dev} bs={block} skip={full} count=1 2>/dev/null "
                   f"| head -c {rest} | sha256sum")
    return script


def vmd1_from_block_hashes(size: int, lines: Sequence[str]) -> str:
    """The ``vmd1`` digest from per-block SHA-256 hex digests (``sha256sum`` lines)."""
    blocks = -(-size // remote.BLOCK)
    hashes = [ln.split()[0] for ln in lines if ln.strip()]
    if len(hashes) != blocks:
        raise ValueError(f"expected {blocks} block hashes, got {len(hashes)}")
    outer = hashlib.sha256(size.to_bytes(8, "big"))
    for h in hashes:
        outer.update(bytes.fromhex(h))
    return f"vmd1:{outer.hexdigest()}"
