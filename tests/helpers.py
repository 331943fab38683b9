"""Shared test helpers: wait on a condition with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from conveyor import App, Settings, Worker
from conveyor.store.sqlite import SqliteStore


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 20.0, interval: float = 0.05
) -> None:
    """Blocking form of ``eventually`` for tests that drive subprocesses."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


# Runtime paths. "bound": broker and store are one SQLite file, so the whole
# unit of work is one transaction. The generic path (broker.fetch with a lease,
# one store transaction per delivery, ack after commit, outbox relay) runs as
# "memory" (in-process broker + SQLite store) and "split" (SQLite broker and a
# separate SQLite store file).
PATHS = ("bound", "memory", "split")


def settings_for(path: str, tmp_path: Path, **options: Any) -> Settings:
    """Settings for one runtime path, with a short idle poll for tests."""
    options.setdefault("idle_poll", 0.01)
    if path == "bound":
        url = f"sqlite:///{tmp_path / 'conveyor.db'}"
        return Settings(broker_url=url, store_url=url, **options)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    if path == "memory":
        return Settings(broker_url=f"memory://{uuid.uuid4().hex}", store_url=store_url, **options)
    if path == "split":
        return Settings(
            broker_url=f"sqlite:///{tmp_path / 'broker.db'}", store_url=store_url, **options
        )
    raise ValueError(f"unknown runtime path {path!r}")


@contextlib.asynccontextmanager
async def running(app: App, *, grace_period: float | None = None) -> AsyncIterator[Worker]:
    """Run a worker of ``app`` for the block, then stop it and wait for it."""
    worker = app.worker(grace_period=grace_period)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


def store_rows(app: App, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Committed-or-current rows of the app's SQLite store."""
    store = app.store
    assert isinstance(store, SqliteStore)
    return store.db.read(sql, params)


async def pending(app: App, topic: str | None = None) -> int:
    """Messages not yet acknowledged (ready, in flight or delayed), plus, on the
    generic path, outbox rows not yet relayed to the broker."""
    stats = await app.broker.stats()
    count = sum(
        s.ready + s.in_flight + s.delayed for s in stats if topic is None or s.topic == topic
    )
    if app.broker.url != app.store.url:
        (outbox,) = store_rows(app, "SELECT COUNT(*) FROM conveyor_outbox")
        count += outbox[0]
    return count


async def drained(app: App, topic: str | None = None) -> bool:
    """Whether nothing is pending (see ``pending``)."""
    return await pending(app, topic) == 0


async def queue_counts(app: App) -> tuple[int, int, int]:
    """Ready, in-flight and delayed messages over every topic and group."""
    stats = await app.broker.stats()
    return (
        sum(s.ready for s in stats),
        sum(s.in_flight for s in stats),
        sum(s.delayed for s in stats),
    )
