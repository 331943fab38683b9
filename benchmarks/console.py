"""The operations console at scale: latency of the overview and of a
dead-letter page with many dead letters and a deep queue.

.venv/bin/python -m benchmarks.console [--dead 100000] [--queued 1000000]
                                       [--stores sqlite,postgres] [--requests 50]

Fills a fresh store (a SQLite file, or a fresh PostgreSQL namespace on
127.0.0.1) with DEAD dead letters of three causes and QUEUED ready messages
in one queue, then times, through the admin API in-process (httpx's ASGI
transport, no network), GET /admin/queues, GET /console/ (the overview page:
queues, sparklines, dead-letter groups, workers, breakers, sagas), the first
and a deep page of GET /admin/dead-letters, and a filtered page. Prints
p50 / p95 / max per request in milliseconds. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from conveyor import App, Message, Settings
from conveyor.http import AdminAPI, Dashboard
from conveyor.http import Console as AdminConsole

ERRORS = ("ProviderTimeout", "Declined", "KeyError")


async def _fill(app: App, dead: int, queued: int, out: Console) -> None:
    await app.connect()
    store = app.store
    for start in range(0, dead, 5000):
        async with store.transaction() as tx:
            for n in range(start, min(dead, start + 5000)):
                error = ERRORS[n % 3]
                await store.dead_letter(
                    tx,
                    group="payer",
                    message=Message.create("pay", {"n": n}),
                    reason=f"{error}: order {n}",
                    error_type=error,
                    traceback=(
                        f'Traceback:\n  File "pay.py", line {10 + n % 3}, in charge\n{error}\n'
                    ),
                )
    batch = 10_000
    for start in range(0, queued, batch):
        await app.broker.publish(
            [Message.create("pay", {"n": n}) for n in range(start, min(queued, start + batch))]
        )
        if start and start % 200_000 == 0:
            out.print(f"  queued {start:,}")


def _ms(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000, ordered[-1] * 1000


async def _measure(
    url: str, dead: int, queued: int, requests: int, out: Console
) -> list[tuple[str, float, float, float]]:
    app = App("bench-console", settings=Settings(broker_url=url, store_url=url))

    @app.handler("pay", group="payer")
    async def pay(ctx: object, body: dict[str, int]) -> None:
        """Declares the queue; never run here."""

    started = time.perf_counter()
    await _fill(app, dead, queued, out)
    out.print(f"  filled in {time.perf_counter() - started:.0f} s")
    dashboard = Dashboard(AdminAPI(AdminConsole(app)))
    transport = httpx.ASGITransport(app=dashboard)
    rows = []
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:
        deep = (await c.get("/admin/dead-letters", params={"limit": 1})).json()["items"][0]["id"]
        deep += dead // 2
        targets = [
            ("GET /admin/queues", "/admin/queues", {}),
            ("GET /console/ (overview)", "/console/", {}),
            ("GET /admin/dead-letters (first page)", "/admin/dead-letters", {"limit": 50}),
            (
                "GET /admin/dead-letters (page at the middle)",
                "/admin/dead-letters",
                {"limit": 50, "after": deep},
            ),
            (
                "GET /admin/dead-letters?error_type=Declined",
                "/admin/dead-letters",
                {"limit": 50, "error_type": "Declined"},
            ),
            ("GET /admin/dead-letters/groups", "/admin/dead-letters/groups", {}),
        ]
        for label, path, params in targets:
            first = await c.get(path, params=params)  # warm: the frame index is built here
            assert first.status_code == 200, first.text
            samples = []
            for _ in range(requests):
                t = time.perf_counter()
                response = await c.get(path, params=params)
                samples.append(time.perf_counter() - t)
                assert response.status_code == 200
            rows.append((label, *_ms(samples)))
    await app.close()
    return rows


async def _drop(dsn: str, namespace: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dead", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=1_000_000)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--postgres", default="postgresql://root@127.0.0.1:5432/test")
    args = parser.parse_args()
    out = Console()
    for kind in [s.strip() for s in args.stores.split(",") if s.strip()]:
        if kind == "sqlite":
            tmp = tempfile.TemporaryDirectory(prefix="conveyor-bench-console-")
            url = f"sqlite:///{Path(tmp.name) / 'console.db'}"
        elif kind == "postgres":
            url = f"{args.postgres}?namespace=bench_console_{uuid.uuid4().hex[:8]}"
        else:
            raise SystemExit(f"unknown store {kind!r}: use sqlite, postgres")
        out.print(f"{kind}: {args.dead:,} dead letters, {args.queued:,} queued")
        rows = asyncio.run(_measure(url, args.dead, args.queued, args.requests, out))
        table = Table(title=f"Console on {kind} ({args.dead:,} dead, {args.queued:,} queued)")
        for col in ("request", "p50 ms", "p95 ms", "max ms"):
            table.add_column(col, justify="left" if col == "request" else "right")
        for label, p50, p95, top in rows:
            table.add_row(label, f"{p50:.1f}", f"{p95:.1f}", f"{top:.1f}")
        out.print(table)
        if kind == "postgres":
            asyncio.run(_drop(args.postgres, url.rsplit("=", 1)[1]))


if __name__ == "__main__":
    main()
