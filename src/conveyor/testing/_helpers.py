"""Run an app's handlers inside a test and wait on conditions with a deadline.

``running(app)`` runs a worker for the length of a block; ``drained(app)``
returns once nothing is left to do (running a worker for as long as it takes
when none is running); ``eventually(...)`` polls a condition until a deadline.
None of them sleeps a fixed time: each returns as soon as its condition holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from conveyor.runtime import App, Worker

__all__ = ["drained", "eventually", "pending", "running"]

_workers: weakref.WeakKeyDictionary[App, tuple[Worker, asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary()
)


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` (sync or async) every ``interval`` seconds until it
    returns true; raise ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g}s")
        await asyncio.sleep(interval)


async def pending(app: App, topic: str | None = None) -> int:
    """Messages not settled yet: ready, in flight or delayed in the broker
    (on ``topic``, or every topic), plus outbox rows not yet published."""
    await app.connect()
    # The outbox first: a row relayed between the two reads is then counted
    # by the broker's, not missed by both.
    outbox = (await app.store.outbox_stats()).pending if topic is None else 0
    stats = await app.broker.stats()
    return outbox + sum(
        s.ready + s.in_flight + s.delayed for s in stats if topic is None or s.topic == topic
    )


@contextlib.asynccontextmanager
async def running(app: App, *, grace_period: float | None = None) -> AsyncIterator[Worker]:
    """Run a worker of ``app`` in this event loop for the block; on exit stop
    it gracefully and wait for it (at most ``grace_period`` + 10 seconds)."""
    worker = app.worker(grace_period=grace_period)
    task = asyncio.create_task(worker.run())
    _workers[app] = (worker, task)
    try:
        yield worker
    finally:
        if _workers.get(app) == (worker, task):
            del _workers[app]
        worker.stop()
        await asyncio.wait_for(task, worker.grace_period + 10.0)


async def drained(app: App, *, topic: str | None = None, timeout: float = 30.0) -> None:
    """Return once nothing is pending (see ``pending``) for ``app``.

    Inside ``running(app)`` this waits on that worker; otherwise it runs a
    worker of its own until then and stops it. Delayed retries are waited for
    in real time. "Nothing pending" must be seen twice in a row with no
    message handled in between, so a message passing from the outbox to the
    broker between two reads is never taken for an empty queue. Raises
    ``AssertionError`` with what is still pending after ``timeout`` seconds.
    """
    found = _workers.get(app)
    if found is None:
        async with running(app):
            await _quiet(app, _workers[app], topic, timeout)
    else:
        await _quiet(app, found, topic, timeout)


async def _quiet(
    app: App, found: tuple[Worker, asyncio.Task[None]], topic: str | None, timeout: float
) -> None:
    worker, task = found
    deadline = time.monotonic() + timeout
    calm = 0
    seen = -1
    while True:
        if task.done():
            # The worker died (say, it could not connect): its error, not a timeout.
            await task
            raise AssertionError("the worker stopped before the queues drained")
        left = await pending(app, topic)
        processed = worker.processed
        calm = calm + 1 if left == 0 and processed == seen else (1 if left == 0 else 0)
        seen = processed
        if calm >= 2:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{left} message(s) still pending after {timeout:g}s")
        await asyncio.sleep(0.01)
