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
from conveyor.testing._clock import FakeClock

__all__ = ["drained", "eventually", "pending", "running"]

# Fake seconds ``drained`` skips per poll while only delayed messages are left.
_FIRST_SKIP = 0.1
_MAX_SKIP = 60.0

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
    """Messages the app's handlers have not settled yet: ready, in flight or
    delayed in their queues (on ``topic``, or every topic), plus outbox rows
    not yet published. Messages for groups the app does not run (or for no
    group yet) are not counted."""
    active, delayed = await _counts(app, topic)
    return active + delayed


async def _counts(app: App, topic: str | None) -> tuple[int, int]:
    """(ready + in flight + outbox, delayed) for the app's handlers."""
    await app.connect()
    mine = {(h.topic, h.group) for h in app.handlers if topic is None or h.topic == topic}
    # The outbox first: a row relayed between the two reads is then counted
    # by the broker's, not missed by both.
    outbox = (await app.store.outbox_stats()).pending if topic is None else 0
    ours = [s for s in await app.broker.stats() if (s.topic, s.group) in mine]
    return outbox + sum(s.ready + s.in_flight for s in ours), sum(s.delayed for s in ours)


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
    in real time, unless the app's clock is a ``FakeClock``: then, while only
    delayed messages are left, the clock is advanced in growing steps (0.1 s
    doubling to 60 s) instead. "Nothing pending" must be seen twice in a row with no
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
    clock = app.clock if isinstance(app.clock, FakeClock) else None
    deadline = time.monotonic() + timeout
    calm = 0
    seen = -1
    skip = _FIRST_SKIP
    while True:
        if task.done():
            # The worker died (say, it could not connect): its error, not a timeout.
            await task
            raise AssertionError("the worker stopped before the queues drained")
        active, delayed = await _counts(app, topic)
        left = active + delayed
        processed = worker.processed
        calm = calm + 1 if left == 0 and processed == seen else (1 if left == 0 else 0)
        seen = processed
        if calm >= 2:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{left} message(s) still pending after {timeout:g}s")
        if clock is not None and active == 0 and delayed:
            # Only retries waiting for their backoff are left: skip time.
            clock.advance(skip)
            skip = min(skip * 2, _MAX_SKIP)
        else:
            skip = _FIRST_SKIP
        await asyncio.sleep(0.01)
