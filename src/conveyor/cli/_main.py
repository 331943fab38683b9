from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from conveyor._loop import EventLoop
from conveyor._loop import run as run_loop
from conveyor._sqlite import parse_url as parse_sqlite_url
from conveyor._urls import redact
from conveyor.brokers import broker_from_url
from conveyor.cli._output import console, error_line, errors, fit, styled, when
from conveyor.errors import ConfigError, ConveyorError
from conveyor.observability import FORMATS, configure_logging
from conveyor.runtime import (
    App,
    QueueRow,
    iter_dead_letters,
    purge_dead_letters,
    queue_overview,
    replay_dead_letters,
)
from conveyor.sagas import SagaRecord
from conveyor.settings import LOG_LEVELS, Settings, load_settings
from conveyor.store import DeadLetterFilter, DeadLetterRecord, store_from_url

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="conveyor",
    help="Reliable asynchronous operations between services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
dlq = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")

BrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="Broker URL (default: CONVEYOR_BROKER_URL).")
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store URL (default: CONVEYOR_STORE_URL).")
]
EnvOpt = Annotated[
    Path | None, typer.Option("--env-file", help="Read CONVEYOR_* settings from this file.")
]
LogOpt = Annotated[
    str | None,
    typer.Option(
        "--log-level",
        help=f"{', '.join(LOG_LEVELS)} (default: CONVEYOR_LOG_LEVEL, else INFO).",
    ),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="text or json: one JSON object per line (default: CONVEYOR_LOG_FORMAT).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON: one object per line.")]


class _Exit(Exception):
    """A command-line mistake: printed as one ``error:`` line, exit 1."""


def main() -> None:
    """Entry point: run the CLI; any ConveyorError is one line and exit 1."""
    try:
        app()
    except (ConveyorError, _Exit) as exc:
        errors.print(error_line(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _version(value: bool) -> None:
    if value:
        from conveyor import __version__

        console.print(f"conveyor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Reliable asynchronous operations between services."""


def _fail(message: str) -> NoReturn:
    raise _Exit(message)


def _setup_logging(level: str | None, fmt: str | None = None) -> None:
    """Log records to stderr at ``level`` in ``fmt`` (CLI options, or
    CONVEYOR_LOG_LEVEL / CONVEYOR_LOG_FORMAT, checked by the settings; INFO
    and text until they are loaded)."""
    wanted = (level or os.environ.get("CONVEYOR_LOG_LEVEL") or "INFO").strip().upper()
    form = (fmt or os.environ.get("CONVEYOR_LOG_FORMAT") or "text").strip().lower()
    configure_logging(
        level=wanted if wanted in LOG_LEVELS else "INFO",
        format=form if form in FORMATS else "text",
    )


def _settings(
    broker: str | None = None,
    store: str | None = None,
    env_file: Path | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    **overrides: object,
) -> Settings:
    """The settings of a command: its options over CONVEYOR_* variables over
    ``--env-file``; logging is set up first, so that a warning about an
    unknown variable is printed like any other."""
    _setup_logging(log_level, log_format)
    settings = load_settings(
        env_file,
        broker_url=broker,
        store_url=store,
        log_level=log_level,
        log_format=log_format,
        **overrides,
    )
    _setup_logging(settings.log_level, settings.log_format)
    # A bad URL is an error even for a command that then has nothing to read.
    broker_from_url(settings.broker_url)
    store_from_url(settings.resolved_store_url)
    return settings


def _run(make: Callable[[], Coroutine[Any, Any, T]], loop: EventLoop = "asyncio") -> T:
    try:
        return run_loop(make(), loop)
    except ConveyorError as exc:
        errors.print(error_line(exc))
        raise typer.Exit(1) from None


def _import(target: str, what: str) -> object:
    module_name, _, attr = target.partition(":")
    if not module_name:
        _fail(f"expected MODULE:{what.upper()}, got {target!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"cannot import {module_name!r}: {exc}")
    return getattr(module, attr or what, None)


def _load_app(target: str) -> App:
    obj = _import(target, "app")
    if not isinstance(obj, App):
        _fail(f"{target!r} is not a conveyor.App (found {type(obj).__name__})")
    return obj


def _missing_database(settings: Settings, *, broker: bool = False) -> str | None:
    """The path of a SQLite file the settings name for the store (and, with
    ``broker``, for the broker) that does not exist yet. Read-only commands
    answer "nothing there" instead of creating it."""
    urls = [settings.resolved_store_url]
    if broker:
        urls.append(settings.broker_url)
    for url in urls:
        if url.startswith("sqlite:"):
            path, _ = parse_sqlite_url(url)
            if path != ":memory:" and not Path(path).exists():
                return path
    return None


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, default=str) + "\n")


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="The application, as MODULE:APP.")],
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
    grace_period: Annotated[
        float | None, typer.Option(help="Seconds to finish in-flight work on SIGTERM.")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1, max=65535, help="Serve /metrics, /healthz, /readyz here (CONVEYOR_METRICS_PORT)."
        ),
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Interface for --metrics-port (default 127.0.0.1).")
    ] = None,
    tracing: Annotated[
        bool | None,
        typer.Option(
            "--tracing/--no-tracing",
            help="OpenTelemetry spans, exported as OTEL_* says (CONVEYOR_TRACING).",
        ),
    ] = None,
) -> None:
    """Run the handlers of MODULE:APP until SIGTERM/SIGINT (graceful shutdown)."""
    _setup_logging(log_level, log_format)
    application = _load_app(target)
    overrides = {
        "broker_url": broker,
        "store_url": store,
        "grace_period": grace_period,
        "log_level": log_level,
        "log_format": log_format,
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,
        "tracing": tracing,
    }
    if env_file is not None:
        # The file's settings under the environment's and the options'.
        application.settings = load_settings(env_file, **overrides)
    elif any(v is not None for v in overrides.values()):
        base = application.settings.model_dump()
        base.update({k: v for k, v in overrides.items() if v is not None})
        application.settings = load_settings(**base)
    _setup_logging(application.settings.log_level, application.settings.log_format)
    _run(lambda: _observed(application), application.settings.event_loop)


async def _observed(application: App) -> None:
    """Run the app's worker with the metrics server and tracing its settings ask for."""
    settings = application.settings
    tracing = None
    if settings.tracing:
        from conveyor.observability.tracing import Tracing

        tracing = Tracing(application)
    try:
        await _with_metrics(application)
    finally:
        if tracing is not None:
            tracing.shutdown()


async def _with_metrics(application: App) -> None:
    settings = application.settings
    if settings.metrics_port is None:
        await application.run()
        return
    from conveyor.observability.metrics import Metrics, serve

    metrics = Metrics(application)
    started = asyncio.Event()
    server = asyncio.create_task(
        serve(
            application,
            metrics,
            port=settings.metrics_port,
            host=settings.metrics_host,
            ready_event=started,
        )
    )
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait({server, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if server.done():
        server.result()  # the port could not be served: say why, do not start
    try:
        await application.run()
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


@app.command()
def workers(
    show_all: Annotated[
        bool, typer.Option("--all", help="Also workers whose heartbeat went stale.")
    ] = False,
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Live workers, from their heartbeats in the store: host, pid, handlers,
    started, last seen, messages in hand and handled."""
    from conveyor.runtime._heartbeat import WorkerInfo
    from conveyor.runtime._heartbeat import workers as read_workers

    settings = _settings(broker, store, env_file, log_level, log_format)
    found: list[WorkerInfo] = []
    if _missing_database(settings) is None:

        async def go() -> list[WorkerInfo]:
            async with App("cli", settings=settings) as application:
                return await read_workers(application.store)

        found = _run(go)
    now = time.time()
    shown = [w for w in found if show_all or w.live(now)]
    if as_json:
        for w in shown:
            _print_json({**dataclasses.asdict(w), "live": w.live(now)})
        return
    if not shown:
        console.print(styled("no live workers", "dim"))
        return
    table = Table(title=f"Workers ({len(shown)})")
    for col in (
        "id",
        "app",
        "host",
        "pid",
        "handlers",
        "started",
        "last seen",
        "in flight",
        "handled",
    ):
        table.add_column(col, justify="right" if col in ("pid", "in flight", "handled") else "left")
    for w in shown:
        seen = f"{now - w.last_seen:.0f}s ago" + ("" if w.live(now) else " (stale)")
        table.add_row(
            w.id,
            w.app,
            w.host,
            str(w.pid),
            ", ".join(f"{t}/{g}" for t, g in w.handlers),
            when(w.started_at),
            seen,
            str(w.in_flight),
            str(w.processed),
        )
    console.print(table)


@app.command()
def relay(
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Publish committed outbox rows to the broker (needed only when the store
    is not the broker's database and no worker is running)."""
    settings = _settings(broker, store, env_file, log_level, log_format)
    _run(App("relay", settings=settings).run, settings.event_loop)


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="The job API, as MODULE:ATTR (a JobAPI).")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes.")] = 1,
    max_header_bytes: Annotated[
        int | None,
        typer.Option(
            help="Largest request head, line and headers, in bytes; 431 beyond "
            "(default: CONVEYOR_HTTP_MAX_HEADER_BYTES, else 16384)."
        ),
    ] = None,
    max_headers: Annotated[
        int | None,
        typer.Option(
            help="Most header fields of a request; 431 beyond "
            "(default: CONVEYOR_HTTP_MAX_HEADERS, else 100)."
        ),
    ] = None,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request's head and body may take to arrive; 408 and "
            "disconnect beyond (default: CONVEYOR_HTTP_REQUEST_TIMEOUT, else 30)."
        ),
    ] = None,
    keep_alive: Annotated[
        int | None,
        typer.Option(
            help="Seconds an idle connection is kept between requests "
            "(default: CONVEYOR_HTTP_KEEP_ALIVE, else 5)."
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(
            help="Connections and requests at once per process; 503 beyond "
            "(default: CONVEYOR_HTTP_MAX_CONNECTIONS, else 1000)."
        ),
    ] = None,
    unauthenticated_limit: Annotated[
        str | None,
        typer.Option(
            help="Requests without a valid API key per client address, as '10/s', or "
            "'off'; 429 beyond (default: CONVEYOR_HTTP_UNAUTHENTICATED_LIMIT, else 10/s)."
        ),
    ] = None,
    metrics: Annotated[
        bool | None,
        typer.Option(
            "--metrics/--no-metrics",
            help="Serve /metrics beside the API (CONVEYOR_METRICS); --workers share "
            "their counts through prometheus-client's multiprocess mode.",
        ),
    ] = None,
    tracing: Annotated[
        bool | None,
        typer.Option(
            "--tracing/--no-tracing",
            help="Requests as server spans, exported as OTEL_* says (CONVEYOR_TRACING).",
        ),
    ] = None,
    ssl_certfile: Annotated[
        Path | None,
        typer.Option(help="Serve HTTPS with this certificate (PEM; with --ssl-keyfile)."),
    ] = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option(help="The private key of --ssl-certfile (PEM).")
    ] = None,
    ssl_ca_certs: Annotated[
        Path | None,
        typer.Option(
            help="Mutual TLS: accept only clients presenting a certificate this CA signed."
        ),
    ] = None,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Serve the HTTP job API MODULE:ATTR (a conveyor.http.JobAPI) with uvicorn.

    --broker, --store, the limits and the CONVEYOR_* lines of --env-file
    become environment variables before the module is imported (in every
    server process), for an App built from the environment. Jobs run in
    `conveyor worker MODULE:APP` processes."""
    _setup_logging(log_level, log_format)
    if env_file is not None:
        if not env_file.is_file():
            _fail(f"settings file {str(env_file)!r} does not exist")
        from dotenv import dotenv_values

        for name, value in dotenv_values(env_file).items():
            if name.upper().startswith("CONVEYOR_") and value is not None:
                os.environ.setdefault(name.upper(), value)
    given: tuple[tuple[str, object], ...] = (
        ("CONVEYOR_BROKER_URL", broker),
        ("CONVEYOR_STORE_URL", store),
        ("CONVEYOR_LOG_LEVEL", log_level),
        ("CONVEYOR_LOG_FORMAT", log_format),
        ("CONVEYOR_HTTP_MAX_HEADER_BYTES", max_header_bytes),
        ("CONVEYOR_HTTP_MAX_HEADERS", max_headers),
        ("CONVEYOR_HTTP_REQUEST_TIMEOUT", request_timeout),
        ("CONVEYOR_HTTP_KEEP_ALIVE", keep_alive),
        ("CONVEYOR_HTTP_MAX_CONNECTIONS", max_connections),
        ("CONVEYOR_HTTP_UNAUTHENTICATED_LIMIT", unauthenticated_limit),
        ("CONVEYOR_METRICS", metrics),
        ("CONVEYOR_TRACING", tracing),
    )
    for variable, option in given:
        if option is not None:
            os.environ[variable] = str(option)
    settings = load_settings()  # a bad value stops here, in one line
    tls = _serve_tls(ssl_certfile, ssl_keyfile, ssl_ca_certs)
    shared = None
    if settings.metrics and workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Several processes behind one port: a scrape reaches any one of
        # them, so they keep their counts in files every one of them reads.
        shared = tempfile.mkdtemp(prefix="conveyor-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
    try:
        _serve(target, host=host, port=port, workers=workers, settings=settings, tls=tls)
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)


def _serve_tls(cert: Path | None, key: Path | None, ca: Path | None) -> dict[str, object]:
    """uvicorn's TLS options from --ssl-*, each file checked first."""
    for option, path in (("--ssl-certfile", cert), ("--ssl-keyfile", key), ("--ssl-ca-certs", ca)):
        if path is not None and not path.is_file():
            _fail(f"{option} {str(path)!r}: no such file")
    if (cert is None) != (key is None):
        _fail("--ssl-certfile and --ssl-keyfile go together")
    if ca is not None and cert is None:
        _fail("--ssl-ca-certs (client certificates) needs --ssl-certfile and --ssl-keyfile")
    if cert is None:
        return {}
    import ssl

    options: dict[str, object] = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if ca is not None:
        options |= {"ssl_ca_certs": str(ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def _serve(
    target: str,
    *,
    host: str,
    port: int,
    workers: int,
    settings: Settings,
    tls: dict[str, object],
) -> None:
    from conveyor.http import JobAPI

    if ":" not in target:
        _fail(f"expected MODULE:ATTR, got {target!r}")
    api = _import(target, "api")
    if not isinstance(api, JobAPI):
        _fail(f"{target!r} is not a conveyor.http.JobAPI (found {type(api).__name__})")
    from conveyor.http._serve import serve as run_server

    _setup_logging(api.app.settings.log_level, api.app.settings.log_format)
    run_server(
        target if workers > 1 else api,
        host=host,
        port=port,
        workers=workers,
        settings=settings,
        log_config=None,
        access_log=False,
        **tls,
    )


keys_cli = typer.Typer(help="API keys of the HTTP job API.", no_args_is_help=True)
app.add_typer(keys_cli, name="keys")


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="The key's name (owner of its jobs).")],
    scope: Annotated[
        list[str] | None,
        typer.Option(help="jobs (default), admin:read or admin:write; repeatable."),
    ] = None,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Create an API key; prints the secret, which is shown only this once."""
    from conveyor.http import ApiKeys

    settings = _settings(broker, store, env_file, log_level, log_format)

    async def go() -> str:
        async with App("cli", settings=settings) as application:
            return await ApiKeys(application).create(name, scopes=scope or ("jobs",))

    console.print(_run(go), soft_wrap=True)


@keys_cli.command("list")
def keys_list(
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """List API keys by name (the secrets are not stored, only their hashes)."""
    from conveyor.http import ApiKey, ApiKeys

    settings = _settings(broker, store, env_file, log_level, log_format)
    keys: list[ApiKey] = []
    if _missing_database(settings) is None:

        async def go() -> list[ApiKey]:
            async with App("cli", settings=settings) as application:
                return await ApiKeys(application).list()

        keys = _run(go)
    if as_json:
        for key in keys:
            _print_json(
                {"name": key.name, "created_at": key.created_at, "scopes": sorted(key.scopes)}
            )
        return
    if not keys:
        console.print(styled("no API keys", "dim"))
        return
    table = Table(title=f"API keys ({len(keys)})")
    table.add_column("name")
    table.add_column("created")
    table.add_column("scopes")
    for key in keys:
        table.add_row(key.name, when(key.created_at), " ".join(sorted(key.scopes)))
    console.print(table)


@keys_cli.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from conveyor.http import ApiKeys

    settings = _settings(broker, store, env_file, log_level, log_format)
    if _missing_database(settings) is not None:
        _fail(f"no API key named {name!r} (see `conveyor keys list`)")

    async def go() -> bool:
        async with App("cli", settings=settings) as application:
            return await ApiKeys(application).revoke(name)

    if not _run(go):
        _fail(f"no API key named {name!r} (see `conveyor keys list`)")
    console.print(f"revoked API key {name!r}")


@app.command()
def publish(
    topic: Annotated[str, typer.Argument(help="Topic to publish to.")],
    payload: Annotated[str, typer.Argument(help="JSON payload ('-' reads stdin).")],
    key: Annotated[str | None, typer.Option(help="Ordering key.")] = None,
    type_: Annotated[str, typer.Option("--type", help="Message type.")] = "",
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="NAME=VALUE, repeatable.")
    ] = None,
    priority: Annotated[int, typer.Option(help="Higher is delivered first.")] = 0,
    delay: Annotated[float, typer.Option(help="Seconds before delivery.")] = 0.0,
    broker: BrokerOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Publish one message; prints its id once the broker has it."""
    text = sys.stdin.read() if payload == "-" else payload
    try:
        body = json.loads(text)
    except ValueError as exc:
        _fail(f"payload is not valid JSON: {exc}")
    headers = {}
    for item in header or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _fail(f"header {item!r} must be NAME=VALUE")
        headers[name] = value
    settings = _settings(broker, None, env_file, log_level, log_format)

    async def go() -> str:
        async with App("cli", settings=settings) as application:
            message = await application.publish(
                topic, body, key=key, type=type_, headers=headers, priority=priority, delay=delay
            )
            return message.id

    console.print(_run(go))


@app.command()
def queues(
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Ready, in-flight, delayed and dead messages per topic and group."""
    settings = _settings(broker, store, env_file, log_level, log_format)
    rows: list[QueueRow] = []
    if _missing_database(settings, broker=True) is None:

        async def go() -> list[QueueRow]:
            async with App("cli", settings=settings) as application:
                return await queue_overview(application)

        rows = _run(go)
    if as_json:
        for r in rows:
            _print_json(dataclasses.asdict(r))
        return
    if not rows:
        console.print(styled("no queues yet", "dim"))
        return
    table = Table(title=f"Queues on {redact(settings.broker_url)}")
    for col in ("topic", "group", "ready", "in flight", "delayed", "dead"):
        table.add_column(col, justify="left" if col in ("topic", "group") else "right")
    for r in rows:
        table.add_row(
            r.topic,
            r.group,
            str(r.ready),
            str(r.in_flight),
            str(r.delayed),
            styled(r.dead, "red" if r.dead else ""),
        )
    console.print(table)


@app.command()
def migrate(
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Bring the store's tables to this release's layout (what an App does
    on start unless CONVEYOR_MIGRATE=false); safe to run again and beside
    running workers."""
    from conveyor.store._schema import LAYOUT, ensure_layout

    settings = _settings(broker, store, env_file, log_level, log_format)

    async def go() -> tuple[int | None, int]:
        application = App("cli", settings=settings.model_copy(update={"migrate": True}))
        try:
            await application.store.connect()
            return await ensure_layout(
                application.store, migrate=True, now=application.clock.time()
            )
        finally:
            await application.close()

    found, now = _run(go)
    where = redact(settings.resolved_store_url)
    if found == now:
        console.print(f"{where}: already at layout {LAYOUT}")
    else:
        was = "no recorded layout" if found is None else f"layout {found}"
        console.print(f"{where}: {was} -> layout {now}")


def _filter(
    ids: list[int] | None, group: str | None, topic: str | None, error_type: str | None
) -> DeadLetterFilter:
    return DeadLetterFilter(ids=ids or None, group=group, topic=topic, error_type=error_type)


GroupOpt = Annotated[str | None, typer.Option(help="Only this consumer group.")]
TopicOpt = Annotated[str | None, typer.Option(help="Only this topic.")]
ErrOpt = Annotated[str | None, typer.Option("--error-type", help="Only this error type.")]


@dlq.command("list")
def dlq_list(
    group: GroupOpt = None,
    topic: TopicOpt = None,
    error_type: ErrOpt = None,
    reason: Annotated[str | None, typer.Option(help="Only reasons holding this text.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="At most this many; 0: all.")] = 100,
    after: Annotated[int, typer.Option(min=0, help="Only ids above this one (next page).")] = 0,
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """List dead letters, oldest first, a page at a time (--after ID for the
    next); the title says how many match in all. --json streams."""
    settings = _settings(broker, store, env_file, log_level, log_format)
    if _missing_database(settings) is not None:
        if not as_json:
            console.print(styled("no dead letters", "green"))
        return
    where = DeadLetterFilter(
        group=group, topic=topic, error_type=error_type, reason_contains=reason
    )
    cap = limit or None

    if as_json:

        async def stream() -> None:
            async with App("cli", settings=settings) as application:
                async for r in iter_dead_letters(application, where, limit=cap, after=after):
                    _print_json(_record_json(r, traceback=False))

        _run(stream)
        return

    async def page() -> tuple[list[DeadLetterRecord], int]:
        async with App("cli", settings=settings) as application:
            # One more than asked: whether a next page exists.
            wanted = None if cap is None else cap + 1
            records = [
                r async for r in iter_dead_letters(application, where, limit=wanted, after=after)
            ]
            return records, await application.store.dead_letter_count(where)

    records, total = _run(page)
    if not records:
        console.print(styled("no dead letters" if not total else "no more dead letters", "green"))
        return
    more = ""
    if cap is not None and len(records) > cap:
        records = records[:cap]
        more = f"; next page: --after {records[-1].id}"
    shown = f"{len(records):,} of {total:,}" if len(records) < total else f"{total:,}"
    table = Table(title=f"Dead letters ({shown}{more})")
    for col in ("id", "group", "topic", "message", "attempts", "error", "dead at"):
        table.add_column(col)
    for r in records:
        table.add_row(
            str(r.id),
            r.group,
            r.message.topic,
            r.message.id,
            str(r.attempts),
            fit(r.reason, 70),
            when(r.dead_at),
        )
    console.print(table)


def _record_json(r: DeadLetterRecord, *, traceback: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "id": r.id,
        "group": r.group,
        "attempts": r.attempts,
        "reason": r.reason,
        "error_type": r.error_type,
        "dead_at": r.dead_at,
        "message": r.message.to_json(),
    }
    if traceback:
        out["traceback"] = r.traceback
    return out


@dlq.command("show")
def dlq_show(
    dead_id: Annotated[int, typer.Argument(help="Dead-letter id (from `dlq list`).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="The record, traceback included, as JSON.")
    ] = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Show one dead letter: message, reason, attempts, timestamps, traceback."""
    settings = _settings(broker, store, env_file, log_level, log_format)
    if _missing_database(settings) is not None:
        _fail(f"no dead letter with id {dead_id} (see `conveyor dlq list`)")

    async def go() -> list[DeadLetterRecord]:
        async with App("cli", settings=settings) as application:
            return await application.store.dead_letters(DeadLetterFilter(ids=[dead_id]))

    records = _run(go)
    if not records:
        _fail(f"no dead letter with id {dead_id} (see `conveyor dlq list`)")
    r = records[0]
    if as_json:
        _print_json(_record_json(r, traceback=True))
        return
    console.print_json(json.dumps(_record_json(r, traceback=False), default=str))
    if r.traceback:
        console.print(styled("traceback", "bold"))
        console.print(r.traceback, soft_wrap=True)


def _selection(
    ids: list[int] | None, group: str | None, topic: str | None, err: str | None, all_: bool
) -> DeadLetterFilter:
    if not (ids or group or topic or err or all_):
        _fail("say which dead letters: IDs, --group/--topic/--error-type, or --all")
    return _filter(ids, group, topic, err)


async def _check_ids(application: App, ids: list[int] | None) -> None:
    """Refuse a selection by id that names a dead letter that does not exist."""
    if not ids:
        return
    found = await application.store.dead_letters(DeadLetterFilter(ids=ids), limit=len(ids))
    missing = sorted(set(ids) - {r.id for r in found})
    if missing:
        raise ConfigError(
            f"no dead letter with id {', '.join(map(str, missing))} (see `conveyor dlq list`); "
            "nothing was changed"
        )


@dlq.command("replay")
def dlq_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.")] = None,
    group: GroupOpt = None,
    topic: TopicOpt = None,
    error_type: ErrOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Send dead letters back to their group (same message id: the inbox still
    refuses anything already applied)."""
    where = _selection(ids, group, topic, error_type, all_)
    settings = _settings(broker, store, env_file, log_level, log_format)
    if _missing_database(settings) is not None:
        if ids:
            _fail(f"no dead letter with id {', '.join(map(str, ids))} (see `conveyor dlq list`)")
        console.print("replayed 0 dead letter(s)")
        return

    async def go() -> int:
        async with App("cli", settings=settings) as application:
            await _check_ids(application, ids)
            return await replay_dead_letters(application, where)

    console.print(f"replayed {_run(go)} dead letter(s)")


@dlq.command("purge")
def dlq_purge(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.")] = None,
    group: GroupOpt = None,
    topic: TopicOpt = None,
    error_type: ErrOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Delete dead letters for good."""
    where = _selection(ids, group, topic, error_type, all_)
    settings = _settings(broker, store, env_file, log_level, log_format)
    if _missing_database(settings) is not None:
        if ids:
            _fail(f"no dead letter with id {', '.join(map(str, ids))} (see `conveyor dlq list`)")
        console.print("purged 0 dead letter(s)")
        return
    if not yes and sys.stdin.isatty():
        typer.confirm("Delete the selected dead letters for good?", abort=True)

    async def go() -> int:
        async with App("cli", settings=settings) as application:
            await _check_ids(application, ids)
            return await purge_dead_letters(application, where)

    console.print(f"purged {_run(go)} dead letter(s)")


sagas_cli = typer.Typer(help="Inspect saga instances and their history.", no_args_is_help=True)
app.add_typer(sagas_cli, name="sagas")


@sagas_cli.command("list")
def sagas_list(
    state: Annotated[
        list[str] | None,
        typer.Option(help="Only this state (RUNNING, COMPENSATING, COMPLETED, ...); repeatable."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only sagas of this name.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 50,
    as_json: JsonOpt = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """List saga instances, newest first: state, current step, age, error."""
    from conveyor.cli import _sagas

    states = _sagas.parse_states(state or [])
    settings = _settings(broker, store, env_file, log_level, log_format)
    records: list[SagaRecord] = []
    names: dict[str, list[str]] = {}
    if _missing_database(settings) is None:
        records, names = _run(
            lambda: _sagas.fetch_sagas(
                settings.resolved_store_url, states=states, name=name, limit=limit
            )
        )
    if as_json:
        for r in records:
            _print_json(_sagas.record_json(r, names.get(r.id, [])))
        return
    if not records:
        console.print(styled("no sagas", "dim"))
        return
    console.print(_sagas.list_table(records, names, now=time.time()))


@sagas_cli.command("show")
def sagas_show(
    saga_id: Annotated[str, typer.Argument(help="Saga id (from `sagas list`).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="The record and its events as JSON.")
    ] = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Show one saga: its state and data, the timeline of its history, how
    long each step took, and whether the history folds back to the record."""
    from conveyor.cli import _sagas

    settings = _settings(broker, store, env_file, log_level, log_format)
    view = None
    if _missing_database(settings) is None:
        view = _run(lambda: _sagas.fetch_saga(settings.resolved_store_url, saga_id))
    if view is None:
        _fail(f"no saga with id {saga_id!r} (see `conveyor sagas list`)")
    if as_json:
        _print_json(_sagas.saga_json(view))
        return
    console.print(_sagas.summary_table(view, now=time.time()))
    console.print(_sagas.timeline_table(view))
    console.print(_sagas.spans_table(view))
    verdict = (
        styled("yes", "green")
        if view.consistent
        else Text.assemble(("no", "bold red"), " (the stored record differs)")
    )
    console.print(Text.assemble("history consistent: ", verdict))


@app.command()
def demo(
    orders: Annotated[int, typer.Option(min=1, max=100_000, help="Orders to place.")] = 300,
    error_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Transient handler errors.")
    ] = 0.05,
    latency: Annotated[float, typer.Option(min=0, help="Max injected latency (s).")] = 0.0,
    decline_rate: Annotated[float, typer.Option(min=0, max=1, help="Payments declined.")] = 0.1,
    ship_failure_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.05,
    duplicate_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.05,
    stock: Annotated[int | None, typer.Option(min=0, help="Stock per SKU.")] = None,
    db: Annotated[
        Path | None, typer.Option(help="SQLite file (default: a fresh temp file).")
    ] = None,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    timeout: Annotated[float, typer.Option(min=1, help="Give up after this many seconds.")] = 120.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the reference order system and check its invariants.

    On the embedded default (a fresh SQLite file, or `--db FILE`), or on any
    `--broker URL` / `--store URL` pair. A missing one of the pair is the
    other's URL when that is a database (SQLite, PostgreSQL), else a fresh
    SQLite file. A PostgreSQL URL without `namespace=` gets a fresh one.
    CONVEYOR_BROKER_URL and CONVEYOR_STORE_URL are not read: a demo always
    starts from an empty database."""
    _setup_logging(log_level or "WARNING", log_format)
    from conveyor.examples.orders.demo import DEFAULT_STOCK, Faults, run_demo

    if db is not None and (broker is not None or store is not None):
        _fail("--db is the SQLite shortcut: give either --db or --broker/--store, not both")
    broker_url = broker or (store if _is_database(store) else None)
    store_url = store or (broker if _is_database(broker) else None)
    tmp = None
    if broker_url is None or store_url is None:
        if db is None:
            tmp = tempfile.TemporaryDirectory(prefix="conveyor-demo-")
            db = Path(tmp.name) / "orders.db"
        broker_url = broker_url or f"sqlite:///{db}"
        store_url = store_url or f"sqlite:///{db}"
    broker_url, store_url = _fresh_namespace(broker_url, store_url)
    faults = Faults(
        error_rate=error_rate,
        latency=latency,
        decline_rate=decline_rate,
        ship_failure_rate=ship_failure_rate,
        duplicate_rate=duplicate_rate,
    )
    started = time.perf_counter()
    try:
        report = _run(
            lambda: run_demo(
                orders=orders,
                faults=faults,
                broker_url=broker_url,
                store_url=store_url,
                timeout=timeout,
                console=console,
                live=console.is_terminal,
                seed=seed,
                stock_per_sku=DEFAULT_STOCK if stock is None else stock,
            )
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    verdict = (
        styled("all invariants hold", "bold green")
        if report.ok
        else styled("INVARIANT FAILED", "bold red")
    )
    console.print(Text.assemble(verdict, f" ({time.perf_counter() - started:.1f}s)"))
    if not report.ok:
        raise typer.Exit(1)


def _is_database(url: str | None) -> bool:
    """A URL both a broker and a store can use (one transaction for both)."""
    return url is not None and url.split("://", 1)[0].lower() in (
        "sqlite",
        "postgresql",
        "postgres",
    )


def _fresh_namespace(broker_url: str, store_url: str) -> tuple[str, str]:
    """Give PostgreSQL URLs without ``namespace=`` a fresh one (the same one
    when broker and store share a URL), so a demo never mixes with earlier data."""
    from urllib.parse import parse_qs, urlsplit
    from uuid import uuid4

    fresh = f"demo_{uuid4().hex[:10]}"
    out = []
    for url in (broker_url, store_url):
        parts = urlsplit(url)
        if parts.scheme.lower() in ("postgresql", "postgres") and "namespace" not in parse_qs(
            parts.query
        ):
            url = f"{url}{'&' if parts.query else '?'}namespace={fresh}"
        out.append(url)
    if out != [broker_url, store_url]:
        console.print(Text.assemble("PostgreSQL namespace for this run: ", (fresh, "bold")))
    return out[0], out[1]


bench_app = typer.Typer(
    help="Benchmarks that print measured ratios; no argument: the embedded default."
)
app.add_typer(bench_app, name="bench")

OutputOpt = Annotated[Path | None, typer.Option(help="Also write results as JSON here.")]


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    messages: Annotated[int, typer.Option(min=1000, help="Messages per measurement.")] = 20_000,
    output: OutputOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Measure the embedded broker and unit of work against raw sqlite3 loops
    (`conveyor bench brokers`: the server brokers)."""
    if ctx.invoked_subcommand is not None:
        return
    _setup_logging(log_level or "WARNING", log_format)
    from conveyor.cli._bench import run_bench

    run_bench(console, messages=messages, output=output)


@bench_app.command("brokers")
def bench_brokers(
    messages: Annotated[int, typer.Option(min=1000, help="Messages per measurement.")] = 20_000,
    brokers: Annotated[
        str, typer.Option(help="Comma-separated: redis,rabbitmq,postgres,nats,kafka.")
    ] = "redis,rabbitmq,postgres,nats,kafka",
    output: OutputOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Measure the server brokers against their raw clients and Dramatiq.

    Also the PostgreSQL unit of work against a raw asyncpg loop. Needs the
    servers on 127.0.0.1 (./scripts/services) and a source checkout."""
    _setup_logging(log_level or "WARNING", log_format)
    try:
        from benchmarks.brokers import run_broker_bench
    except ImportError as exc:
        if exc.name not in ("benchmarks", "benchmarks.brokers"):
            _fail(f"the broker benchmark cannot start: {exc}")
        _fail(
            "`conveyor bench brokers` runs from a source checkout of Conveyor "
            "(benchmarks/brokers.py, the servers and the peer frameworks): "
            "run ./scripts/test there once, then .venv/bin/conveyor bench brokers"
        )
    try:
        run_broker_bench(
            console,
            messages=messages,
            brokers=[b.strip() for b in brokers.split(",") if b.strip()],
            output=output,
        )
    except ValueError as exc:
        _fail(str(exc))


@bench_app.command("observability")
def bench_observability(
    messages: Annotated[int, typer.Option(min=1000, help="Messages per measurement.")] = 20_000,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; each figure is a median.")] = 3,
    baseline_src: Annotated[
        Path | None,
        typer.Option(
            help="The src directory of another build (e.g. before the observer seam) "
            "to measure 'off' against; benchmarks/observability.py makes one.",
        ),
    ] = None,
    output: OutputOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """What metrics and tracing cost: the no-op consume and the unit of work
    with observability off, metrics on, and metrics + tracing, in one run.

    Needs the prometheus and otel extras (pip install 'conveyor[prometheus,otel]')."""
    _setup_logging(log_level or "WARNING", log_format)
    for module, extra in (("prometheus_client", "prometheus"), ("opentelemetry.sdk", "otel")):
        try:
            importlib.import_module(module)
        except ImportError:
            _fail(
                f"`conveyor bench observability` needs the {extra} extra: "
                "pip install 'conveyor[prometheus,otel]'"
            )
    if baseline_src is not None and not (baseline_src / "conveyor").is_dir():
        _fail(f"--baseline-src {baseline_src} holds no conveyor package")
    from conveyor.cli._bench_observability import run_observability_bench

    results = run_observability_bench(
        console, messages=messages, rounds=rounds, baseline_src=baseline_src
    )
    if output is not None:
        output.write_text(json.dumps(results, indent=2))


@app.command()
def dashboard(
    target: Annotated[
        str,
        typer.Argument(help="MODULE:ATTR: an App, or a conveyor.http Console or Dashboard."),
    ],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8080,
    trace_link: Annotated[
        str | None,
        typer.Option(help="Trace UI URL with {trace_id} (e.g. Jaeger's /trace/{trace_id})."),
    ] = None,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    log_level: LogOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Serve the operations console (pages under /console, the admin API
    under /admin) for the app MODULE:ATTR, on the broker and store it uses.
    Its workers record what the story of an id shows when they run a
    conveyor.runtime.Journal."""
    _setup_logging(log_level, log_format)
    from conveyor.http import AdminAPI, Console, Dashboard

    obj = _import(target, "app")
    if isinstance(obj, App):
        overrides = {"broker_url": broker, "store_url": store}
        if env_file is not None or any(v is not None for v in overrides.values()):
            base = obj.settings.model_dump()
            base.update({k: v for k, v in overrides.items() if v is not None})
            obj.settings = load_settings(env_file, **base)
        obj = Console(obj, trace_link=trace_link)
    if isinstance(obj, Console):
        obj = Dashboard(AdminAPI(obj))
    if not isinstance(obj, Dashboard):
        _fail(f"{target!r} is not an App, Console or Dashboard (found {type(obj).__name__})")
    import uvicorn

    settings = obj.console.app.settings
    _setup_logging(settings.log_level, settings.log_format)
    console.print(f"console on http://{host}:{port}/console/", soft_wrap=True)
    uvicorn.run(obj, host=host, port=port, log_config=None, access_log=False)
