"""``vmigrate``: serve the API, run workers, manage the database and tokens, convert images."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from app.config import Settings
    from app.db import Database

# Only what a command needs is imported when it runs: `vmigrate convert` and `info`
# must not pay for the settings model, SQLAlchemy or the web app (about 0.6 s).


def _settings() -> Settings:
    from app.config import Settings

    return Settings()


@click.group()
def main() -> None:
    """vmigrate: migrate virtual machines and their disks between hypervisors and clouds."""


def _logging(settings: Settings) -> None:
    from app.logs import configure

    configure(settings.log_level, settings.log_format)


def _address(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "127.0.0.1", int(port)


def _metrics_listener(address: tuple[str, int] | None) -> Callable[[], None]:
    """Start the unauthenticated metrics listener (``--metrics-address``), if asked."""
    if address is None:
        return lambda: None
    from app.metrics import listen

    try:
        close = listen(*address)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {address[0]}:{address[1]}: "
                                   f"{exc.strerror or exc}") from exc
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", *address)
    return close


_METRICS_HELP = ("Serve Prometheus metrics at http://HOST:PORT/metrics (no authentication: "
                 "bind loopback or a private address).")


class _Stopped(Exception):
    """SIGTERM/SIGINT outside uvicorn's own handling (while starting, or re-raised by
    uvicorn after its graceful shutdown)."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


@main.command()
@click.option("--host", default=None, help="Bind address (default: VMIGRATE_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: VMIGRATE_PORT or 8080).")
@click.option("--no-worker", is_flag=True, help="Serve the API only; run `vmigrate worker` "
              "processes separately.")
@click.option("--keep-db", is_flag=True, help="Leave the embedded PostgreSQL running on exit "
              "(by default serve stops it if serve started it).")
@click.option("--metrics-address", metavar="HOST:PORT", help=_METRICS_HELP + " GET /metrics "
              "on the API (scope metrics:read) is there either way.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Run N API processes, and VMIGRATE_SERVE_WORKER_PROCESSES migration "
              "workers as processes of their own (none with --no-worker). Unset: one "
              "process serving the API with a worker inside it.")
def serve(host: str | None, port: int | None, no_worker: bool, keep_db: bool,
          metrics_address: str | None, workers: int | None) -> None:
    """Run the HTTP API and a worker until SIGTERM/SIGINT.

    With no VMIGRATE_DATABASE_URL, the embedded PostgreSQL under DATA_DIR/postgres is
    used: started if it is not running, and then stopped again on exit (unless
    --keep-db). A port that is taken is reported before anything starts."""
    import signal

    from pydantic import SecretStr

    from app import pgserver
    from app.server import PortInUse, bind

    settings = _settings()
    _logging(settings)
    host, port = host or settings.host, port or settings.port
    try:
        sock = bind(host, port)
    except PortInUse as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        stop_metrics = _metrics_listener(_address(metrics_address))
    except click.ClickException:
        sock.close()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stopped)
    started: pgserver.Started | None = None
    ok = True
    try:
        if settings.database_url is None:
            logging.getLogger(__name__).info(
                "no VMIGRATE_DATABASE_URL: using the embedded PostgreSQL in %s",
                settings.postgres_dir)
            started = pgserver.start(settings.postgres_dir)
            settings = settings.model_copy(update={"database_url": SecretStr(started.url)})
        from app.main import create_app
        from app.server import serve as run_server
        from app.server import serve_processes

        if workers is not None:
            serve_processes(settings, sock, log_level=settings.log_level.lower(),
                            workers=workers,
                            migration_workers=0 if no_worker else settings.serve_worker_processes)
        else:
            ok = run_server(create_app(settings, run_worker=not no_worker), sock,
                            log_level=settings.log_level.lower())
    except _Stopped:
        pass
    finally:
        sock.close()
        stop_metrics()
        if started is not None and started.started_here and not keep_db:
            # A second signal must not leave the database half stopped (pg_ctl's own
            # timeout bounds the wait).
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            pgserver.stop(settings.postgres_dir)
        elif started is not None:
            logging.getLogger(__name__).info(
                "the embedded PostgreSQL keeps running (pid %s); `vmigrate db stop` stops it",
                started.pid)
    if not ok:
        raise click.ClickException("the server did not start (see the log above)")


@main.command()
@click.option("--metrics-address", metavar="HOST:PORT", help=_METRICS_HELP)
def worker(metrics_address: str | None) -> None:
    """Run a worker: claim queued migrations and run them until SIGTERM/SIGINT, then hand
    running ones back so another worker resumes them at once. Webhook deliveries are
    dispatched alongside."""
    import signal

    from app.main import build_context, run_background

    settings = _settings()
    _logging(settings)
    stop_metrics = _metrics_listener(_address(metrics_address))

    async def run() -> None:
        ctx = await build_context(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run_background(ctx, stop)
        finally:
            await ctx.db.dispose()

    try:
        asyncio.run(run())
    finally:
        stop_metrics()


@main.command()
@click.option("--metrics-address", metavar="HOST:PORT", help=_METRICS_HELP)
def dispatch(metrics_address: str | None) -> None:
    """Deliver webhooks only (no migrations) until SIGTERM/SIGINT."""
    import signal

    from app.main import build_context, build_dispatcher

    settings = _settings()
    _logging(settings)
    stop_metrics = _metrics_listener(_address(metrics_address))

    async def run() -> None:
        ctx = await build_context(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await build_dispatcher(ctx).run(stop)
        finally:
            await ctx.db.dispose()

    try:
        asyncio.run(run())
    finally:
        stop_metrics()


@main.group()
def db() -> None:
    """Database maintenance."""


async def _open_db(settings: Settings) -> Database:
    from app.db import Database
    from app.main import database_url

    return Database(await database_url(settings))


def _pgdata() -> Path:
    settings = _settings()
    if settings.database_url is not None:
        raise click.ClickException(
            "VMIGRATE_DATABASE_URL is set: that database is managed outside vmigrate; "
            "db status|start|stop manage the embedded one (DATA_DIR/postgres)")
    return settings.postgres_dir


@db.command("status")
def db_status() -> None:
    """Whether the embedded PostgreSQL (DATA_DIR/postgres) runs: exit status 0 when it
    does, 3 when it does not."""
    from app import pgserver

    current = pgserver.status(_pgdata())
    click.echo(current.describe())
    if not current.running:
        sys.exit(3)


@db.command("start")
def db_start() -> None:
    """Start the embedded PostgreSQL (creating it if new) and leave it running: serve,
    workers and other commands then share it, and serve does not stop it on exit."""
    from app import pgserver

    pgdata = _pgdata()
    started = pgserver.start(pgdata)
    click.echo(("started" if started.started_here else "already running") + ": "
               + pgserver.status(pgdata).describe().removeprefix("running: "))


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (a clean, fast shutdown: open sessions are ended;
    stop serve and workers first)."""
    from app import pgserver

    pgdata = _pgdata()
    try:
        stopped = pgserver.stop(pgdata)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stopped: {pgdata}" if stopped else pgserver.status(pgdata).describe())


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations up to head."""
    from app.db import current_revision, upgrade

    async def run() -> str | None:
        database = await _open_db(_settings())
        try:
            await upgrade(database)
            return await current_revision(database)
        finally:
            await database.dispose()

    click.echo(f"database schema at {asyncio.run(run())}")


@main.group()
def tokens() -> None:
    """API tokens."""


class _TokensCreate(click.Command):
    """``tokens create``: its help ends with the valid scopes (read from the service when
    the help is shown, so other commands never import it)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from app.services.tokens import SCOPE_HELP

        with formatter.section("Scopes (AREA:write implies AREA:read)"):
            formatter.write_dl(list(SCOPE_HELP.items()))
        super().format_epilog(ctx, formatter)


@tokens.command("create", cls=_TokensCreate)
@click.option("--tenant", required=True, help="The tenant the token acts for.")
@click.option("--scopes", default=None,
              help="Comma-separated scopes (listed below), e.g. migrations:write,clouds:write.")
@click.option("--all-scopes", is_flag=True,
              help="Every scope: migrations:write, clouds:write, images:write and "
              "webhooks:write (each implies its :read).")
@click.option("--name", default="", help="A label to recognise the token by.")
def tokens_create(tenant: str, scopes: str | None, all_scopes: bool, name: str) -> None:
    """Create a token and print it once (only its hash is stored). Give --scopes or
    --all-scopes."""
    from app.db import upgrade
    from app.errors import AppError
    from app.services.tokens import ALL_SCOPES, create_token

    if (scopes is None) == (not all_scopes):
        raise click.UsageError("give either --scopes or --all-scopes")
    wanted = list(ALL_SCOPES) if all_scopes else [
        s.strip() for s in (scopes or "").split(",") if s.strip()]

    async def run() -> str:
        database = await _open_db(_settings())
        try:
            await upgrade(database)
            async with database.session() as session:
                _, token = await create_token(session, tenant, wanted, name)
            return token
        finally:
            await database.dispose()

    try:
        click.echo(asyncio.run(run()))
    except AppError as exc:
        raise click.ClickException(str(exc)) from exc


@tokens.command("revoke")
@click.argument("prefix")
def tokens_revoke(prefix: str) -> None:
    """Revoke the token whose first 12 characters are PREFIX."""
    from app.services.tokens import revoke_token

    async def run() -> int:
        database = await _open_db(_settings())
        try:
            async with database.session() as session:
                return await revoke_token(session, prefix)
        finally:
            await database.dispose()

    count = asyncio.run(run())
    if not count:
        raise click.ClickException(f"no active token starts with {prefix!r}")
    click.echo(f"revoked {count} token(s)")


@main.group()
def keys() -> None:
    """Encryption keys for credentials at rest."""


@keys.command("rotate")
@click.option("--batch-size", type=click.IntRange(1, 10000), default=200, show_default=True)
def keys_rotate(batch_size: int) -> None:
    """Re-encrypt every stored secret under the newest key.

    Put the new key first in VMIGRATE_ENCRYPTION_KEYS (keeping the old ones after it)
    on every process, run this, then remove the old keys.
    """
    from app.crypto import SecretBox, load_keys
    from app.db import upgrade
    from app.services.keys import RotationReport, rotate_keys

    settings = _settings()

    async def run() -> RotationReport:
        box = SecretBox(load_keys(
            [k.get_secret_value() for k in settings.encryption_keys], settings.key_file
        ))
        database = await _open_db(settings)
        try:
            await upgrade(database)
            return await rotate_keys(database, box, batch_size=batch_size)
        finally:
            await database.dispose()

    report = asyncio.run(run())
    for column, count in report.rotated.items():
        click.echo(f"{column}: re-encrypted {count}")
    if report.skipped:
        click.echo(f"{report.skipped} row(s) changed during rotation; run again to be sure")
    if report.unreadable:
        rows = ", ".join(f"{column} {row_id}" for column, row_id in report.unreadable)
        raise click.ClickException(f"no configured key opens: {rows}")


SETTINGS_START = "<!-- settings:start -->"
SETTINGS_END = "<!-- settings:end -->"


@main.command("config")
@click.option("--markdown", is_flag=True,
              help="Print the reference table of every setting (env var, default, "
              "description) instead of the values in effect.")
@click.option("--readme", type=click.Path(exists=True, dir_okay=False, writable=True,
                                          path_type=Path),
              help="With --markdown: write the table into this file between "
              f"'{SETTINGS_START}' and '{SETTINGS_END}' instead of printing it.")
def config(markdown: bool, readme: Path | None) -> None:
    """Show the settings (VMIGRATE_* environment variables): the values this process would
    use (secrets masked), or with --markdown the reference table the README holds."""
    from app.config import settings_in_effect, settings_markdown

    if not markdown:
        if readme is not None:
            raise click.UsageError("--readme goes with --markdown")
        rows = settings_in_effect(_settings())
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            click.echo(f"{name:<{width}}  {value}")
        return
    table = settings_markdown()
    if readme is None:
        click.echo(table, nl=False)
        return
    _write_section(readme, SETTINGS_START, SETTINGS_END, table)
    click.echo(f"{readme}: settings table written ({table.count(chr(10)) - 2} settings)")


WHAT_WORKS_START = "<!-- what-works:start -->"
WHAT_WORKS_END = "<!-- what-works:end -->"


@main.command("platforms")
@click.option("--readme", type=click.Path(exists=True, dir_okay=False, writable=True,
                                          path_type=Path),
              help=f"Write the table into this file between '{WHAT_WORKS_START}' and "
              f"'{WHAT_WORKS_END}' instead of printing it.")
def platforms(readme: Path | None) -> None:
    """Which cloud kinds this build can migrate from and to, per migration type (derived
    from the registered drivers and engines; the README's "What works" table)."""
    from app.drivers.registry import what_works

    table = what_works().markdown()
    if readme is None:
        click.echo(table, nl=False)
        return
    _write_section(readme, WHAT_WORKS_START, WHAT_WORKS_END, table)
    click.echo(f"{readme}: what-works table written")


def _write_section(path: Path, start: str, end: str, body: str) -> None:
    try:
        text = replace_between(path.read_text(), start, end, body)
    except ValueError as exc:
        raise click.ClickException(f"{path}: {exc}") from exc
    path.write_text(text)


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what lies between the lines ``start`` and ``end`` replaced by
    ``body``. Raises ValueError unless each marker occurs exactly once, start first."""
    head, _, tail = _split_markers(text, start, end)
    return f"{head}{start}\n{body}{end}{tail}"


def between(text: str, start: str, end: str) -> str:
    """What lies between the markers (as :func:`replace_between` writes it)."""
    return _split_markers(text, start, end)[1].removeprefix("\n")


def _split_markers(text: str, start: str, end: str) -> tuple[str, str, str]:
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"needs exactly one {start!r} and one {end!r}")
    if text.index(end) < text.index(start):
        raise ValueError(f"{end!r} comes before {start!r}")
    head, rest = text.split(start, 1)
    inner, tail = rest.split(end, 1)
    return head, inner, tail


@main.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
def openapi(as_json: bool) -> None:
    """Print the OpenAPI document (the checked-in openapi.yaml is this output)."""
    from app.main import create_app

    spec = create_app(_settings()).openapi()
    if as_json:
        import json

        click.echo(json.dumps(spec, indent=2, sort_keys=False))
    else:
        sys.stdout.write(render_openapi_yaml(spec))


def render_openapi_yaml(spec: dict[str, object]) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)


def _add_image_commands() -> None:
    from app.commands.images import images_commands

    for command in images_commands:
        main.add_command(command)


_add_image_commands()


def run() -> NoReturn:
    """The ``vmigrate`` command: :func:`main` as a program. After ``convert`` or
    ``info`` has finished its work, the process ends without the interpreter's
    teardown (freeing every object and module one by one): measured from the end of the
    command to the parent seeing the exit, 18-22 ms instead of 3 ms, about 3 % of
    converting the benchmark's 4 GiB image. Every other command, and an image command
    that failed, exits the ordinary way."""
    try:
        main()
    except SystemExit as exc:
        from app.commands import images

        if not images.finished or not isinstance(exc.code, int | None):
            raise
        status = exc.code or 0
    else:  # pragma: no cover - click's standalone mode always exits
        raise SystemExit(0)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        status = status or 120  # what the interpreter returns when it cannot flush
    os._exit(status)


if __name__ == "__main__":
    run()
