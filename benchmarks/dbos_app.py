"""The DBOS Transact side of ``benchmarks/sagas.py``: the 4-step order workflow.

.venv/bin/python -m benchmarks.dbos_app --url URL --n N --mode start|queue

Run in its own process (DBOS keeps global state, threads and an event loop of
its own) by the saga benchmark, which creates the system database at ``URL``
beforehand and drops it afterwards. Prints one line of JSON:
``{"mode", "n", "seconds", "rate", "steps"}``.

The workflow is the order saga with no-op steps: ``reserve``, ``charge``,
``ship`` and ``deliver``, each an ``@DBOS.step()`` returning a small dict, so
DBOS checkpoints every step's output in its system database, as Conveyor
records every step of a saga.

Modes, both timed from the first start to the last workflow completed:

- ``start``: ``DBOS.start_workflow_async`` N times at once in this process,
  then awaiting every handle; the workflows run on this process's event loop.
- ``queue``: ``DBOS.enqueue_workflow_async`` N times at once onto a queue
  without a concurrency limit, then waiting until the system database counts
  N workflows in SUCCESS; the queue's poller dequeues and runs them. This is
  the durable-async equivalent of a saga started in a transaction and run by
  a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSConfig

QUEUE = "orders"
# Every wait below gives up after this long, naming what it waited for.
TIMEOUT = 180.0
# How often the queue's poller looks for enqueued workflows. DBOS's default is
# 1 s; a short interval keeps its latency from dominating a run of seconds.
QUEUE_POLL = 0.01
# Enqueue/start in chunks so that thousands of coroutines do not all queue up
# for the connection pool at once.
CHUNK = 200


@DBOS.step()
async def reserve(order: dict[str, Any]) -> dict[str, Any]:
    return {"reserved": order["id"]}


@DBOS.step()
async def charge(order: dict[str, Any]) -> dict[str, Any]:
    return {"charged": order["amount"]}


@DBOS.step()
async def ship(order: dict[str, Any]) -> dict[str, Any]:
    return {"shipped": order["id"]}


@DBOS.step()
async def deliver(order: dict[str, Any]) -> dict[str, Any]:
    return {"delivered": order["id"]}


@DBOS.workflow()
async def order_saga(order: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for step in (reserve, charge, ship, deliver):
        result |= await step(order)
    return result


@DBOS.step()
def reserve_sync(order: dict[str, Any]) -> dict[str, Any]:
    return {"reserved": order["id"]}


@DBOS.step()
def charge_sync(order: dict[str, Any]) -> dict[str, Any]:
    return {"charged": order["amount"]}


@DBOS.step()
def ship_sync(order: dict[str, Any]) -> dict[str, Any]:
    return {"shipped": order["id"]}


@DBOS.step()
def deliver_sync(order: dict[str, Any]) -> dict[str, Any]:
    return {"delivered": order["id"]}


@DBOS.workflow()
def order_saga_sync(order: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for step in (reserve_sync, charge_sync, ship_sync, deliver_sync):
        result |= step(order)
    return result


def _orders(n: int) -> list[dict[str, Any]]:
    return [{"id": f"o{i}", "amount": 1234, "sku": "sku-1", "qty": 1} for i in range(n)]


def _count(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def _wait_success(engine: sa.Engine, n: int, what: str) -> None:
    """Poll the system database until ``n`` workflows are in SUCCESS."""
    sql = "SELECT count(*) FROM dbos.workflow_status WHERE status = 'SUCCESS'"
    deadline = time.monotonic() + TIMEOUT
    while (done := _count(engine, sql)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"DBOS {what}: {done} of {n} workflows done after {TIMEOUT:g}s")
        time.sleep(0.01)


async def async_start(n: int) -> float:
    orders = _orders(n)
    start = time.perf_counter()
    handles = []
    for i in range(0, n, CHUNK):
        handles += await asyncio.gather(
            *(DBOS.start_workflow_async(order_saga, o) for o in orders[i : i + CHUNK])
        )
    await asyncio.wait_for(asyncio.gather(*(h.get_result() for h in handles)), TIMEOUT)
    return time.perf_counter() - start


async def async_queue(n: int, engine: sa.Engine) -> float:
    await DBOS.register_queue_async(QUEUE, polling_interval_sec=QUEUE_POLL)
    orders = _orders(n)
    start = time.perf_counter()
    for i in range(0, n, CHUNK):
        await asyncio.gather(
            *(DBOS.enqueue_workflow_async(QUEUE, order_saga, o) for o in orders[i : i + CHUNK])
        )
    await asyncio.to_thread(_wait_success, engine, n, "queue")
    return time.perf_counter() - start


def sync_start(n: int) -> float:
    orders = _orders(n)
    start = time.perf_counter()
    handles = [DBOS.start_workflow(order_saga_sync, o) for o in orders]
    # get_result has no timeout: the parent's subprocess timeout bounds this
    for handle in handles:
        handle.get_result()
    return time.perf_counter() - start


def sync_queue(n: int, engine: sa.Engine) -> float:
    DBOS.register_queue(QUEUE, polling_interval_sec=QUEUE_POLL)
    orders = _orders(n)
    start = time.perf_counter()
    for o in orders:
        DBOS.enqueue_workflow(QUEUE, order_saga_sync, o)
    _wait_success(engine, n, "queue")
    return time.perf_counter() - start


def main(url: str, n: int, mode: str, style: str) -> dict[str, Any]:
    config: DBOSConfig = {
        "name": "bench-sagas",
        "system_database_url": url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        if style == "async":
            seconds = asyncio.run(async_start(n) if mode == "start" else async_queue(n, engine))
        else:
            seconds = sync_start(n) if mode == "start" else sync_queue(n, engine)
        steps = _count(engine, "SELECT count(*) FROM dbos.operation_outputs")
        return {
            "mode": mode,
            "style": style,
            "n": n,
            "seconds": seconds,
            "rate": n / seconds,
            "steps": steps,
        }
    finally:
        engine.dispose()
        DBOS.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--mode", choices=("start", "queue"), default="queue")
    parser.add_argument("--style", choices=("async", "sync"), default="async")
    args = parser.parse_args()
    print(json.dumps(main(args.url, args.n, args.mode, args.style)))
