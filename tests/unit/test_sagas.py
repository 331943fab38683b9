"""Orchestrated sagas on an injected clock: happy path, failure at each step,
timeouts, duplicate and late replies, compensations that fail, history."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, Context, Retry, RetryPolicy
from conveyor.sagas import (
    COMPENSATED,
    COMPLETED,
    FAILED,
    Saga,
    SagaError,
    Sagas,
    Step,
    StepFailed,
    list_sagas,
    rebuild,
    saga_id_of,
)
from conveyor.testing import FakeClock, eventually, running
from tests.helpers import settings_for

STEPS = ("reserve", "charge", "ship", "deliver")


@dataclass
class World:
    """Four participants whose behaviour a test sets, and what they did."""

    app: App
    sagas: Sagas
    clock: FakeClock
    refuse: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    failing_compensations: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def count(self, entry: str) -> int:
        return self.log.count(entry)

    async def run(self, data: dict[str, Any] | None = None, saga_id: str | None = None) -> str:
        async with self.app.transaction() as s:
            return await self.sagas.start(s, "order", data or {"order": 1}, saga_id=saga_id)

    async def state(self, saga_id: str) -> str:
        record = await self.sagas.get(saga_id)
        assert record is not None
        return record.state

    async def settles(self, saga_id: str, state: str, *, advance: float = 0.0) -> None:
        async def check() -> bool:
            if advance:
                self.clock.advance(advance)
            return await self.state(saga_id) == state

        await eventually(check, timeout=15, what=f"saga {saga_id} {state}")
        await self.consistent(saga_id)

    async def consistent(self, saga_id: str) -> None:
        """The stored record is what its history folds to."""
        record = await self.sagas.get(saga_id)
        assert record == rebuild(saga_id, await self.sagas.history(saga_id))

    async def events(self, saga_id: str) -> list[tuple[str, str]]:
        return [(e.type, e.step) for e in await self.sagas.history(saga_id)]


def build(path: str, tmp_path: Path, *, timeouts: dict[str, float] | None = None) -> World:
    clock = FakeClock()
    app = App("sagas", settings=settings_for(path, tmp_path), clock=clock)
    sagas = Sagas(app)
    timeouts = timeouts or {}
    sagas.register(
        Saga(
            "order",
            steps=[
                Step(
                    name,
                    command=f"svc.{name}",
                    compensation=None if name == "deliver" else f"svc.undo_{name}",
                    timeout=timeouts.get(name),
                    compensation_timeout=timeouts.get(f"undo_{name}"),
                    compensation_retry=RetryPolicy(max_attempts=3, base_delay=1.0, jitter=False),
                )
                for name in STEPS
            ],
        )
    )
    world = World(app, sagas, clock)

    def participant(name: str) -> None:
        @sagas.participant(f"svc.{name}", group=name)
        async def act(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
            if name in world.silent:
                raise Retry(delay=3600)
            await ctx.execute(
                "INSERT INTO effects (saga, what) VALUES (?, ?)", [saga_id_of(ctx), name]
            )
            if name in world.refuse:
                raise StepFailed(f"{name} refused")
            world.log.append(name)
            return {f"{name}_ref": f"{name}-{data['order']}"}

        @sagas.participant(f"svc.undo_{name}", group=f"undo_{name}")
        async def undo(ctx: Context, data: dict[str, Any]) -> None:
            left = world.failing_compensations.get(name, 0)
            if left:
                world.failing_compensations[name] = left - 1
                raise StepFailed(f"undo {name} failed")
            world.log.append(f"undo {name}")

    for name in STEPS:
        participant(name)

    @app.on_connect
    async def effects(app: App) -> None:
        async with app.store.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS effects (saga TEXT, what TEXT)")

    return world


@pytest.fixture(params=["bound", "memory"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def started(world: World) -> AsyncIterator[World]:
    async with world.app, running(world.app):
        yield world


async def test_happy_path_runs_every_step_once_and_merges_replies(
    path: str, tmp_path: Path
) -> None:
    """Four steps run in order, once each; each reply's data joins the saga's data."""
    async with started(build(path, tmp_path)) as w:
        sid = await w.run()
        await w.settles(sid, COMPLETED)
        assert w.log == list(STEPS)
        record = await w.sagas.get(sid)
        assert record is not None
        assert record.data == {"order": 1, **{f"{n}_ref": f"{n}-1" for n in STEPS}}
        assert [t for t, _ in await w.events(sid)] == [
            "started",
            *["sent", "succeeded"] * 4,
            "completed",
        ]


@pytest.mark.parametrize("failing", range(4))
async def test_failure_at_each_step_compensates_earlier_steps_in_reverse(
    path: str, tmp_path: Path, failing: int
) -> None:
    """A refused step undoes the steps before it, last first, and not itself."""
    async with started(build(path, tmp_path)) as w:
        w.refuse.add(STEPS[failing])
        sid = await w.run()
        await w.settles(sid, COMPENSATED)
        done = list(STEPS[:failing])
        undone = [f"undo {n}" for n in reversed(done) if n != "deliver"]
        assert w.log == done + undone
        record = await w.sagas.get(sid)
        assert record is not None
        assert record.error == f"{STEPS[failing]} refused"


async def test_step_timeout_compensates_the_silent_step_and_a_late_action_does_nothing(
    path: str, tmp_path: Path
) -> None:
    """A charge that never answers within its timeout is compensated with the
    reservation; the charge command, delivered late, then does nothing."""
    async with started(build(path, tmp_path, timeouts={"charge": 5.0})) as w:
        w.silent.add("charge")
        sid = await w.run()
        await eventually(lambda: "reserve" in w.log, what="reserved")
        await w.settles(sid, COMPENSATED, advance=1.0)
        assert ("failed", "charge") in await w.events(sid)
        assert w.log == ["reserve", "undo reserve"]
        w.silent.clear()
        w.clock.advance(3600)

        async def late_reply_ignored() -> bool:
            return ("ignored", "charge") in await w.events(sid)

        await eventually(late_reply_ignored, what="the late charge answered")
        assert "charge" not in w.log
        assert await _step_status(w, sid, "charge") == "voided"
        await w.consistent(sid)


async def _step_status(w: World, sid: str, step: str) -> str | None:
    async with w.app.store.transaction() as tx:
        row = await tx.fetchone(
            "SELECT status FROM conveyor_saga_steps WHERE saga_id = ? AND step = ?", [sid, step]
        )
    return None if row is None else str(row[0])


async def test_timed_out_step_is_resent_and_the_participant_acts_once(tmp_path: Path) -> None:
    """With a retry policy a timed-out command is sent again; the participant
    answers the repeat with its first reply instead of acting twice."""
    clock = FakeClock()
    app = App("resend", settings=settings_for("memory", tmp_path), clock=clock)
    sagas = Sagas(app)
    sagas.register(
        Saga(
            "once",
            steps=[
                Step(
                    "charge",
                    command="pay.charge",
                    timeout=5.0,
                    retry=RetryPolicy(max_attempts=3, base_delay=0.0, jitter=False),
                )
            ],
        )
    )
    charges: list[str] = []
    held: list[str] = []

    @sagas.participant("pay.charge", group="pay")
    async def charge(ctx: Context, data: dict[str, Any]) -> dict[str, str]:
        charges.append(saga_id_of(ctx))
        return {"txn": "t1"}

    # Hold the first reply back for long after the timeout, so the
    # orchestrator resends; it arrives late and is ignored.
    @app.use
    async def hold(ctx: Context, call_next: Any) -> None:
        first = not held or held == [ctx.message.id]
        if ctx.message.type == "saga.reply" and first and ctx.attempt == 1:
            held.append(ctx.message.id)
            raise Retry(delay=60)
        await call_next()

    async with app, running(app):
        async with app.transaction() as s:
            sid = await sagas.start(s, "once", {})
        await eventually(lambda: len(charges) == 1, what="charged")

        async def sent_twice() -> bool:
            clock.advance(1.0)
            return [e.type for e in await sagas.history(sid)].count("sent") >= 2

        await eventually(sent_twice, what="command resent after the timeout")

        async def completed() -> bool:
            clock.advance(1.0)
            record = await sagas.get(sid)
            return record is not None and record.state == COMPLETED

        await eventually(completed, what="completed")
        assert charges == [sid]

        async def late_first_reply_ignored() -> bool:
            clock.advance(5.0)
            return "ignored" in [e.type for e in await sagas.history(sid)]

        await eventually(late_first_reply_ignored, what="first reply ignored")
        assert charges == [sid]
        record = await sagas.get(sid)
        assert record is not None
        assert record.data == {"txn": "t1"}


async def test_duplicate_and_late_replies_are_ignored_and_recorded(
    path: str, tmp_path: Path
) -> None:
    """A reply delivered twice (under a new message id) or after the saga
    finished changes nothing but is kept in the history as ignored."""
    async with started(build(path, tmp_path)) as w:
        sid = await w.run()
        await w.settles(sid, COMPLETED)
        history = await w.sagas.history(sid)
        first_sent = next(e for e in history if e.type == "sent")
        async with w.app.transaction() as s:
            await s.publish(
                "saga.order",
                {"ok": False, "data": {}, "reason": "late"},
                type="saga.reply",
                key=sid,
                headers={
                    "saga-id": sid,
                    "saga-step": "reserve",
                    "saga-phase": "action",
                    "saga-token": str(first_sent.detail["token"]),
                },
            )

        async def ignored() -> bool:
            return ("ignored", "reserve") in await w.events(sid)

        await eventually(ignored, what="late reply recorded")
        assert await w.state(sid) == COMPLETED
        assert w.log == list(STEPS)
        await w.consistent(sid)


async def test_a_compensation_that_fails_is_retried_until_it_succeeds(
    path: str, tmp_path: Path
) -> None:
    """A refund that fails twice is sent again on its backoff schedule and the
    saga still ends COMPENSATED, with both failures in its history."""
    async with started(build(path, tmp_path)) as w:
        w.refuse.add("ship")
        w.failing_compensations["charge"] = 2
        sid = await w.run()
        await w.settles(sid, COMPENSATED, advance=1.0)
        assert w.log == ["reserve", "charge", "undo charge", "undo reserve"]
        failures = [e for e in await w.sagas.history(sid) if e.type == "compensation_failed"]
        assert [(e.step, e.detail["attempt"]) for e in failures] == [("charge", 1), ("charge", 2)]


async def test_a_compensation_that_keeps_failing_fails_the_saga_into_the_dlq(
    path: str, tmp_path: Path
) -> None:
    """After its last attempt a failing compensation leaves the saga FAILED and
    a dead letter naming the saga; replaying it once fixed resumes the saga."""
    async with started(build(path, tmp_path)) as w:
        w.refuse.add("ship")
        w.failing_compensations["charge"] = 3
        sid = await w.run()
        await w.settles(sid, FAILED, advance=1.0)
        assert "undo reserve" not in w.log
        (dead,) = await w.app.store.dead_letters()
        assert sid in dead.reason
        assert "compensation 'charge' failed 3 times" in dead.reason
        assert (dead.message.topic, dead.message.type) == ("saga.order", "saga.resume")
        assert [r.id for r in await list_sagas(w.app.store, states=[FAILED])] == [sid]

        from conveyor.runtime import replay_dead_letters

        await replay_dead_letters(w.app, None)
        await w.settles(sid, COMPENSATED)
        assert w.log[-2:] == ["undo charge", "undo reserve"]


async def test_starting_a_saga_id_twice_starts_one_saga(path: str, tmp_path: Path) -> None:
    """start() with an existing id changes nothing."""
    async with started(build(path, tmp_path)) as w:
        sid = await w.run(saga_id="order-7")
        assert await w.run(saga_id="order-7") == sid
        await w.settles(sid, COMPLETED)
        assert w.log == list(STEPS)
        assert len(await list_sagas(w.app.store)) == 1


async def test_local_steps_run_in_the_orchestrators_transaction(tmp_path: Path) -> None:
    """Local actions and compensations run once each and their writes commit
    with the saga's progress."""
    clock = FakeClock()
    app = App("local", settings=settings_for("bound", tmp_path), clock=clock)
    sagas = Sagas(app)

    async def note(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
        await ctx.execute("INSERT INTO notes (what) VALUES ('noted')")
        return {"noted": True}

    async def unnote(ctx: Context, data: dict[str, Any]) -> None:
        await ctx.execute("INSERT INTO notes (what) VALUES ('unnoted')")

    async def refuse(ctx: Context, data: dict[str, Any]) -> None:
        await ctx.execute("INSERT INTO notes (what) VALUES ('rolled back')")
        raise StepFailed("no")

    sagas.register(
        Saga(
            "local",
            steps=[Step("note", action=note, compensate=unnote), Step("refuse", action=refuse)],
        )
    )

    @app.on_connect
    async def schema(app: App) -> None:
        async with app.store.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS notes (what TEXT)")

    async with app, running(app):
        async with app.transaction() as s:
            sid = await sagas.start(s, "local", {})

        async def compensated() -> bool:
            record = await sagas.get(sid)
            return record is not None and record.state == COMPENSATED

        await eventually(compensated, what="compensated")
        async with app.store.transaction() as tx:
            rows = await tx.fetchall("SELECT what FROM notes ORDER BY rowid")
        assert [r[0] for r in rows] == ["noted", "unnoted"]
        assert await sagas.get(sid) == rebuild(sid, await sagas.history(sid))


def test_definitions_are_checked() -> None:
    """Bad definitions fail at once with a readable error."""
    from conveyor import ConfigError

    with pytest.raises(ConfigError, match="exactly one of command= or action="):
        Step("x")
    with pytest.raises(ConfigError, match="no steps"):
        Saga("x", steps=[])
    with pytest.raises(ConfigError, match="two steps with one name"):
        Saga("x", steps=[Step("a", command="a"), Step("a", command="b")])
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        Step("a", command="a", timeout=0)


async def test_unknown_saga_names_are_an_error(tmp_path: Path) -> None:
    """start() with a name nobody registered names the registered ones."""
    app = App("x", settings=settings_for("bound", tmp_path))
    sagas = Sagas(app)
    sagas.register(Saga("known", steps=[Step("a", command="a")]))
    async with app, app.transaction() as s:
        with pytest.raises(SagaError, match="known v1"):
            await sagas.start(s, "nope", {})
