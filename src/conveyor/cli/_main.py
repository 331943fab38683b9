from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from conveyor.errors import ConveyorError
from conveyor.runtime import App, purge_dead_letters, queue_overview, replay_dead_letters
from conveyor.settings import Settings, load_settings
from conveyor.store import DeadLetterFilter

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="conveyor",
    help="Reliable asynchronous operations between services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")

console = Console()
errors = Console(stderr=True, soft_wrap=True)

BrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="Broker URL (default: CONVEYOR_BROKER_URL).")
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store URL (default: CONVEYOR_STORE_URL).")
]
EnvOpt = Annotated[
    Path | None, typer.Option("--env-file", help="Read CONVEYOR_* settings from this file.")
]


class _Exit(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


def main() -> None:
    """Entry point: run the CLI; any ConveyorError is one line and exit 1."""
    try:
        app()
    except (ConveyorError, _Exit) as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _settings(broker: str | None, store: str | None, env_file: Path | None = None) -> Settings:
    return load_settings(env_file, broker_url=broker, store_url=store)


def _run(make: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(make())  # type: ignore[arg-type]
    except ConveyorError as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=errors, rich_tracebacks=False, show_path=False)],
    )


def _load_app(target: str) -> App:
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise _Exit(f"expected MODULE:APP, got {target!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _Exit(f"cannot import {module_name!r}: {exc}") from None
    obj = getattr(module, attr or "app", None)
    if not isinstance(obj, App):
        raise _Exit(f"{target!r} is not a conveyor.App (found {type(obj).__name__})")
    return obj


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="The application, as MODULE:APP.")],
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
    grace_period: Annotated[
        float | None, typer.Option(help="Seconds to finish in-flight work on SIGTERM.")
    ] = None,
) -> None:
    """Run the handlers of MODULE:APP until SIGTERM/SIGINT (graceful shutdown)."""
    application = _load_app(target)
    if broker or store or env_file or grace_period is not None:
        base = application.settings.model_dump()
        overrides = {"broker_url": broker, "store_url": store, "grace_period": grace_period}
        base.update({k: v for k, v in overrides.items() if v is not None})
        application.settings = load_settings(env_file, **base)
    _setup_logging(application.settings.log_level)
    _run(application.run)


@app.command()
def relay(broker: BrokerOpt = None, store: StoreOpt = None, env_file: EnvOpt = None) -> None:
    """Publish committed outbox rows to the broker (needed only when the store
    is not the broker's database and no worker is running)."""
    settings = _settings(broker, store, env_file)
    _setup_logging(settings.log_level)
    _run(App("relay", settings=settings).run)


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="The job API, as MODULE:ATTR (a JobAPI).")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes.")] = 1,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Serve the HTTP job API MODULE:ATTR (a conveyor.http.JobAPI) with uvicorn.

    --broker/--store set CONVEYOR_BROKER_URL/CONVEYOR_STORE_URL before the
    module is imported (in every server process), for an App built from the
    environment. Jobs run in `conveyor worker MODULE:APP` processes."""
    import os

    from conveyor.http import JobAPI

    for name, value in (("CONVEYOR_BROKER_URL", broker), ("CONVEYOR_STORE_URL", store)):
        if value is not None:
            os.environ[name] = value
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise _Exit(f"expected MODULE:ATTR, got {target!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _Exit(f"cannot import {module_name!r}: {exc}") from None
    api = getattr(module, attr, None)
    if not isinstance(api, JobAPI):
        raise _Exit(f"{target!r} is not a conveyor.http.JobAPI (found {type(api).__name__})")
    import uvicorn

    _setup_logging(api.app.settings.log_level)
    uvicorn.run(
        target if workers > 1 else api,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
    )


keys_cli = typer.Typer(help="API keys of the HTTP job API.", no_args_is_help=True)
app.add_typer(keys_cli, name="keys")


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="The key's name (owner of its jobs).")],
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
) -> None:
    """Create an API key; prints the secret, which is shown only this once."""
    from conveyor.http import ApiKeys

    settings = _settings(broker, store, env_file)

    async def go() -> str:
        async with App("cli", settings=settings) as application:
            return await ApiKeys(application).create(name)

    console.print(_run(go), highlight=False, soft_wrap=True)


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
) -> None:
    """Publish one message; prints its id once the broker has it."""
    text = sys.stdin.read() if payload == "-" else payload
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise _Exit(f"payload is not valid JSON: {exc}") from None
    headers = {}
    for item in header or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _Exit(f"header {item!r} must be NAME=VALUE")
        headers[name] = value
    settings = _settings(broker, None, env_file)

    async def go() -> str:
        async with App("cli", settings=settings) as application:
            message = await application.publish(
                topic, body, key=key, type=type_, headers=headers, priority=priority, delay=delay
            )
            return message.id

    console.print(_run(go))


@app.command()
def queues(broker: BrokerOpt = None, store: StoreOpt = None, env_file: EnvOpt = None) -> None:
    """Depth, in flight, delayed and dead messages per topic and group."""
    settings = _settings(broker, store, env_file)

    async def go() -> None:
        async with App("cli", settings=settings) as application:
            rows = await queue_overview(application)
        table = Table(title=f"Queues on {settings.broker_url}")
        for col in ("topic", "group", "ready", "in flight", "delayed", "dead"):
            table.add_column(col, justify="left" if col in ("topic", "group") else "right")
        for r in rows:
            dead = f"[red]{r.dead}[/]" if r.dead else "0"
            table.add_row(r.topic, r.group, str(r.ready), str(r.in_flight), str(r.delayed), dead)
        console.print(table if rows else "[dim]no queues yet[/]")

    _run(go)


def _filter(
    ids: list[int] | None, group: str | None, topic: str | None, error_type: str | None
) -> DeadLetterFilter:
    return DeadLetterFilter(ids=ids or None, group=group, topic=topic, error_type=error_type)


GroupOpt = Annotated[str | None, typer.Option(help="Only this consumer group.")]
TopicOpt = Annotated[str | None, typer.Option(help="Only this topic.")]
ErrOpt = Annotated[str | None, typer.Option("--error-type", help="Only this error type.")]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@dlq.command("list")
def dlq_list(
    group: GroupOpt = None,
    topic: TopicOpt = None,
    error_type: ErrOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """List dead letters, oldest first."""
    settings = _settings(broker, store)

    async def go() -> None:
        async with App("cli", settings=settings) as application:
            records = await application.store.dead_letters(
                _filter(None, group, topic, error_type), limit=limit
            )
        if as_json:
            for r in records:
                print(json.dumps(_record_json(r, traceback=False)))
            return
        table = Table(title=f"Dead letters ({len(records)})")
        for col in ("id", "group", "topic", "message", "attempts", "error", "dead at"):
            table.add_column(col)
        for r in records:
            table.add_row(
                str(r.id),
                r.group,
                r.message.topic,
                r.message.id,
                str(r.attempts),
                r.reason if len(r.reason) < 70 else r.reason[:67] + "...",
                _when(r.dead_at),
            )
        console.print(table if records else "[green]no dead letters[/]")

    _run(go)


def _record_json(r: object, *, traceback: bool) -> dict[str, object]:
    from conveyor.store import DeadLetterRecord

    assert isinstance(r, DeadLetterRecord)
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
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Show one dead letter: message, reason, attempts, timestamps, traceback."""
    settings = _settings(broker, store)

    async def go() -> None:
        async with App("cli", settings=settings) as application:
            records = await application.store.dead_letters(DeadLetterFilter(ids=[dead_id]))
        if not records:
            raise _Exit(f"no dead letter with id {dead_id}")
        r = records[0]
        console.print_json(json.dumps(_record_json(r, traceback=False)))
        if r.traceback:
            console.print("[bold]traceback[/]")
            console.print(r.traceback, highlight=False, markup=False)

    _run(go)


def _selection(
    ids: list[int] | None, group: str | None, topic: str | None, err: str | None, all_: bool
) -> DeadLetterFilter:
    if not (ids or group or topic or err or all_):
        raise _Exit("say which dead letters: IDs, --group/--topic/--error-type, or --all")
    return _filter(ids, group, topic, err)


@dlq.command("replay")
def dlq_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.")] = None,
    group: GroupOpt = None,
    topic: TopicOpt = None,
    error_type: ErrOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
) -> None:
    """Send dead letters back to their group (same message id: the inbox still
    refuses anything already applied)."""
    where = _selection(ids, group, topic, error_type, all_)
    settings = _settings(broker, store)

    async def go() -> int:
        async with App("cli", settings=settings) as application:
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
) -> None:
    """Delete dead letters for good."""
    where = _selection(ids, group, topic, error_type, all_)
    if not yes and sys.stdin.isatty():
        typer.confirm("Delete the selected dead letters for good?", abort=True)
    settings = _settings(broker, store)

    async def go() -> int:
        async with App("cli", settings=settings) as application:
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
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    broker: BrokerOpt = None,
    store: StoreOpt = None,
    env_file: EnvOpt = None,
) -> None:
    """List saga instances, newest first: state, current step, age, error."""
    from conveyor.cli import _sagas

    states = _sagas.parse_states(state or [])
    settings = _settings(broker, store, env_file)
    records, names = _run(
        lambda: _sagas.fetch_sagas(
            settings.resolved_store_url, states=states, name=name, limit=limit
        )
    )
    if as_json:
        for r in records:
            print(json.dumps(_sagas.record_json(r, names.get(r.id, []))))
        return
    if not records:
        console.print("[dim]no sagas[/]")
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
) -> None:
    """Show one saga: its state and data, the timeline of its history, how
    long each step took, and whether the history folds back to the record."""
    from conveyor.cli import _sagas

    settings = _settings(broker, store, env_file)
    view = _run(lambda: _sagas.fetch_saga(settings.resolved_store_url, saga_id))
    if view is None:
        raise _Exit(f"no saga with id {saga_id!r} (see `conveyor sagas list`)")
    if as_json:
        print(json.dumps(_sagas.saga_json(view), default=str))
        return
    console.print(_sagas.summary_table(view, now=time.time()))
    console.print(_sagas.timeline_table(view))
    console.print(_sagas.spans_table(view))
    verdict = "[green]yes[/]" if view.consistent else "[bold red]no[/] (the stored record differs)"
    console.print(f"history consistent: {verdict}")


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
) -> None:
    """Run the reference order system and check its invariants.

    On the embedded default (a fresh SQLite file, or `--db FILE`), or on any
    `--broker URL` / `--store URL` pair. A missing one of the pair is the
    other's URL when that is a database (SQLite, PostgreSQL), else a fresh
    SQLite file. A PostgreSQL URL without `namespace=` gets a fresh one."""
    from conveyor.examples.orders.demo import DEFAULT_STOCK, Faults, run_demo

    if db is not None and (broker is not None or store is not None):
        raise _Exit("--db is the SQLite shortcut: give either --db or --broker/--store, not both")
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
    verdict = "[bold green]all invariants hold[/]" if report.ok else "[bold red]INVARIANT FAILED[/]"
    console.print(f"{verdict} ({time.perf_counter() - started:.1f}s)")
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
        console.print(f"PostgreSQL namespace for this run: [bold]{fresh}[/]", highlight=False)
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
) -> None:
    """Measure the embedded broker and unit of work against raw sqlite3 loops
    (`conveyor bench brokers`: the server brokers)."""
    if ctx.invoked_subcommand is not None:
        return
    from conveyor.cli._bench import run_bench

    run_bench(console, messages=messages, output=output)


@bench_app.command("brokers")
def bench_brokers(
    messages: Annotated[int, typer.Option(min=1000, help="Messages per measurement.")] = 20_000,
    brokers: Annotated[
        str, typer.Option(help="Comma-separated: redis,rabbitmq,postgres,nats,kafka.")
    ] = "redis,rabbitmq,postgres,nats,kafka",
    output: OutputOpt = None,
) -> None:
    """Measure the server brokers against their raw clients and Dramatiq.

    Also the PostgreSQL unit of work against a raw asyncpg loop. Needs the
    servers on 127.0.0.1 (./scripts/services) and a source checkout."""
    try:
        from benchmarks.brokers import run_broker_bench
    except ImportError as exc:
        if exc.name not in ("benchmarks", "benchmarks.brokers"):
            raise _Exit(f"the broker benchmark cannot start: {exc}") from None
        raise _Exit(
            "`conveyor bench brokers` runs from a source checkout of Conveyor "
            "(benchmarks/brokers.py, the servers and the peer frameworks): "
            "run ./scripts/test there once, then .venv/bin/conveyor bench brokers"
        ) from None
    try:
        run_broker_bench(
            console,
            messages=messages,
            brokers=[b.strip() for b in brokers.split(",") if b.strip()],
            output=output,
        )
    except ValueError as exc:
        raise _Exit(str(exc)) from None
