"""The observer seam: every message's life reaches the observers from one
settle path, on every runtime path: published (publish, outbox, relay),
fetched, settled (applied, duplicate, retry, dead letter, rolled back) and
dead letters, with a child traceparent on every message a handler sends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from conveyor import App, Context, DeadLetter, Message, Retry, RetryPolicy
from conveyor.messages import trace_id
from conveyor.runtime import Observer
from conveyor.runtime._observe import DeadLettered, Settlement
from conveyor.testing import drained, running
from tests.helpers import PATHS, settings_for


class Recorder(Observer):
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.events: list[Settlement] = []
        self.dead: list[DeadLettered] = []
        self.fetches = 0

    def published(
        self, messages: Sequence[Message], *, via: str, seconds: float, error: BaseException | None
    ) -> None:
        self.sent.extend((via, m.topic) for m in messages)

    def fetched(self, topic: str, group: str, *, count: int, seconds: float) -> None:
        self.fetches += count

    def settled(self, events: Sequence[Settlement]) -> None:
        self.events.extend(events)

    def dead_lettered(self, dead: Sequence[DeadLettered]) -> None:
        self.dead.extend(dead)


@pytest.mark.parametrize("path", PATHS)
async def test_every_outcome_reaches_the_observers_once(path: str, tmp_path: Path) -> None:
    """Applied, duplicate, retried then applied, dead-lettered: each message's
    settlements are what happened to it, in order; its dead letter is heard
    once; what the handler sent is published (via the outbox or the
    relay), in the trace of the message that caused it."""
    app = App("seen", settings=settings_for(path, tmp_path))
    recorder = app.observe(Recorder())
    tries: dict[int, int] = {}

    @app.handler("in", group="g", retry=RetryPolicy(max_attempts=3, base_delay=0))
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        n = body["n"]
        tries[n] = tries.get(n, 0) + 1
        if n == 2 and tries[n] == 1:
            raise Retry(delay=0)
        if n == 3:
            raise DeadLetter("three is refused")
        await ctx.publish("out", {"n": n})

    async with app:
        first = await app.publish("in", {"n": 1})
        await app.broker.publish([first])  # a duplicate of it
        await app.publish("in", {"n": 2})
        await app.publish("in", {"n": 3})
        await drained(app)
        await asyncio.sleep(0)
    outcomes = {}
    for event in recorder.events:
        n = event.message.decode(dict)["n"]
        outcomes.setdefault(n, []).append(event.outcome)
    assert sorted(outcomes[1]) == ["applied", "duplicate"]
    assert outcomes[2] == ["retry", "applied"]
    assert outcomes[3] == ["dead_letter"]
    [dead] = recorder.dead
    assert (dead.group, dead.reason, dead.error_type) == ("g", "three is refused", "DeadLetter")
    assert recorder.fetches >= 5
    assert ("publish", "in") in recorder.sent
    sent = [via for via, topic in recorder.sent if topic == "out"]
    assert sorted(set(sent)) == (["outbox"] if path == "bound" else ["outbox", "relay"])


async def test_a_rolled_back_batch_is_heard_as_rolled_back(tmp_path: Path) -> None:
    """A batch whose commit fails is settled as rolled back, once."""
    app = App("seen", settings=settings_for("bound", tmp_path))
    recorder = app.observe(Recorder())
    fail = asyncio.Event()

    @app.handler("in", group="g")
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        await ctx.execute("CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY)")
        if not fail.is_set():
            fail.set()
            # Not this handler's error: an insert the batch's commit cannot
            # keep (the inbox insert fails the same way on a race).
            await ctx.execute(
                "INSERT INTO conveyor_inbox (grp, msg_id, processed_at) VALUES (?, ?, 0)",
                ("g", ctx.message.id),
            )

    async with app:
        await app.publish("in", {"n": 1})
        async with running(app):
            await drained(app)
    kinds = [e.outcome for e in recorder.events]
    assert kinds[0] == "rolled_back"
    assert "applied" in kinds or "duplicate" in kinds


async def test_a_handler_sends_in_its_message_trace_with_a_span_of_its_own(
    tmp_path: Path,
) -> None:
    """Every message a handler publishes carries the trace id of the message
    it handles and a span id of its own; a message published from nowhere
    starts a trace."""
    app = App("trace", settings=settings_for("bound", tmp_path))
    sent: list[Message] = []

    @app.handler("in", group="g")
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        await ctx.publish("out", {})
        await ctx.publish("out", {})

    @app.handler("out", group="sink")
    async def sink(ctx: Context) -> None:
        sent.append(ctx.message)

    async with app:
        root = await app.publish("in", {"n": 1})
        await drained(app)
    assert trace_id(root.traceparent) is not None
    assert len(sent) == 2
    assert {trace_id(m.traceparent) for m in sent} == {trace_id(root.traceparent)}
    assert len({root.traceparent, *(m.traceparent for m in sent)}) == 3
