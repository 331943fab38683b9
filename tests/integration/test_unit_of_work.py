"""The unit of work: inbox, handler writes, outbox and acknowledgement commit
together, on the bound path (broker and store in one SQLite file) and on the
generic path (broker fetch with a lease, store transaction, ack after commit)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pydantic
import pytest

from conveyor import (
    App,
    Context,
    DeadLetter,
    Message,
    PermanentError,
    Retry,
    RetryPolicy,
    Skip,
)
from conveyor.brokers import broker_from_url
from conveyor.brokers._protocol import Broker, Capabilities, Delivery, QueueStats
from conveyor.brokers.sqlite import _Binding
from conveyor.errors import BrokerError
from conveyor.store._protocol import Transaction
from conveyor.testing import FakeClock, drained, eventually, pending, running
from tests.helpers import PATHS, settings_for, store_rows

GENERIC = ("memory", "split")


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_app(path: str, tmp_path: Path, *, clock: FakeClock | None = None, **options: Any) -> App:
    return App("uow", settings=settings_for(path, tmp_path, **options), clock=clock)


async def create_effects(app: App) -> None:
    async with app.transaction() as s:
        await s.execute("CREATE TABLE effects (msg_id TEXT NOT NULL, n INTEGER)")


def effects(app: App) -> list[tuple[Any, ...]]:
    return store_rows(app, "SELECT msg_id, COUNT(*) FROM effects GROUP BY msg_id ORDER BY msg_id")


async def apply_effect(ctx: Context, body: dict[str, int]) -> None:
    await ctx.execute("INSERT INTO effects (msg_id, n) VALUES (?, ?)", (ctx.message.id, body["n"]))


def sink_for(app: App, topic: str) -> list[Message]:
    """Subscribe a recording handler to ``topic``, so messages sent there queue up."""
    sunk: list[Message] = []

    @app.handler(topic, group="sink")
    async def sink(ctx: Context) -> None:
        sunk.append(ctx.message)

    return sunk


async def queue_stats(app: App, topic: str) -> QueueStats:
    (stats,) = [s for s in await app.broker.stats() if s.topic == topic]
    return stats


async def probe(app: App, topic: str, seen: Callable[[], int]) -> None:
    """Publish a no-op message on ``topic`` and wait until it is handled: by
    then the consumer has fetched everything on ``topic`` that was ready."""
    before = seen()
    await app.publish(topic, {"probe": True})
    await eventually(lambda: seen() > before, what="probe handled")


async def test_duplicate_delivery_applies_once_and_acks_every_copy(
    path: str, tmp_path: Path
) -> None:
    """The same message published twice, enqueued again and redelivered after it was
    handled applies its effects once, and every copy is acknowledged."""
    app = make_app(path, tmp_path)
    app.handler("work", group="apply")(apply_effect)
    async with app:
        await create_effects(app)
        message = Message.create("work", {"n": 1})
        await app.broker.publish([message])
        await app.broker.publish([message])
        await app.broker.enqueue("apply", [message])
        async with running(app) as worker:
            await eventually(lambda: worker.processed == 3, what="three copies handled")
            await drained(app)
            await app.broker.publish([message])
            await eventually(lambda: worker.processed == 4, what="late copy handled")
            await drained(app)
        assert effects(app) == [(message.id, 1)]


@pytest.mark.parametrize("path", GENERIC)
async def test_crash_between_commit_and_ack_applies_nothing_twice(
    path: str, tmp_path: Path
) -> None:
    """When the ack after a committed unit of work fails, the message is delivered
    again once its lease runs out, and the inbox skips it: effects and sent
    messages happen once."""
    clock = FakeClock()
    settings = settings_for(path, tmp_path, lease=30.0)
    broker = AckCrashesOnce(broker_from_url(settings.broker_url, clock=clock), topic="work")
    app = App("uow", settings=settings, broker=broker, clock=clock)
    calls: list[int] = []
    forwarded: list[str] = []

    @app.handler("work", group="apply")
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.message.attempt)
        await apply_effect(ctx, body)
        await ctx.publish("applied", body)

    @app.handler("applied", group="record")
    async def record(ctx: Context, body: dict[str, int]) -> None:
        forwarded.append(ctx.message.id)

    async with app:
        await create_effects(app)
        message = await app.publish("work", {"n": 7})
        async with running(app):
            await eventually(lambda: broker.crashed, what="ack crash")
            assert effects(app) == [(message.id, 1)]
            assert (await queue_stats(app, "work")).in_flight == 1
            clock.advance(31)
            await drained(app)
            await eventually(lambda: len(forwarded) == 1, what="forwarded once")
        assert calls == [1]
        assert effects(app) == [(message.id, 1)]
        assert len(set(forwarded)) == 1
        assert await app.store.dead_letters() == []


async def test_failure_before_the_bound_commit_rolls_back_the_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the bound path a failure inside the batch transaction (here its ack, after
    every handler ran) rolls back inbox records and effects of the whole batch; the
    batch is handed back at once, without waiting for its lease, and each message
    is delivered again and applied exactly once."""
    clock = FakeClock()
    app = make_app("bound", tmp_path, clock=clock, prefetch=10, lease=30.0)
    calls: list[tuple[int, int]] = []
    real_ack = _Binding.ack
    acks = 0

    async def crashing_ack(self: _Binding, tx: Transaction, deliveries: Sequence[Delivery]) -> None:
        nonlocal acks
        acks += 1
        if acks == 1:
            raise BrokerError("simulated crash before commit")
        await real_ack(self, tx, deliveries)

    monkeypatch.setattr(_Binding, "ack", crashing_ack)

    @app.handler("work", group="apply")
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append((body["n"], ctx.attempt))
        await apply_effect(ctx, body)

    async with app:
        await create_effects(app)
        async with app.transaction() as s:
            sent = [await s.publish("work", {"n": n}) for n in range(5)]
        async with running(app):
            await eventually(lambda: acks >= 1, what="batch failed")
            # The clock never moves: nothing here waits for the 30 s lease.
            await drained(app)
        assert calls[:5] == [(n, 1) for n in range(5)]
        assert calls[5:] == [(n, 2) for n in range(5)]
        assert effects(app) == sorted((m.id, 1) for m in sent)


@pytest.mark.parametrize("path", PATHS)
async def test_handler_exception_leaks_no_write_and_no_message(path: str, tmp_path: Path) -> None:
    """A handler that writes a row and publishes, then raises, leaves neither the
    row nor the message behind; after the retry succeeds there is exactly one of each."""
    clock = FakeClock()
    app = make_app(path, tmp_path, clock=clock)

    @app.handler("work", group="apply", retry=RetryPolicy(base_delay=5.0, jitter=False))
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        await apply_effect(ctx, body)
        await ctx.publish("downstream", body)
        if ctx.attempt == 1:
            raise RuntimeError("downstream dependency unavailable")

    sunk = sink_for(app, "downstream")

    async with app:
        await create_effects(app)
        message = await app.publish("work", {"n": 1})
        async with running(app):
            await eventually(lambda: _delayed(app, "work"), what="first attempt failed and delayed")
            assert effects(app) == []
            assert store_rows(app, "SELECT COUNT(*) FROM conveyor_outbox") == [(0,)]
            assert await pending(app, "downstream") == 0
            assert sunk == []
            clock.advance(5.0)
            await eventually(lambda: len(sunk) == 1, what="downstream message handled")
            await drained(app)
        assert effects(app) == [(message.id, 1)]
        assert [m.causation_id for m in sunk] == [message.id]
        assert await app.store.dead_letters() == []


async def _delayed(app: App, topic: str) -> bool:
    return (await queue_stats(app, topic)).delayed == 1


@pytest.mark.parametrize("path", ["bound", "memory"])
async def test_middleware_runs_in_order_around_the_handler_and_sees_the_outcome(
    path: str, tmp_path: Path
) -> None:
    """Middleware wraps the handler first-added-outermost, runs inside the unit of
    work, and observes the handler's result or exception."""
    events: list[str] = []

    def recorder(name: str) -> Callable[[Context, Callable[[], Awaitable[None]]], Awaitable[None]]:
        async def middleware(ctx: Context, call_next: Callable[[], Awaitable[None]]) -> None:
            events.append(f"{name}:before")
            try:
                await call_next()
            except BaseException as exc:
                events.append(f"{name}:{type(exc).__name__}")
                raise
            events.append(f"{name}:ok")

        return middleware

    app = App("uow", settings=settings_for(path, tmp_path), middleware=[recorder("outer")])
    app.use(recorder("middle"))
    app.use(recorder("inner"))

    @app.handler("work", group="apply")
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        events.append("handler")
        if body["n"] == 2:
            raise PermanentError("cannot apply 2")
        await apply_effect(ctx, body)

    async with app:
        await create_effects(app)
        await app.publish("work", {"n": 1})
        async with running(app):
            await drained(app)
            assert events == [
                "outer:before",
                "middle:before",
                "inner:before",
                "handler",
                "inner:ok",
                "middle:ok",
                "outer:ok",
            ]
            events.clear()
            await app.publish("work", {"n": 2})
            await drained(app)
        assert events == [
            "outer:before",
            "middle:before",
            "inner:before",
            "handler",
            "inner:PermanentError",
            "middle:PermanentError",
            "outer:PermanentError",
        ]
        (dead,) = await app.store.dead_letters()
        assert "cannot apply 2" in dead.reason
        assert len(effects(app)) == 1


async def test_retry_signal_redelivers_after_its_delay(path: str, tmp_path: Path) -> None:
    """Retry(delay=7) redelivers the message after 7 seconds of the injected clock,
    not before, overriding the policy's backoff; the attempt counts."""
    clock = FakeClock()
    app = make_app(path, tmp_path, clock=clock)
    attempts: list[int] = []
    probes = 0

    @app.handler("work", group="apply", retry=RetryPolicy(base_delay=1000.0))
    async def apply(ctx: Context, body: dict[str, Any]) -> None:
        nonlocal probes
        if body.get("probe"):
            probes += 1
            return
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Retry(delay=7)
        await apply_effect(ctx, body)

    async with app:
        await create_effects(app)
        message = await app.publish("work", {"n": 1})
        async with running(app):
            await eventually(lambda: _delayed(app, "work"), what="retry scheduled")
            clock.advance(6.9)
            await probe(app, "work", lambda: probes)
            assert attempts == [1]
            clock.advance(0.2)
            await eventually(lambda: attempts == [1, 2], what="redelivered")
            await drained(app)
        assert effects(app) == [(message.id, 1)]
        assert await app.store.dead_letters() == []


async def test_dead_letter_signal_dead_letters_at_once_without_effects(
    path: str, tmp_path: Path
) -> None:
    """DeadLetter(reason) moves the message to the dead-letter queue on the first
    attempt with that reason, and rolls back what the handler wrote and sent."""
    app = make_app(path, tmp_path)

    @app.handler("work", group="apply")
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        await apply_effect(ctx, body)
        await ctx.publish("downstream", body)
        raise DeadLetter("customer 42 does not exist")

    sunk = sink_for(app, "downstream")

    async with app:
        await create_effects(app)
        message = await app.publish("work", {"n": 1})
        async with running(app):
            await drained(app)
        (dead,) = await app.store.dead_letters()
        assert (dead.message.id, dead.group, dead.attempts) == (message.id, "apply", 1)
        assert dead.reason == "customer 42 does not exist"
        assert dead.error_type == "DeadLetter"
        assert effects(app) == []
        assert store_rows(app, "SELECT COUNT(*) FROM conveyor_outbox") == [(0,)]
        assert await pending(app, "downstream") == 0
        assert sunk == []


async def test_skip_signal_acks_without_effects(path: str, tmp_path: Path) -> None:
    """Skip() acknowledges the message on its first attempt, rolls back the
    handler's writes and messages, and dead-letters nothing."""
    app = make_app(path, tmp_path)
    calls: list[int] = []

    @app.handler("work", group="apply")
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.attempt)
        await apply_effect(ctx, body)
        await ctx.publish("downstream", body)
        raise Skip("order already cancelled")

    sunk = sink_for(app, "downstream")

    async with app:
        await create_effects(app)
        await app.publish("work", {"n": 1})
        async with running(app):
            await drained(app)
        assert calls == [1]
        assert effects(app) == []
        assert store_rows(app, "SELECT COUNT(*) FROM conveyor_outbox") == [(0,)]
        assert await pending(app, "downstream") == 0
        assert sunk == []
        assert await app.store.dead_letters() == []


class NotFixable(PermanentError):
    pass


@pytest.mark.parametrize(
    ("error", "error_type"),
    [
        (PermanentError("card declined"), "PermanentError"),
        (NotFixable("card declined"), "NotFixable"),
        (KeyError("card declined"), "KeyError"),
    ],
)
async def test_permanent_errors_are_dead_lettered_at_once(
    path: str, tmp_path: Path, error: Exception, error_type: str
) -> None:
    """PermanentError, its subclasses and the policy's give_up_on errors are
    dead-lettered after one attempt with the error, its type and traceback."""
    app = make_app(path, tmp_path)
    calls: list[int] = []

    @app.handler("work", group="apply", retry=RetryPolicy(max_attempts=5, give_up_on=(KeyError,)))
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.attempt)
        await apply_effect(ctx, body)
        raise error

    async with app:
        await create_effects(app)
        await app.publish("work", {"n": 1})
        async with running(app):
            await drained(app)
        (dead,) = await app.store.dead_letters()
        assert calls == [1]
        assert dead.attempts == 1
        assert dead.reason.startswith("permanent error: ")
        assert "card declined" in dead.reason
        assert dead.error_type.rsplit(".", 1)[-1] == error_type
        assert "raise error" in dead.traceback
        assert effects(app) == []


class Order(pydantic.BaseModel):
    order_id: int
    amount: float


async def test_undecodable_payload_is_dead_lettered_at_once(path: str, tmp_path: Path) -> None:
    """A payload that does not decode into the handler's model is dead-lettered on
    the first attempt with a reason naming the model; the handler never runs."""
    app = make_app(path, tmp_path)
    orders: list[Order] = []

    @app.handler("orders", group="bill")
    async def bill(ctx: Context, body: Order) -> None:
        orders.append(body)

    async with app:
        bad = await app.publish("orders", {"order_id": "not a number"})
        good = await app.publish("orders", Order(order_id=2, amount=9.5))
        async with running(app):
            await drained(app)
        (dead,) = await app.store.dead_letters()
        assert dead.message.id == bad.id
        assert dead.attempts == 1
        assert dead.error_type == "conveyor.errors.DecodeError"
        assert "not a valid Order" in dead.reason
        assert "order_id" in dead.reason
        assert orders == [Order(order_id=2, amount=9.5)]
        assert good.id != bad.id


async def test_retryable_error_is_dead_lettered_after_max_attempts(
    path: str, tmp_path: Path
) -> None:
    """A handler that keeps failing is tried max_attempts times, then dead-lettered
    with the attempt count and the last error."""
    app = make_app(path, tmp_path)
    calls: list[int] = []

    @app.handler(
        "work", group="apply", retry=RetryPolicy(max_attempts=3, base_delay=0, jitter=False)
    )
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.attempt)
        await apply_effect(ctx, body)
        raise ConnectionError(f"attempt {ctx.attempt} failed")

    async with app:
        await create_effects(app)
        await app.publish("work", {"n": 1})
        async with running(app):
            await drained(app)
        (dead,) = await app.store.dead_letters()
        assert calls == [1, 2, 3]
        assert dead.attempts == 3
        assert dead.error_type == "ConnectionError"
        assert dead.reason == "gave up after 3 attempt(s): ConnectionError: attempt 3 failed"
        assert effects(app) == []


async def test_retry_signal_on_the_last_attempt_dead_letters(path: str, tmp_path: Path) -> None:
    """Retry() raised on the last allowed attempt dead-letters the message instead of
    retrying forever."""
    app = make_app(path, tmp_path)
    calls: list[int] = []

    @app.handler("work", group="apply", retry=RetryPolicy(max_attempts=2))
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.attempt)
        raise Retry(delay=0)

    async with app:
        await app.publish("work", {"n": 1})
        async with running(app):
            await drained(app)
        (dead,) = await app.store.dead_letters()
        assert calls == [1, 2]
        assert (dead.attempts, dead.error_type) == (2, "Retry")
        assert "last attempt (2)" in dead.reason


async def test_handler_timeout_is_retried_then_dead_lettered(path: str, tmp_path: Path) -> None:
    """A handler running past its timeout is cancelled, its writes rolled back, and
    retried; after the last attempt it is dead-lettered as HandlerTimeout."""
    app = make_app(path, tmp_path)
    calls: list[int] = []
    cancelled: list[int] = []

    @app.handler(
        "work",
        group="apply",
        timeout=0.05,
        retry=RetryPolicy(max_attempts=2, base_delay=0, jitter=False),
    )
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append(ctx.attempt)
        await apply_effect(ctx, body)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.attempt)
            raise

    async with app:
        await create_effects(app)
        message = await app.publish("work", {"n": 1})
        async with running(app):
            await drained(app)
        (dead,) = await app.store.dead_letters()
        assert calls == cancelled == [1, 2]
        assert dead.message.id == message.id
        assert dead.attempts == 2
        assert dead.error_type == "conveyor.errors.HandlerTimeout"
        assert "ran past its 0.05s timeout" in dead.reason
        assert effects(app) == []


async def test_message_delivered_too_often_is_dead_lettered_as_undeliverable(
    path: str, tmp_path: Path
) -> None:
    """A message whose deliveries kept ending without an outcome (leases expiring)
    is dead-lettered as undeliverable once delivered more than max_attempts times,
    without running the handler again; one delivered exactly max_attempts times is
    still handled."""
    clock = FakeClock()
    app = make_app(path, tmp_path, clock=clock)
    calls: list[tuple[int, int]] = []

    @app.handler("work", group="apply", retry=RetryPolicy(max_attempts=3))
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        calls.append((body["n"], ctx.attempt))

    async with app:
        lost_thrice = await app.publish("work", {"n": 1})
        lost_twice = await app.publish("work", {"n": 2})
        for attempt, expected in ((1, 2), (2, 2), (3, 1)):
            lost = await app.broker.fetch("work", "apply", max_messages=expected, lease=10.0)
            assert [d.message.id for d in lost] == [lost_thrice.id, lost_twice.id][:expected]
            assert {d.message.attempt for d in lost} == {attempt}
            clock.advance(11)
        async with running(app):
            await drained(app)
        (dead,) = await app.store.dead_letters()
        assert calls == [(2, 3)]
        assert dead.message.id == lost_thrice.id
        assert dead.attempts == 4
        assert dead.error_type == "Undeliverable"
        assert "without an outcome" in dead.reason


class AckCrashesOnce:
    """A broker whose first ack of ``topic`` fails without acknowledging, as if the
    worker died right after its store transaction committed."""

    def __init__(self, inner: Broker, *, topic: str) -> None:
        self.inner = inner
        self.topic = topic
        self.url = inner.url
        self.capabilities: Capabilities = inner.capabilities
        self.crashed = False

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def declare(self, topic: str, group: str) -> None:
        await self.inner.declare(topic, group)

    async def publish(self, messages: Sequence[Message]) -> None:
        await self.inner.publish(messages)

    async def enqueue(self, group: str, messages: Sequence[Message]) -> None:
        await self.inner.enqueue(group, messages)

    async def fetch(
        self, topic: str, group: str, *, max_messages: int, lease: float
    ) -> list[Delivery]:
        return await self.inner.fetch(topic, group, max_messages=max_messages, lease=lease)

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        if not self.crashed and any(d.message.topic == self.topic for d in deliveries):
            self.crashed = True
            raise BrokerError("simulated crash between commit and ack")
        return await self.inner.ack(deliveries)

    async def nack(self, delivery: Delivery, *, delay: float) -> None:
        await self.inner.nack(delivery, delay=delay)

    async def wait(self, topic: str, group: str, timeout: float) -> None:
        await self.inner.wait(topic, group, timeout)

    async def stats(self) -> list[QueueStats]:
        return await self.inner.stats()


@pytest.mark.parametrize("path", PATHS)
async def test_a_payload_over_max_payload_is_dead_lettered_on_consume(
    path: str, tmp_path: Path
) -> None:
    """A message bigger than the app's max_payload, put in the broker by a
    producer with a higher limit, is dead-lettered unhandled with the reason;
    the small one beside it is handled."""
    app = App("limits", settings=settings_for(path, tmp_path, max_payload=1000))
    seen: list[int] = []

    @app.handler("in", group="g")
    async def handle(ctx: Context, body: dict[str, object]) -> None:
        seen.append(len(ctx.message.payload))

    async with app:
        big = Message.create("in", {"pad": "x" * 5000}, max_payload=10_000)
        small = Message.create("in", {"pad": "x"})
        await app.broker.publish([big, small])
        await drained(app)
        [dead] = await app.store.dead_letters()
    assert seen == [len(small.payload)]
    assert dead.message.id == big.id
    assert dead.error_type == "PayloadTooLarge"
    assert "over max_payload (1000 bytes)" in dead.reason


@pytest.mark.parametrize("path", PATHS)
async def test_prepare_calls_out_before_the_transaction_opens(path: str, tmp_path: Path) -> None:
    """A handler's prepare runs before its transaction: while it waits on a
    slow service another transaction commits at once (on SQLite nothing holds
    the write lock), and the handler records what prepare returned."""
    app = App("calls", settings=settings_for(path, tmp_path))
    entered, release = asyncio.Event(), asyncio.Event()

    async def call_service(message: Message) -> str:
        entered.set()
        await release.wait()
        return f"answer to {message.decode(dict)['q']}"

    @app.handler("questions", group="g", prepare=call_service)
    async def record(ctx: Context, body: dict[str, str]) -> None:
        await ctx.execute("INSERT INTO effects (msg_id, n) VALUES (?, ?)", (ctx.prepared, 1))

    async with app:
        await create_effects(app)
        await app.publish("questions", {"q": "life"})
        async with running(app):
            await asyncio.wait_for(entered.wait(), 10)
            async with asyncio.timeout(10):  # would wait for the call if it held the lock
                async with app.transaction() as s:
                    await s.execute("INSERT INTO effects (msg_id, n) VALUES ('meanwhile', 2)")
            release.set()
            await drained(app)
        assert effects(app) == [("answer to life", 1), ("meanwhile", 1)]


@pytest.mark.parametrize("path", PATHS)
async def test_a_prepare_that_raises_is_retried_then_dead_lettered(
    path: str, tmp_path: Path
) -> None:
    """An exception in prepare is the handler's failure, met at ctx.prepared:
    retried on the handler's policy, then dead-lettered with it."""
    app = App("calls", settings=settings_for(path, tmp_path))
    calls: list[int] = []

    async def call_service(message: Message) -> str:
        calls.append(message.attempt)
        raise ConnectionError("service down")

    @app.handler(
        "questions",
        group="g",
        prepare=call_service,
        retry=RetryPolicy(max_attempts=2, base_delay=0),
    )
    async def record(ctx: Context, body: dict[str, str]) -> None:
        await ctx.execute("INSERT INTO effects (msg_id, n) VALUES (?, 1)", (ctx.prepared,))

    async with app:
        await create_effects(app)
        await app.publish("questions", {"q": "life"})
        await drained(app)
        [dead] = await app.store.dead_letters()
        assert effects(app) == []
    assert calls == [1, 2]
    assert "ConnectionError: service down" in dead.reason
