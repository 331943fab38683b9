"""Saga benchmark: Conveyor's 4-step order saga against DBOS Transact.

.venv/bin/python -m benchmarks.sagas [--n N] [--only dbos|conveyor] [--profile DIR]

Sagas per second for the order saga (reserve, charge, ship, deliver) with
no-op services: Conveyor on the embedded default (a SQLite file) and on
PostgreSQL, and, in the same run on the same PostgreSQL server, DBOS Transact
running the equivalent 4-step workflow (``benchmarks/dbos_app.py``). Each
measurement runs in a child process of its own on a fresh database (a
temporary SQLite file, or a PostgreSQL database named ``bench_<run>_<token>``
that is dropped at the end), and times N sagas from the first start to the
last one COMPLETED (DBOS: in SUCCESS). The target: Conveyor on PostgreSQL at
least DBOS's best rate on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.table import Table

__all__ = ["DBOS_RUNS", "run_saga_bench"]

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
# A child process that has not finished after this long is killed and the
# measurement reported as failed, naming it.
RUN_TIMEOUT = 300.0
# Inside a child: the most its sagas may take once started.
SAGA_TIMEOUT = 240.0
# Sagas started concurrently, each in its own transaction (as DBOS's side).
CHUNK = 200
TARGET = 1.0

# (key, label, dbos_app.py --mode, --style)
DBOS_RUNS = (
    ("dbos_queue", "DBOS, queue, async", "queue", "async"),
    ("dbos_start", "DBOS, start_workflow_async", "start", "async"),
    ("dbos_start_sync", "DBOS, start_workflow, sync", "start", "sync"),
    ("dbos_queue_sync", "DBOS, queue, sync", "queue", "sync"),
)
CONVEYOR_RUNS = (
    ("conveyor_sqlite", "Conveyor, SQLite (embedded)"),
    ("conveyor_postgres", "Conveyor, PostgreSQL"),
)

HERE = Path(__file__).resolve().parent

Results = dict[str, Any]


# -- the Conveyor side, run in a child process -----------------------------------


def _order_saga() -> Any:
    from conveyor.sagas import Saga, Step

    return Saga(
        "order",
        version=1,
        steps=[
            Step("reserve", command="inventory.reserve", compensation="inventory.release"),
            Step("charge", command="payment.charge", compensation="payment.refund"),
            Step("ship", command="shipping.ship"),
            Step("deliver", command="shipping.deliver"),
        ],
    )


async def conveyor_sagas(url: str, n: int) -> Results:
    """Start ``n`` order sagas on ``url`` (broker = store) while one worker in
    this process runs them with no-op participants; wait until all are
    COMPLETED. Returns the figures."""
    from conveyor.runtime import App, Context
    from conveyor.sagas import COMPLETED, Sagas
    from conveyor.settings import Settings

    app = App("bench-sagas", settings=Settings(broker_url=url, log_level="WARNING"))
    sagas = Sagas(app)
    sagas.register(_order_saga())

    def noop(topic: str) -> None:
        async def participant(ctx: Context, data: dict[str, Any]) -> dict[str, Any] | None:
            return None

        participant.__name__ = topic.replace(".", "_")
        sagas.participant(topic)(participant)

    for topic in (
        "inventory.reserve",
        "inventory.release",
        "payment.charge",
        "payment.refund",
        "shipping.ship",
        "shipping.deliver",
    ):
        noop(topic)

    async def count(sql: str, params: list[object]) -> int:
        async with app.store.transaction() as tx:
            row = await tx.fetchone(sql, params)
        assert row is not None
        return int(row[0])

    done_sql = "SELECT count(*) FROM conveyor_sagas WHERE state = ?"
    await app.connect()
    worker = app.worker(grace_period=5.0)
    running = asyncio.create_task(worker.run())
    try:
        orders = [{"id": f"o{i}", "amount": 1234, "sku": "sku-1", "qty": 1} for i in range(n)]

        async def start(order: dict[str, Any]) -> None:
            async with app.transaction() as s:
                await sagas.start(s, "order", order)

        began = time.perf_counter()
        for i in range(0, n, CHUNK):
            await asyncio.gather(*(start(o) for o in orders[i : i + CHUNK]))
        started = time.perf_counter()
        deadline = time.monotonic() + SAGA_TIMEOUT
        while (done := await count(done_sql, [COMPLETED])) < n:
            if running.done():
                running.result()
                raise RuntimeError("the worker stopped before the sagas completed")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Conveyor on {_redact(url)}: {done} of {n} sagas COMPLETED after "
                    f"{SAGA_TIMEOUT:g}s; try a smaller --n"
                )
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - began
        steps = await count("SELECT count(*) FROM conveyor_saga_steps WHERE status = ?", ["done"])
        return {
            "n": n,
            "seconds": seconds,
            "rate": n / seconds,
            "start_rate": n / (started - began),
            "steps": steps,
        }
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
        await app.close()


def _child_conveyor(url: str, n: int, profile: str | None) -> None:
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    result = asyncio.run(conveyor_sagas(url, n))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    print(json.dumps(result))


# -- the parent: databases, child processes, the table -----------------------------


def _redact(url: str) -> str:
    return url.split("?")[0]


def _database_url(name: str) -> str:
    parts = urlsplit(POSTGRES_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _create_database(name: str) -> str:
    asyncio.run(asyncio.wait_for(_admin(f'CREATE DATABASE "{name}"'), 60))
    return _database_url(name)


def _drop_database(name: str) -> None:
    asyncio.run(asyncio.wait_for(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'), 60))


def _child(argv: list[str], what: str) -> Results:
    """Run a child process (a ``-m`` module from the project root) that
    prints one JSON line last; its figures."""
    try:
        proc = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(
            f"{what} did not finish within {RUN_TIMEOUT:g}s; try a smaller --n"
        ) from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail}")
    result: Results = json.loads(lines[-1])
    return result


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


def run_saga_bench(
    console: Console,
    *,
    n: int,
    only: str | None = None,
    repeat: int = 1,
    profile: Path | None = None,
) -> Results:
    """Run the measurements (``only``: "dbos" or "conveyor") ``repeat`` times
    each, round-robin, keep each one's best, print the table; returns the
    figures. ``profile``: a folder for cProfile stats of the Conveyor children."""
    token = uuid.uuid4().hex[:10]
    results: Results = {"n": n, "repeat": repeat, "profiled": profile is not None}
    errors: dict[str, str] = {}
    runs: list[tuple[str, str, Callable[[str], list[str]]]] = []

    def conveyor_argv(url: str) -> list[str]:
        return ["-m", "benchmarks.sagas", "--child-conveyor", url, "--n", str(n)]

    def dbos_argv(mode: str, style: str) -> Callable[[str], list[str]]:
        def argv(url: str) -> list[str]:
            return [
                *("-m", "benchmarks.dbos_app", "--url", url, "--n", str(n)),
                *("--mode", mode, "--style", style),
            ]

        return argv

    if only in (None, "conveyor"):
        runs += [(key, label, conveyor_argv) for key, label in CONVEYOR_RUNS]
    if only in (None, "dbos"):
        runs += [(key, label, dbos_argv(mode, style)) for key, label, mode, style in DBOS_RUNS]
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="conveyor-bench-sagas-") as tmp:
        for turn in range(repeat):
            for key, label, argv_of in runs:
                status = f"{label}, {n:,} sagas" + (f", round {turn + 1}" if repeat > 1 else "")
                database = f"bench_{key}_{token}_{turn}"
                with console.status(status):
                    try:
                        if key == "conveyor_sqlite":
                            url = f"sqlite:///{tmp}/{key}-{turn}.db"
                        else:
                            url = _create_database(database)
                        argv = argv_of(url)
                        if profile is not None and key in dict(CONVEYOR_RUNS):
                            argv += ["--profile", str(profile / f"{key}-{turn}.prof")]
                        figures = _child(argv, label)
                        if figures["rate"] > results.get(key, {}).get("rate", 0.0):
                            results[key] = figures
                    except Exception as exc:
                        errors[key] = _one_line(exc)
                    finally:
                        if key != "conveyor_sqlite":
                            try:
                                _drop_database(database)
                            except Exception as exc:
                                errors[f"drop {database}"] = _one_line(exc)

    dbos = {k: results[k]["rate"] for k, *_ in DBOS_RUNS if k in results}
    if dbos:
        best = max(dbos, key=dbos.__getitem__)
        results["dbos_best"] = best
        for key, *_ in (*CONVEYOR_RUNS, *DBOS_RUNS):
            if key in results:
                results[key]["vs_dbos"] = results[key]["rate"] / dbos[best]
    results["errors"] = errors
    _print(console, results)
    return results


def _print(console: Console, r: Results) -> None:
    errors: dict[str, str] = r["errors"]
    best = r.get("dbos_best")
    best_label = next((label for k, label, *_ in DBOS_RUNS if k == best), "")
    title = f"4-step order saga, no-op services, {r['n']:,} sagas, {os.cpu_count()} CPUs"
    if best:
        title += f"\nratios against the best DBOS figure on PostgreSQL ({best_label})"
    if r.get("profiled"):
        title += "\n[yellow]Conveyor runs under cProfile: its figures are slowed[/]"
    table = Table(title=title)
    table.add_column("backend", no_wrap=True)
    table.add_column("N", justify="right")
    table.add_column("sagas/s", justify="right")
    table.add_column("vs DBOS", justify="right")
    table.add_column("target", justify="right", no_wrap=True)
    rows = [(k, label, True) for k, label in CONVEYOR_RUNS]
    rows += [(k, label, False) for k, label, *_ in DBOS_RUNS]
    for key, label, targeted in rows:
        if key not in r and key not in errors:
            continue
        figures = r.get(key)
        if figures is None:
            table.add_row(label, f"{r['n']:,}", "[red]failed[/]", "", "")
            continue
        ratio = figures.get("vs_dbos")
        goal = ""
        if targeted:
            if ratio is None:
                goal = f">= {TARGET:.1f}x [yellow]n/a[/]"
            else:
                goal = f">= {TARGET:.1f}x " + (
                    "[green]ok[/]" if ratio >= TARGET else "[red]MISS[/]"
                )
        table.add_row(
            label,
            f"{figures['n']:,}",
            f"{figures['rate']:,.0f}",
            "" if ratio is None else f"{ratio:.2f}x",
            goal,
        )
    console.print(table)
    for key, figures in r.items():
        if isinstance(figures, dict) and "steps" in figures and figures["steps"] != 4 * r["n"]:
            console.print(
                f"[yellow]{key}[/]: {figures['steps']:,} steps recorded, expected {4 * r['n']:,}"
            )
    for key, text in errors.items():
        console.print(f"[red]{key}[/]: {text}", highlight=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="sagas per measurement")
    parser.add_argument("--only", choices=("dbos", "conveyor"), default=None)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each measurement (round-robin); the best"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile stats of the Conveyor runs"
    )
    parser.add_argument("--child-conveyor", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 1:
        sys.exit("error: --n must be at least 1")
    if args.child_conveyor:
        _child_conveyor(args.child_conveyor, args.n, args.profile and str(args.profile))
    else:
        try:
            run_saga_bench(
                Console(),
                n=args.n,
                only=args.only,
                repeat=max(1, args.repeat),
                profile=args.profile,
            )
        except KeyboardInterrupt:
            sys.exit(130)
