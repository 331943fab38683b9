"""What an open dashboard costs a worker: its throughput while the console polls.

.venv/bin/python -m benchmarks.dashboard_overhead [--scale 1.0] [--rounds 2]
    [--stores sqlite,postgres] [--every 2.0,0.25] [--workload noop,uow]

For each store (a SQLite file, or a fresh PostgreSQL namespace on 127.0.0.1)
a worker in a child process drains a backlog sized to last about eight
seconds (times SCALE; ``conveyor bench``'s worker: no-op handler, or the
full unit of work), once with nobody watching
and once per polling interval while this process serves the dashboard over
the same broker and store and fetches the overview page (``GET /console/``,
what the page's script fetches to refresh itself) every EVERY seconds. The
page refreshes every 2 s; 0.25 s stands for eight open tabs. Configurations
are interleaved round after round; medians are compared. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from conveyor import App, Settings
from conveyor.cli._bench import _publish, _result, _spawn
from conveyor.http import AdminAPI, Dashboard
from conveyor.http import Console as AdminConsole

# Backlogs that take a worker on this kind of machine about eight seconds.
MESSAGES = {
    ("sqlite", "noop"): 300_000,
    ("sqlite", "uow"): 150_000,
    ("postgres", "noop"): 150_000,
    ("postgres", "uow"): 40_000,
}


class _Poller:
    """Serves the dashboard in a thread of this process and fetches the
    overview every ``every`` seconds until stopped."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every = url, every
        self.requests = 0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Poller:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the dashboard did not start within 60 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._poll())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _poll(self) -> None:
        app = App("bench-dashboard", settings=Settings(broker_url=self.url, store_url=self.url))

        @app.handler("bench.in", group="bench")
        async def declared(ctx: object, body: object) -> None:
            """The worker's queue, so the overview shows it; never run here."""

        await app.connect()
        try:
            transport = httpx.ASGITransport(app=Dashboard(AdminAPI(AdminConsole(app))))
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:
                (await c.get("/console/")).raise_for_status()
                self._ready.set()
                next_at = time.monotonic()
                while not self._stop.is_set():
                    started = time.perf_counter()
                    (await c.get("/console/")).raise_for_status()
                    self.latencies.append(time.perf_counter() - started)
                    self.requests += 1
                    next_at += self.every
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            await app.close()


def _drain(workload: str, url: str, n: int, workdir: str, every: float | None) -> tuple[float, int]:
    """The worker's rate, and how many overview pages were served meanwhile."""
    asyncio.run(asyncio.wait_for(_publish(url, n, batch=1000, store_url=url), 900))
    if every is None:
        proc, _ = _spawn(workload, url, n, workdir, store_url=url)
        return _result(proc)["rate"], 0
    with _Poller(url, every) as poller:
        proc, _ = _spawn(workload, url, n, workdir, store_url=url)
        rate = _result(proc)["rate"]
        return rate, poller.requests


async def _drop(dsn: str, namespaces: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for namespace in namespaces:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--every", default="2.0,0.25")
    parser.add_argument("--workload", default="noop,uow")
    parser.add_argument("--postgres", default="postgresql://root@127.0.0.1:5432/test")
    args = parser.parse_args()
    out = Console()
    intervals: list[float | None] = [None, *(float(x) for x in args.every.split(","))]
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    out.print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for kind in [s.strip() for s in args.stores.split(",") if s.strip()]:
        rates: dict[tuple[str, float | None], list[float]] = {}
        namespaces: list[str] = []
        with tempfile.TemporaryDirectory(prefix="conveyor-bench-dash-") as tmp:
            for r in range(args.rounds):
                for workload in workloads:
                    for every in intervals:
                        if kind == "sqlite":
                            url = f"sqlite:///{Path(tmp) / f'{workload}-{every}-{r}.db'}"
                        elif kind == "postgres":
                            namespace = f"bench_dash_{uuid.uuid4().hex[:8]}"
                            namespaces.append(namespace)
                            url = f"{args.postgres}?namespace={namespace}"
                        else:
                            raise SystemExit(f"unknown store {kind!r}: use sqlite, postgres")
                        n = round(MESSAGES[(kind, workload)] * args.scale)
                        rate, pages = _drain(workload, url, n, tmp, every)
                        rates.setdefault((workload, every), []).append(rate)
                        label = "quiet" if every is None else f"polled every {every:g} s"
                        out.print(
                            f"  {kind} round {r + 1} {workload} {label}: {n:,} messages, "
                            f"{rate:,.0f} msg/s, {pages} overview pages served"
                        )
        if namespaces:
            asyncio.run(_drop(args.postgres, namespaces))
        table = Table(title=f"Worker throughput with the dashboard polling, {kind}")
        table.add_column("workload")
        table.add_column("dashboard")
        table.add_column("median msg/s (min-max)", justify="right")
        table.add_column("cost", justify="right")
        for workload in workloads:
            quiet = statistics.median(rates[(workload, None)])
            for every in intervals:
                values = rates[(workload, every)]
                median = statistics.median(values)
                cost = "" if every is None else f"{1 - median / quiet:+.1%}"
                table.add_row(
                    workload,
                    "none" if every is None else f"overview every {every:g} s",
                    f"{median:,.0f} ({min(values):,.0f}-{max(values):,.0f})",
                    cost,
                )
        out.print(table)
    out.print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
