"""Shared test helpers beside the shipped ones in ``conveyor.testing``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conveyor import App, Settings
from conveyor.store.sqlite import SqliteStore


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


def store_rows(app: App, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Committed-or-current rows of the app's SQLite store."""
    store = app.store
    assert isinstance(store, SqliteStore)
    return store.db.read(sql, params)


async def queue_counts(app: App) -> tuple[int, int, int]:
    """Ready, in-flight and delayed messages over every topic and group."""
    stats = await app.broker.stats()
    return (
        sum(s.ready for s in stats),
        sum(s.in_flight for s in stats),
        sum(s.delayed for s in stats),
    )
