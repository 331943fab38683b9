"""``conveyor bench``: the embedded default against raw sqlite3, in one run.

Every figure is measured on this machine in this run; ratios compare
Conveyor with hand-written sqlite3 loops using the same durability setting
(WAL, synchronous=NORMAL). Worker measurements run in a child process so its
peak RSS is the worker's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from conveyor._loop import run as run_loop
from conveyor.runtime import App, Context
from conveyor.settings import Settings

__all__ = ["run_bench"]

_PAYLOAD = json.dumps({"order_id": "x" * 16, "amount": 1234, "sku": "SKU-1"}).encode()


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def raw_queue_ceiling(path: str, n: int) -> float:
    """Batched INSERT then batched DELETE of n rows: the table's ceiling."""
    conn = _connect(path)
    conn.execute("CREATE TABLE q (seq INTEGER PRIMARY KEY, payload BLOB, visible_at REAL)")
    start = time.perf_counter()
    for i in range(0, n, 500):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO q (payload, visible_at) VALUES (?, 0)", [(_PAYLOAD,)] * min(500, n - i)
        )
        conn.execute("COMMIT")
    while True:
        conn.execute("BEGIN IMMEDIATE")
        gone = conn.execute(
            "DELETE FROM q WHERE seq IN (SELECT seq FROM q ORDER BY seq LIMIT 500)"
        ).rowcount
        conn.execute("COMMIT")
        if not gone:
            break
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def raw_unit_of_work(path: str, n: int) -> float:
    """Hand-written loop, one transaction per message: claim, inbox row,
    business row, outbox row, ack (delete)."""
    conn = _connect(path)
    conn.executescript(
        """
        CREATE TABLE q (seq INTEGER PRIMARY KEY, msg_id TEXT, topic TEXT, payload BLOB,
                        visible_at REAL, lease TEXT, attempt INTEGER DEFAULT 0);
        CREATE INDEX q_ready ON q (topic, seq);
        CREATE TABLE inbox (grp TEXT, msg_id TEXT, PRIMARY KEY (grp, msg_id)) WITHOUT ROWID;
        CREATE TABLE business (id INTEGER PRIMARY KEY, msg_id TEXT, amount INTEGER);
        """
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO q (msg_id, topic, payload, visible_at) VALUES (?, 'in', ?, 0)",
        [(uuid.uuid4().hex, _PAYLOAD) for _ in range(n)],
    )
    conn.execute("COMMIT")
    start = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        seq, msg_id, payload = conn.execute(
            "UPDATE q SET lease = 'x', visible_at = ?, attempt = attempt + 1 WHERE seq = "
            "(SELECT seq FROM q WHERE topic = 'in' AND visible_at <= ? ORDER BY seq LIMIT 1) "
            "RETURNING seq, msg_id, payload",
            (time.time() + 60, time.time()),
        ).fetchone()
        body = json.loads(payload)
        conn.execute("INSERT INTO inbox VALUES ('g', ?)", (msg_id,))
        conn.execute(
            "INSERT INTO business (msg_id, amount) VALUES (?, ?)", (msg_id, body["amount"])
        )
        conn.execute(
            "INSERT INTO q (msg_id, topic, payload, visible_at) VALUES (?, 'out', ?, 0)",
            (uuid.uuid4().hex, payload),
        )
        conn.execute("DELETE FROM q WHERE seq = ?", (seq,))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


async def _publish(url: str, n: int, batch: int, *, store_url: str | None = None) -> float:
    """Publish ``n`` messages to ``bench.in``; the rate. ``batch == 1``: one
    ``App.publish`` call each. Otherwise ``batch`` per transaction when the
    broker shares the store's database, else ``batch`` per ``broker.publish``
    call (what the outbox relay does; a transaction would only fill the outbox)."""
    from conveyor.brokers import TransactionalBroker
    from conveyor.messages import Message
    from conveyor.runtime import App
    from conveyor.settings import Settings

    app = App("bench", settings=Settings(broker_url=url, store_url=store_url))
    async with app:
        await app.broker.declare("bench.in", "bench")
        broker = app.broker
        bound = isinstance(broker, TransactionalBroker) and broker.bind(app.store) is not None
        start = time.perf_counter()
        if batch == 1:
            for i in range(n):
                await app.publish("bench.in", {"i": i, "amount": 1234})
        elif bound:
            for i in range(0, n, batch):
                async with app.transaction() as s:
                    for j in range(i, min(n, i + batch)):
                        await s.publish("bench.in", {"i": j, "amount": 1234})
        else:
            size = app.settings.max_payload
            for i in range(0, n, batch):
                await broker.publish(
                    [
                        Message.create(
                            "bench.in", {"i": j, "amount": 1234}, codec=app.codec, max_payload=size
                        )
                        for j in range(i, min(n, i + batch))
                    ]
                )
        return n / (time.perf_counter() - start)


def _business_ddl(store_url: str, table: str) -> str:
    """The benchmark's business table in the store's SQL dialect."""
    key = "INTEGER PRIMARY KEY" if store_url.startswith("sqlite:") else "BIGSERIAL PRIMARY KEY"
    return f"CREATE TABLE IF NOT EXISTS {table} (id {key}, msg_id TEXT, amount BIGINT)"


def _child(
    mode: str, url: str, n: int, ready_file: str, store_url: str | None, table: str
) -> dict[str, float]:
    """Runs in the worker child process."""
    app = App(
        "bench",
        settings=Settings(broker_url=url, store_url=store_url, prefetch=256, idle_poll=0.05),
    )
    done = asyncio.Event()
    latencies: list[float] = []
    count = 0
    # perf_counter() of the first handler call and of the n-th
    marks: list[float] = []

    def counted() -> None:
        nonlocal count
        count += 1
        if count == 1 or count == n:
            marks.append(time.perf_counter())
        if count >= n:
            done.set()

    if mode == "idle":
        return run_loop(_idle(app), app.settings.event_loop)
    shutdown = _observe(app, os.environ.get(OBSERVE_ENV, ""))

    if mode == "uow":

        @app.handler("bench.in", group="bench")
        async def unit(ctx: Context, body: dict[str, int]) -> None:
            await ctx.execute(
                f"INSERT INTO {table} (msg_id, amount) VALUES (?, ?)",
                (ctx.message.id, body["amount"]),
            )
            await ctx.publish("bench.out", body)
            counted()

    else:

        @app.handler("bench.in", group="bench")
        async def noop(ctx: Context, body: bytes) -> None:
            if mode == "latency":
                latencies.append(time.time() - ctx.message.created_at)
            counted()

    async def main() -> dict[str, float]:
        async with app.transaction() as s:
            await s.execute(_business_ddl(app.settings.resolved_store_url, table))
        worker = app.worker()
        with open(ready_file, "w") as f:  # noqa: ASYNC230 - once, before timing
            f.write("ready")
        start = time.perf_counter()
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - start
        worker.stop()
        await task
        shutdown()
        out = {
            "rate": n / elapsed,
            # from the first message handled to the last: leaves out start-up
            # costs such as joining a Kafka consumer group
            "steady_rate": (n - 1) / (marks[-1] - marks[0]) if n > 1 else n / elapsed,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if latencies:
            latencies.sort()
            out["p50_ms"] = statistics.median(latencies) * 1000
            out["p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
            out["max_ms"] = latencies[-1] * 1000
        return out

    return run_loop(main(), app.settings.event_loop)


OBSERVE_ENV = "CONVEYOR_BENCH_OBSERVE"


def _observe(app: App, how: str) -> Callable[[], None]:
    """Install what ``how`` names on ``app`` (``""``: nothing, ``metrics``,
    ``tracing``: metrics and spans, every one sampled and exported as the
    ``OTEL_*`` variables say); returns what flushes and stops it."""
    if not how:
        return lambda: None
    from conveyor.observability.metrics import Metrics

    Metrics(app)
    if how == "metrics":
        return lambda: None
    from conveyor.observability.tracing import Tracing

    return Tracing(app).shutdown


SPARSE_RATE = 20.0
IDLE_HANDLERS = 8
IDLE_SECONDS = 5.0


async def _idle(app: App) -> dict[str, float]:
    """A worker with ``IDLE_HANDLERS`` handlers and nothing to do: the share of
    one core it uses over ``IDLE_SECONDS``, after a second to settle."""
    app.settings = Settings(broker_url=app.settings.broker_url)  # the default idle poll

    async def noop(ctx: Context, body: bytes) -> None:
        pass

    for i in range(IDLE_HANDLERS):
        app.handler(f"idle.{i}", group=f"idle{i}")(noop)
    worker = app.worker()
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(1.0)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(IDLE_SECONDS)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    worker.stop()
    await task
    return {"cpu_percent": 100 * cpu / wall}


def _spawn(
    mode: str,
    url: str,
    n: int,
    workdir: str,
    *,
    store_url: str | None = None,
    table: str = "business",
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start the worker child; ``env`` is added to this process's environment
    (a ``PYTHONPATH`` there runs another build of Conveyor)."""
    ready = os.path.join(workdir, f"ready-{mode}-{uuid.uuid4().hex}")
    argv = [mode, url, str(n), ready, table, *([store_url] if store_url else [])]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.cli._bench", *argv],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    return proc, ready


def _result(proc: subprocess.Popen[str], timeout: float = 900) -> dict[str, float]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout or Ctrl-C: never leave the worker running
        proc.kill()
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"benchmark worker did not finish within {timeout:g}s") from None
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed with exit code {proc.returncode}")
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _consume(
    mode: str,
    url: str,
    n: int,
    workdir: str,
    *,
    store_url: str | None = None,
    table: str = "business",
    timeout: float = 900,
    env: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Fill ``bench.in`` with ``n`` messages, then drain it with a worker in a
    child process (``mode``: ``noop`` or ``uow``); the worker's figures plus
    ``publish_rate``, the fill's."""
    published = asyncio.run(
        asyncio.wait_for(_publish(url, n, batch=500, store_url=store_url), timeout)
    )
    proc, _ = _spawn(mode, url, n, workdir, store_url=store_url, table=table, env=env)
    return {**_result(proc, timeout), "publish_rate": published}


def _latency(url: str, rate: float | None, n: int, workdir: str) -> dict[str, float]:
    """Publish ``n`` messages one per call at ``rate`` (None: as fast as
    possible) to a worker in a child process; its handler records latency."""
    proc, ready = _spawn("latency", url, n, workdir)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("benchmark worker did not start")
        time.sleep(0.01)

    async def paced() -> None:
        from conveyor.runtime import App
        from conveyor.settings import Settings

        app = App("bench-pub", settings=Settings(broker_url=url))
        async with app:
            start = time.perf_counter()
            for i in range(n):
                if rate:
                    pause = start + i / rate - time.perf_counter()
                    if pause > 0:
                        await asyncio.sleep(pause)
                await app.publish("bench.in", {"i": i, "amount": 1234})

    asyncio.run(paced())
    return _result(proc)


def run_bench(console: Console, *, messages: int, output: Path | None) -> dict[str, float]:
    results: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp,
        Progress(console=console, transient=True) as progress,
    ):
        steps = progress.add_task("benchmarking", total=10)

        def step(name: str) -> None:
            progress.update(steps, description=name)

        def url(name: str) -> str:
            return f"sqlite:///{tmp}/{name}.db"

        step("raw sqlite3 queue ceiling")
        results["raw_queue_ceiling"] = raw_queue_ceiling(f"{tmp}/raw.db", messages)
        progress.advance(steps)
        step("raw sqlite3 unit-of-work loop")
        results["raw_uow"] = raw_unit_of_work(f"{tmp}/rawuow.db", messages)
        progress.advance(steps)
        step("publish, one call per message")
        results["publish_single"] = asyncio.run(_publish(url("pub1"), messages // 4, batch=1))
        progress.advance(steps)
        step("publish, 500 per transaction")
        results["publish_batched"] = asyncio.run(_publish(url("pubb"), messages, batch=500))
        progress.advance(steps)
        step("consume, no-op handler")
        noop = _consume("noop", url("noop"), messages, tmp)
        results["consume_noop"] = noop["rate"]
        results["rss_noop_mb"] = noop["rss_mb"]
        progress.advance(steps)
        step("full unit of work")
        uow = _consume("uow", url("uow"), messages, tmp)
        results["uow"] = uow["rate"]
        results["rss_uow_mb"] = uow["rss_mb"]
        progress.advance(steps)
        step("end-to-end maximum: one producer, one worker")
        # Producer and worker share SQLite's single write lock, so the
        # pipeline's maximum is measured with both running.
        results["e2e_max"] = _latency(url("e2e"), None, messages // 2, tmp)["rate"]
        progress.advance(steps)
        rate = results["e2e_max"] / 2
        step(f"publish-to-handle latency at {rate:,.0f} msg/s")
        lat = _latency(url("lat"), rate, min(messages, int(rate * 5)), tmp)
        results["latency_rate"] = rate
        results["p50_ms"] = lat["p50_ms"]
        results["p99_ms"] = lat["p99_ms"]
        results["rss_latency_mb"] = lat["rss_mb"]
        progress.advance(steps)
        step(f"publish-to-handle latency at {SPARSE_RATE:g} msg/s (idle in between)")
        sparse = _latency(url("sparse"), SPARSE_RATE, int(SPARSE_RATE * 5), tmp)
        results["sparse_p50_ms"] = sparse["p50_ms"]
        results["sparse_p99_ms"] = sparse["p99_ms"]
        progress.advance(steps)
        step(f"idle worker, {IDLE_HANDLERS} handlers, {IDLE_SECONDS:g}s")
        proc, _ = _spawn("idle", url("idle"), 1, tmp)
        results["idle_cpu_percent"] = _result(proc)["cpu_percent"]
        progress.advance(steps)

    results["uow_vs_raw_uow"] = results["uow"] / results["raw_uow"]
    results["uow_vs_raw_ceiling"] = results["uow"] / results["raw_queue_ceiling"]
    results["noop_vs_raw_ceiling"] = results["consume_noop"] / results["raw_queue_ceiling"]
    results["peak_rss_mb"] = max(
        results["rss_noop_mb"], results["rss_uow_mb"], results["rss_latency_mb"]
    )
    _print(console, results, messages)
    if output is not None:
        output.write_text(json.dumps(results, indent=2))
    return results


def _print(console: Console, r: dict[str, float], n: int) -> None:
    table = Table(title=f"Embedded default (SQLite WAL, synchronous=NORMAL), {n:,} messages")
    table.add_column("measurement")
    table.add_column("result", justify="right")
    table.add_column("target", justify="right")

    def ok(good: bool) -> str:
        return "[green]ok[/]" if good else "[red]MISSED[/]"

    rows = [
        ("raw sqlite3 insert+delete ceiling", f"{r['raw_queue_ceiling']:,.0f} msg/s", ""),
        ("raw sqlite3 unit-of-work loop", f"{r['raw_uow']:,.0f} msg/s", ""),
        ("publish (one call each)", f"{r['publish_single']:,.0f} msg/s", ""),
        ("publish (500 per transaction)", f"{r['publish_batched']:,.0f} msg/s", ""),
        ("consume, no-op handler", f"{r['consume_noop']:,.0f} msg/s", ""),
        ("publish-to-handle maximum (1 producer)", f"{r['e2e_max']:,.0f} msg/s", ""),
        (
            "full unit of work",
            f"{r['uow']:,.0f} msg/s",
            f">= 5,000 {ok(r['uow'] >= 5000)}",
        ),
        (
            "  / raw unit-of-work loop",
            f"{r['uow_vs_raw_uow']:.0%}",
            f">= 50% {ok(r['uow_vs_raw_uow'] >= 0.5)}",
        ),
        ("  / raw queue ceiling", f"{r['uow_vs_raw_ceiling']:.0%}", ""),
        ("no-op consume / raw queue ceiling", f"{r['noop_vs_raw_ceiling']:.0%}", ""),
        (
            f"latency p50 / p99 at {r['latency_rate']:,.0f} msg/s",
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms",
            f"p50 <= 5, p99 <= 20 ms {ok(r['p50_ms'] <= 5 and r['p99_ms'] <= 20)}",
        ),
        (
            f"latency p50 / p99 at {SPARSE_RATE:g} msg/s (worker idle in between)",
            f"{r['sparse_p50_ms']:.1f} / {r['sparse_p99_ms']:.1f} ms",
            f"p50 <= 5 ms {ok(r['sparse_p50_ms'] <= 5)}",
        ),
        (
            f"idle worker with {IDLE_HANDLERS} handlers",
            f"{r['idle_cpu_percent']:.2f}% of a core",
            f"<= 1% {ok(r['idle_cpu_percent'] <= 1)}",
        ),
        (
            "worker peak RSS",
            f"{r['peak_rss_mb']:.0f} MB",
            f"<= 80 MB {ok(r['peak_rss_mb'] <= 80)}",
        ),
    ]
    for row in rows:
        # Conveyor's own figures and styles, never outside text: markup is safe.
        table.add_row(*(Text.from_markup(cell) for cell in row))
    console.print(table)


if __name__ == "__main__":
    mode, url, count, ready, table = sys.argv[1:6]
    store = sys.argv[6] if len(sys.argv) > 6 else None
    print(json.dumps(_child(mode, url, int(count), ready, store, table)))
