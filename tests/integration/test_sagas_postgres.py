"""Orchestrated sagas on PostgreSQL, on the real clock: the PostgreSQL broker
bound to its store (one transaction per unit of work), and a Redis broker in
front of a PostgreSQL store (outbox relay; deadlines scanned from the saga rows)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from conveyor import App, Context, Retry, RetryPolicy, Settings
from conveyor.sagas import (
    COMPENSATED,
    COMPLETED,
    Saga,
    Sagas,
    Step,
    StepFailed,
    list_sagas,
    rebuild,
    saga_id_of,
)
from conveyor.testing import drained, eventually, running
from tests.namespaces import drop_all
from tests.servers import POSTGRES_URL, REDIS_URL, namespaced

STEPS = ("reserve", "charge", "ship")
BROKERS = ("postgres", "redis")


@dataclass
class World:
    """A saga app on PostgreSQL whose participants a test steers."""

    app: App
    sagas: Sagas
    refuse: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)

    async def start(self, data: dict[str, Any], saga_id: str | None = None) -> str:
        async with self.app.transaction() as s:
            return await self.sagas.start(s, "order", data, saga_id=saga_id)

    async def settles(self, saga_id: str, state: str, *, timeout: float = 30.0) -> None:
        async def reached() -> bool:
            record = await self.sagas.get(saga_id)
            return record is not None and record.state == state

        await eventually(reached, timeout=timeout, interval=0.05, what=f"saga {saga_id} {state}")
        await self.consistent(saga_id)

    async def consistent(self, saga_id: str) -> None:
        """The stored record is what its history folds to."""
        record = await self.sagas.get(saga_id)
        assert record == rebuild(saga_id, await self.sagas.history(saga_id))

    async def events(self, saga_id: str) -> list[tuple[str, str]]:
        return [(e.type, e.step) for e in await self.sagas.history(saga_id)]

    async def effects(self, saga_id: str | None = None) -> list[str]:
        """What the participants did, in commit order (for one saga, or all)."""
        async with self.app.transaction() as s:
            if saga_id is None:
                rows = await s.fetchall("SELECT saga, what FROM effects ORDER BY n")
                return [f"{r[0]} {r[1]}" for r in rows]
            rows = await s.fetchall("SELECT what FROM effects WHERE saga = ? ORDER BY n", [saga_id])
        return [str(r[0]) for r in rows]

    async def step_status(self, saga_id: str, step: str) -> str | None:
        async with self.app.transaction() as s:
            row = await s.fetchone(
                "SELECT status FROM conveyor_saga_steps WHERE saga_id = ? AND step = ?",
                [saga_id, step],
            )
        return None if row is None else str(row[0])


@contextlib.asynccontextmanager
async def world(
    broker: str,
    *,
    timeouts: dict[str, float] | None = None,
    retries: dict[str, RetryPolicy] | None = None,
    concurrency: int = 1,
) -> AsyncIterator[World]:
    """A running saga app on a fresh PostgreSQL namespace (and Redis one);
    everything it created is dropped afterwards."""
    store_url = namespaced(POSTGRES_URL, prefix="saga")
    broker_url = store_url if broker == "postgres" else namespaced(REDIS_URL, prefix="saga")
    app = App(
        "sagas-pg",
        settings=Settings(broker_url=broker_url, store_url=store_url, idle_poll=0.01),
    )
    sagas = Sagas(app, concurrency=concurrency)
    timeouts, retries = timeouts or {}, retries or {}
    sagas.register(
        Saga(
            "order",
            steps=[
                Step(
                    name,
                    command=f"svc.{name}",
                    compensation=f"svc.undo_{name}",
                    timeout=timeouts.get(name),
                    retry=retries.get(name, RetryPolicy(max_attempts=1)),
                )
                for name in STEPS
            ],
        )
    )
    w = World(app, sagas)

    def participant(name: str) -> None:
        @sagas.participant(f"svc.{name}", group=name, concurrency=concurrency)
        async def act(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
            if name in w.silent:
                raise Retry(delay=3600)
            if name in w.refuse:
                raise StepFailed(f"{name} refused")
            await ctx.execute(
                "INSERT INTO effects (saga, what) VALUES (?, ?)", [saga_id_of(ctx), name]
            )
            return {f"{name}_ref": f"{name}-{data['order']}"}

        @sagas.participant(f"svc.undo_{name}", group=f"undo_{name}", concurrency=concurrency)
        async def undo(ctx: Context, data: dict[str, Any]) -> None:
            await ctx.execute(
                "INSERT INTO effects (saga, what) VALUES (?, ?)",
                [saga_id_of(ctx), f"undo {name}"],
            )

    for name in STEPS:
        participant(name)

    @app.on_connect
    async def effects(app: App) -> None:
        async with app.store.transaction() as tx:
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS effects "
                "(n BIGSERIAL PRIMARY KEY, saga TEXT NOT NULL, what TEXT NOT NULL)"
            )

    try:
        async with app, running(app):
            yield w
    finally:
        await drop_all(list(dict.fromkeys([broker_url, store_url])))


@pytest.mark.parametrize("broker", BROKERS)
async def test_happy_path_runs_every_step_once_in_order(broker: str) -> None:
    """Three steps act once each, in order; their replies join the saga's data
    and the stored record is what its history folds to."""
    async with world(broker) as w:
        sid = await w.start({"order": 1})
        await w.settles(sid, COMPLETED)
        assert await w.effects(sid) == list(STEPS)
        record = await w.sagas.get(sid)
        assert record is not None
        assert record.data == {"order": 1, **{f"{n}_ref": f"{n}-1" for n in STEPS}}
        assert [t for t, _ in await w.events(sid)] == [
            "started",
            *["sent", "succeeded"] * len(STEPS),
            "completed",
        ]


@pytest.mark.parametrize("broker", BROKERS)
async def test_refused_step_compensates_the_earlier_steps_in_reverse(broker: str) -> None:
    """A refused ship undoes charge, then reserve, and not ship itself."""
    async with world(broker) as w:
        w.refuse.add("ship")
        sid = await w.start({"order": 2})
        await w.settles(sid, COMPENSATED)
        assert await w.effects(sid) == ["reserve", "charge", "undo charge", "undo reserve"]
        compensations = [s for t, s in await w.events(sid) if t == "compensated"]
        assert compensations == ["charge", "reserve"]
        record = await w.sagas.get(sid)
        assert record is not None
        assert record.error == "ship refused"


async def test_a_silent_step_times_out_is_resent_then_compensated_with_the_others() -> None:
    """A charge that never answers is sent again after its 0.5 s timeout, then
    counts as failed: it is voided at its participant (nothing to undo, and a
    late charge would do nothing) and the reservation is undone."""
    once_more = RetryPolicy(max_attempts=2, base_delay=0.0, jitter=False)
    async with world("postgres", timeouts={"charge": 0.5}, retries={"charge": once_more}) as w:
        w.silent.add("charge")
        sid = await w.start({"order": 3})
        await w.settles(sid, COMPENSATED)
        events = await w.events(sid)
        history = await w.sagas.history(sid)
        charge_sends = [
            e.detail["attempt"]
            for e in history
            if (e.type, e.step, e.detail.get("phase")) == ("sent", "charge", "action")
        ]
        assert charge_sends == [1, 2]
        failed = next(e for e in history if e.type == "failed")
        assert (failed.step, failed.detail["timed_out"]) == ("charge", True)
        assert failed.detail["reason"] == "no reply within 0.5s"
        assert [s for t, s in events if t == "compensated"] == ["charge", "reserve"]
        assert await w.effects(sid) == ["reserve", "undo reserve"]
        assert await w.step_status(sid, "charge") == "voided"


async def test_starting_one_saga_id_twice_starts_one_saga() -> None:
    """start() with an id that exists returns it and changes nothing: one saga
    row, one history, each step acted once."""
    async with world("postgres") as w:
        sid = await w.start({"order": 4}, saga_id="order-4")
        assert await w.start({"order": 99}, saga_id="order-4") == sid
        await w.settles(sid, COMPLETED)
        assert await w.start({"order": 99}, saga_id="order-4") == sid
        assert await w.effects() == [f"order-4 {n}" for n in STEPS]
        assert [r.id for r in await list_sagas(w.app.store)] == ["order-4"]
        record = await w.sagas.get(sid)
        assert record is not None
        assert record.data["order"] == 4
        assert [t for t, _ in await w.events(sid)].count("started") == 1


async def test_two_transactions_starting_one_saga_id_start_one_saga() -> None:
    """A start() racing another start() of the same id that has not committed
    yet waits for it and returns the id: no error, one saga, no second command."""
    async with world("postgres") as w:
        inserted, release = asyncio.Event(), asyncio.Event()
        first_pid: list[int] = []

        async def first() -> str:
            async with w.app.transaction() as s:
                sid = await w.sagas.start(s, "order", {"order": 5}, saga_id="order-5")
                row = await s.fetchone("SELECT pg_backend_pid()")
                assert row is not None
                first_pid.append(int(row[0]))
                inserted.set()
                await release.wait()
            return sid

        async def second() -> str:
            return await w.start({"order": 6}, saga_id="order-5")

        first_task = asyncio.create_task(first())
        await asyncio.wait_for(inserted.wait(), 10)
        second_task = asyncio.create_task(second())

        async def second_waits_on_first() -> bool:
            async with w.app.transaction() as s:
                row = await s.fetchone(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE ? = ANY(pg_blocking_pids(pid))",
                    [first_pid[0]],
                )
            return row is not None and int(row[0]) > 0

        try:
            await eventually(second_waits_on_first, what="the second start waits on the first")
        finally:
            release.set()
        assert await asyncio.wait_for(asyncio.gather(first_task, second_task), 20) == [
            "order-5",
            "order-5",
        ]
        await w.settles("order-5", COMPLETED)
        await drained(w.app)
        # The second start sent nothing: no second command was answered.
        assert "ignored" not in [t for t, _ in await w.events("order-5")]
        assert await w.effects() == [f"order-5 {n}" for n in STEPS]
        record = await w.sagas.get("order-5")
        assert record is not None
        assert record.data["order"] == 5


@pytest.mark.parametrize("broker", BROKERS)
async def test_fifty_concurrent_sagas_complete_and_each_history_rebuilds(broker: str) -> None:
    """50 sagas started at once, orchestrated with concurrency 4, all complete;
    every participant acted once per saga and every history folds to its record."""
    n = 50
    async with world(broker, concurrency=4) as w:
        ids = await asyncio.gather(*(w.start({"order": i}) for i in range(n)))
        assert len(set(ids)) == n

        async def all_completed() -> bool:
            records = await list_sagas(w.app.store, states=[COMPLETED], limit=n + 1)
            return len(records) == n

        await eventually(all_completed, timeout=90, interval=0.1, what=f"{n} sagas completed")
        effects = await w.effects()
        assert sorted(effects) == sorted(f"{sid} {step}" for sid in ids for step in STEPS)
        for sid in ids:
            await w.consistent(sid)
            assert [t for t, _ in await w.events(sid)] == [
                "started",
                *["sent", "succeeded"] * len(STEPS),
                "completed",
            ]


async def test_two_deliveries_of_one_compensation_on_two_replicas_undo_once() -> None:
    """The same compensation delivered twice at once to two replicas (a resend
    after its timeout while the first still runs) undoes the step once: the
    second waits for the first's record, then finds the step compensated.
    The first undo holds on until the second delivery has started."""
    url = namespaced(POSTGRES_URL, prefix="saga")
    settings = Settings(broker_url=url, store_url=url, idle_poll=0.01, prefetch=1)
    started: list[str] = []
    both_started = asyncio.Event()
    undone: list[str] = []

    def replica(name: str) -> App:
        app = App(name, settings=settings)
        sagas = Sagas(app)

        async def seen(ctx: Context, call_next: Any) -> None:
            started.append(name)
            if len(started) == 2:
                both_started.set()
            await call_next()

        app.use(seen)

        @sagas.participant("svc.undo_charge", group="undo_charge")
        async def undo(ctx: Context, data: dict[str, Any]) -> None:
            undone.append(name)
            if len(undone) == 1:
                await asyncio.wait_for(both_started.wait(), 20)

        return app

    one, two = replica("one"), replica("two")
    headers = {
        "saga-id": "s-1",
        "saga-step": "charge",
        "saga-phase": "compensation",
        "saga-token": "t-1",
        "saga-reply-to": "saga.order",
    }
    try:
        async with one, two:
            async with one.transaction() as s:
                await s.execute(
                    "INSERT INTO conveyor_saga_steps (saga_id, step, status, reply, updated_at) "
                    "VALUES ('s-1', 'charge', 'done', '{\"ok\": true, \"data\": {}}', 0)"
                )
            for _ in range(2):
                await one.publish("svc.undo_charge", {"order": 1}, headers=headers)
            async with running(one), running(two):
                await eventually(lambda: len(started) == 2, timeout=20, what="both deliveries ran")
                await drained(one)
                await drained(two)
            async with one.transaction() as s:
                status = await s.fetchone(
                    "SELECT status FROM conveyor_saga_steps WHERE saga_id = 's-1'"
                )
        assert sorted(started) == ["one", "two"]
        assert len(undone) == 1, f"the compensation ran {len(undone)} times: {undone}"
        assert status == ("compensated",)
    finally:
        await drop_all([url])
