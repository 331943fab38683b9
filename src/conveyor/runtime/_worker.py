"""The worker loop and the unit of work.

For each delivery: open a store transaction, look the message up in the
inbox (a duplicate is acknowledged and skipped), run the middleware chain and
the handler in a savepoint, record the inbox entry, commit, then acknowledge.
A failure rolls back the handler's writes and messages and, in the same
transaction, schedules a retry or writes a dead letter. Deliveries sharing a
transaction share its inbox look-up, inbox insert and acknowledgement (one
statement each). When the broker binds to the store (same database), the
claim of a batch commits first, counting the attempt and taking a lease, so a
message that kills its worker every time still ends up dead-lettered; then
the batch's handling, inbox, outbox and acknowledgements share one commit
(group commit): a crash rolls that work back, the messages come back once the
lease runs out, and nothing is applied twice.

Every batch, on every path, is settled in one place (``_unit``): the
unit of work commits, then the broker's copies of dead letters are made and
the acknowledgements that follow a commit are sent, then the observers hear
what became of each message. A ``_Port`` is what differs between a broker on
the store's database (acks inside the transaction) and any other (outbox in
the transaction, acks after it), and how a rolled-back batch is handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from conveyor._time import seconds
from conveyor._urls import redact
from conveyor.brokers._protocol import (
    Broker,
    BrokerBinding,
    Delivery,
    TransactionalBroker,
)
from conveyor.errors import DeadLetter, HandlerTimeout, Retry, Skip
from conveyor.messages import Message, uuid7
from conveyor.resilience._breaker import admit
from conveyor.runtime._context import (
    Context,
    Outbound,
    Publisher,
    handling,
    message_ids,
    run_committed,
)
from conveyor.runtime._handlers import Handler
from conveyor.runtime._heartbeat import WorkerInfo, beat, forget
from conveyor.runtime._observe import (
    APPLIED,
    DEAD_LETTER,
    DUPLICATE,
    RETRY,
    ROLLED_BACK,
    DeadLettered,
    Settlement,
)
from conveyor.store._protocol import Store, Transaction

if TYPE_CHECKING:
    from conveyor.runtime._app import App


__all__ = ["Worker"]

log = logging.getLogger("conveyor.worker")


BATCH_SECONDS = 0.05
"""How long a batch of the default size should take at most: a batch is
handled in one transaction and committed at its end, so this bounds the
time a batch's first message waits for its commit (and, on SQLite, how long
a worker holds the write lock)."""
FIRST_BATCH = 16


class _Sizer:
    """The batch size of a handler without its own ``prefetch``: from
    ``FIRST_BATCH``, at most doubling from one batch to the next, up to
    ``ceiling`` (``Settings.prefetch``) and to as many messages as fit in
    ``BATCH_SECONDS`` at the handler's recent speed. A fast handler gets the
    whole ceiling; a slow one small batches that cannot outlive their lease."""

    __slots__ = ("ceiling", "per_message", "size")

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.size = min(ceiling, FIRST_BATCH)
        self.per_message = 0.0

    def took(self, seconds: float, count: int) -> None:
        sample = seconds / count
        self.per_message = sample if not self.per_message else 0.7 * self.per_message + 0.3 * sample
        fits = int(BATCH_SECONDS / self.per_message) if self.per_message > 0 else self.ceiling
        if count >= self.size:  # a full batch: the backlog can take a bigger one
            self.size = max(1, min(self.ceiling, 2 * self.size, fits))
        else:
            self.size = max(1, min(self.size, fits))


@dataclass(slots=True)
class _Outcome:
    """What the unit of work decided for one delivery."""

    kind: str
    """APPLIED, DUPLICATE, RETRY or DEAD_LETTER."""
    delay: float = 0.0
    reason: str = ""
    error_type: str = ""
    started: float | None = None
    finished: float | None = None
    published: Sequence[Message] = ()
    """What the handler sent, written with the batch (empty unless applied)."""
    dead_letters: Sequence[DeadLettered] = ()
    """Every dead letter its handler call wrote, its own included."""
    committed: Sequence[Callable[[], None]] = ()
    """Its handler's ``on_commit`` callbacks (empty unless applied)."""

    def settlement(self, delivery: Delivery, handler: Handler) -> Settlement:
        # Positional: one is built per message observed, and keywords cost
        # as much again as the object.
        return Settlement(
            delivery.message,
            handler.topic,
            delivery.group,
            self.kind,
            self.started,
            self.finished,
            self.delay if self.kind == RETRY else None,
            self.reason,
            self.error_type,
            tuple(self.dead_letters),
        )


@dataclass(frozen=True, slots=True)
class _Failed:
    """A ``prepare`` call that raised: the handler meets the error at ``ctx.prepared``."""

    error: Exception


_UNSET = object()


class _Port(Protocol):
    """Where a batch came from: how it is settled with its broker."""

    publisher: Publisher

    async def settle_in(
        self, tx: Transaction, deliveries: Sequence[Delivery], outcomes: Sequence[_Outcome]
    ) -> None:
        """The part of settling that commits with the unit of work."""

    async def settle_after(
        self, deliveries: Sequence[Delivery], outcomes: Sequence[_Outcome]
    ) -> None:
        """The part that follows the commit."""

    async def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Release ``deliveries`` for redelivery now (their attempt stays counted)."""


class _BoundPort:
    """A broker on the store's database: acks and retries commit with the work."""

    def __init__(self, binding: BrokerBinding, store: Store) -> None:
        self.binding = binding
        self.store = store
        self.publisher: Publisher = binding.publish

    async def settle_in(
        self, tx: Transaction, deliveries: Sequence[Delivery], outcomes: Sequence[_Outcome]
    ) -> None:
        pairs = list(zip(deliveries, outcomes, strict=True))
        await self.binding.ack(tx, [d for d, o in pairs if o.kind != RETRY])
        retried = [(d, o.delay) for d, o in pairs if o.kind == RETRY]
        if retried:
            await self.binding.nack(tx, retried)

    async def settle_after(
        self, deliveries: Sequence[Delivery], outcomes: Sequence[_Outcome]
    ) -> None:
        return None

    async def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        async with self.store.transaction() as tx:
            await self.binding.nack(tx, [(d, 0.0) for d in deliveries])


class _GenericPort:
    """Any other broker: the outbox in the transaction, acks after the commit
    (a lost ack only means a redelivery, which the inbox skips)."""

    def __init__(self, broker: Broker, store: Store) -> None:
        self.broker = broker
        self.publisher: Publisher = store.outbox_add

    async def settle_in(
        self, tx: Transaction, deliveries: Sequence[Delivery], outcomes: Sequence[_Outcome]
    ) -> None:
        return None

    async def settle_after(
        self, deliveries: Sequence[Delivery], outcomes: Sequence[_Outcome]
    ) -> None:
        pairs = list(zip(deliveries, outcomes, strict=True))
        try:
            await self.broker.ack([d for d, o in pairs if o.kind != RETRY])
        finally:
            for delivery, outcome in pairs:
                if outcome.kind == RETRY:
                    await self.broker.nack(delivery, delay=outcome.delay)

    async def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self.broker.nack(delivery, delay=0.0)


class Worker:
    """Runs every handler of an ``App`` until ``stop()``; see the module doc.

    On ``stop()`` the worker stops fetching, lets in-flight work finish for up
    to ``grace_period`` seconds, then cancels what is left; cancelled work is
    rolled back and delivered again later.
    """

    def __init__(self, app: App, *, grace_period: float | None = None) -> None:
        self.app = app
        s = app.settings
        self.grace_period = s.grace_period if grace_period is None else grace_period
        self._stopping = asyncio.Event()
        self._busy: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()
        self.processed = 0
        self.in_flight = 0
        self.id = uuid7()
        """This worker's id in the heartbeat table."""
        # Read once per batch by _handle_all, for each message's _handle.
        self._store: Store
        self._outbound: Outbound
        self._debug = False

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        if self._stopping.is_set():
            return
        log.info("stopping: finishing in-flight work", extra={"event": "conveyor.worker_stopping"})
        self._stopping.set()
        for task in self._tasks:
            if task not in self._busy:
                task.cancel()

    async def run(self) -> None:
        app = self.app
        await app.connect()
        broker, store = app.broker, app.store
        binding = broker.bind(store) if isinstance(broker, TransactionalBroker) else None
        for handler in app.handlers:
            call = handler.build_call(app.middleware, app.codec)
            self._tasks.append(asyncio.create_task(self._consume(handler, call, binding)))
        if binding is None:
            self._tasks.append(asyncio.create_task(self._relay()))
        self._tasks.append(asyncio.create_task(self._prune()))
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        for interval, periodic in app.periodic:
            self._tasks.append(asyncio.create_task(self._every(interval, periodic)))
        log.info(
            "worker started with %d handler(s); broker %s, store %s",
            len(app.handlers),
            redact(broker.url),
            redact(store.url),
            extra={"event": "conveyor.worker_started"},
        )
        if app.settings.implicit_local_store and app._own_store:
            log.warning(
                "the store (inbox, outbox, dead letters, your tables) is the local file %s "
                "because CONVEYOR_STORE_URL is not set; with a server broker, set it to a "
                "database every worker shares (postgresql://...)",
                redact(store.url),
                extra={"event": "conveyor.implicit_store"},
            )
        try:
            await self._stopping.wait()
            expiry = asyncio.create_task(self._expire_grace())
            await asyncio.gather(*self._tasks, return_exceptions=True)
            expiry.cancel()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for last in app.at_stop:  # what the handlers left: written out now
                try:
                    async with asyncio.timeout(self.grace_period or 5.0):
                        await last(app)
                except Exception:
                    log.exception(
                        "periodic task %s failed at stop",
                        getattr(last, "__qualname__", last),
                        extra={"event": "conveyor.periodic_failed"},
                    )
            with contextlib.suppress(Exception):
                await forget(store, self.id)
        log.info("worker stopped", extra={"event": "conveyor.worker_stopped"})

    async def _expire_grace(self) -> None:
        await self.app.clock.sleep(self.grace_period)
        log.warning(
            "grace period of %gs over; cancelling in-flight work",
            self.grace_period,
            extra={"event": "conveyor.grace_expired"},
        )
        for task in self._tasks:
            task.cancel()

    async def _consume(
        self,
        handler: Handler,
        call: Callable[[Context], Awaitable[None]],
        binding: BrokerBinding | None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        default = self.app.settings.prefetch
        if handler.rate_limit is not None:
            # Fetch only what can start at once (the bound path runs a batch
            # in one transaction): no batch sits leased waiting for permits,
            # nor runs as a burst after its last permit.
            default = handler.concurrency if binding is None else 1
        prefetch = handler.prefetch or default
        # A handler's own prefetch, or one bounded by a rate limit, is used
        # as it is; the default is a ceiling the batch size grows toward.
        sizer = None if handler.prefetch or handler.rate_limit is not None else _Sizer(prefetch)
        failures = 0
        while not self.stopping:
            # Paused, outside _busy so stop() cancels the wait, while a breaker
            # is open: the messages stay in the broker and keep their attempts.
            if handler.breakers:
                started = time.perf_counter()
                size = await admit(handler.breakers, prefetch)
                paused = time.perf_counter() - started
                if self.app.observers and paused > 0.001:
                    self.app.observers.waited(
                        handler.topic, handler.group, reason="breaker", seconds=paused
                    )
            else:
                size = prefetch
            if sizer is not None:
                size = min(size, sizer.size)
            self._busy.add(task)
            try:
                started = time.perf_counter()
                if binding is not None:
                    count = await self._bound_batch(handler, call, binding, size)
                else:
                    count = await self._batch(handler, call, size)
                if sizer is not None and count:
                    sizer.took(time.perf_counter() - started, count)
                failures = 0
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception:
                failures += 1
                log.exception(
                    "consumer %s/%s failed; backing off",
                    handler.topic,
                    handler.group,
                    extra={"event": "conveyor.consumer_error"},
                )
                count = 0
                self._busy.discard(task)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            finally:
                self._busy.discard(task)
            if self.stopping:
                return
            if count == 0:
                await self.app.broker.wait(
                    handler.topic, handler.group, self.app.settings.idle_poll
                )
            else:
                # SQLite work never suspends, so yield between batches: other
                # handlers, the relay and signal handlers must get their turn.
                await asyncio.sleep(0)

    async def _bound_batch(
        self,
        handler: Handler,
        call: Callable[[Context], Awaitable[None]],
        binding: BrokerBinding,
        prefetch: int,
    ) -> int:
        store = self.app.store
        started = time.perf_counter()
        # The claim commits on its own: the attempt it counts must survive a
        # worker that dies handling the message, or a message that kills every
        # worker would be claimed at attempt 1 forever, never dead-lettered.
        async with store.transaction() as tx:
            deliveries = await binding.claim(
                tx, handler.topic, handler.group, prefetch, lease=self.app.settings.lease
            )
        self._fetched(handler, deliveries, started)
        if not deliveries:
            return 0
        port = _BoundPort(binding, store)
        try:
            prepared = await self._before(handler, deliveries)
        except BaseException:
            await self._hand_back(handler, port, deliveries)
            raise
        await self._unit(handler, call, port, deliveries, prepared)
        return len(deliveries)

    async def _batch(
        self, handler: Handler, call: Callable[[Context], Awaitable[None]], prefetch: int
    ) -> int:
        app = self.app
        broker = app.broker
        started = time.perf_counter()
        deliveries = await broker.fetch(
            handler.topic, handler.group, max_messages=prefetch, lease=app.settings.lease
        )
        self._fetched(handler, deliveries, started)
        if not deliveries:
            return 0
        port = _GenericPort(broker, app.store)
        if handler.concurrency == 1:
            try:
                prepared = await self._before(handler, deliveries)
            except BaseException:
                await self._hand_back(handler, port, deliveries)
                raise
            # A redelivered message may be one that kills its worker: it is
            # committed and acknowledged alone, after the others, so that it
            # cannot take their attempts with it again.
            fresh = [d for d in deliveries if d.message.attempt == 1]
            again = [[d] for d in deliveries if d.message.attempt > 1]
            for group in [fresh, *again] if fresh else again:
                await self._unit(handler, call, port, group, prepared)
            return len(deliveries)
        limit = asyncio.Semaphore(handler.concurrency)

        async def one(delivery: Delivery) -> None:
            async with limit:
                if self.stopping:
                    await self._hand_back(handler, port, [delivery])
                    return
                try:
                    prepared = await self._before(handler, [delivery])
                except BaseException:
                    await self._hand_back(handler, port, [delivery])
                    raise
                await self._unit(handler, call, port, [delivery], prepared)

        # Settle the whole batch before reporting a failure (say, an ack the
        # broker refused): the other deliveries must not run on outside the
        # worker, where stop() and the grace period cannot see them.
        results = await asyncio.gather(*(one(d) for d in deliveries), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(deliveries)

    async def _unit(
        self,
        handler: Handler,
        call: Callable[[Context], Awaitable[None]],
        port: _Port,
        deliveries: Sequence[Delivery],
        prepared: dict[str, object],
    ) -> None:
        """The unit of work of a batch, and the one place a delivery is
        settled: its handling, inbox, outbox and (bound) acknowledgement in
        one transaction; then the broker's copies of dead letters and the
        acknowledgements the broker takes after the commit; then the
        observers. A batch that rolls back is handed back at once."""
        store = self.app.store
        self.in_flight += len(deliveries)
        try:
            async with store.transaction() as tx:
                outcomes = await self._handle_all(
                    handler, call, tx, deliveries, port.publisher, prepared
                )
                await port.settle_in(tx, deliveries, outcomes)
        except BaseException:
            # Rolled back (the grace period ran out, or the commit failed).
            # The attempt stays counted. Best effort: a dead worker cannot.
            self.in_flight -= len(deliveries)
            await self._hand_back(handler, port, deliveries)
            raise
        self.in_flight -= len(deliveries)
        dead = [d for o in outcomes for d in o.dead_letters]
        if dead:
            await self.app.dead_lettered(dead)
        try:
            await port.settle_after(deliveries, outcomes)
        finally:
            self.processed += len(deliveries)
            run_committed([c for o in outcomes for c in o.committed])
            observers = self.app.observers
            if observers:
                sent = [m for o in outcomes for m in o.published]
                if sent:
                    observers.published(sent, via="outbox", seconds=0.0)
                observers.settled(
                    [o.settlement(d, handler) for d, o in zip(deliveries, outcomes, strict=True)]
                )

    async def _hand_back(
        self, handler: Handler, port: _Port, deliveries: Sequence[Delivery]
    ) -> None:
        """Give back deliveries that were rolled back (or never handled) now,
        rather than when their lease expires; the attempt stays counted."""
        with contextlib.suppress(Exception):
            await port.hand_back(deliveries)
        if self.app.observers:
            self.app.observers.settled(
                [
                    Settlement(
                        message=d.message, topic=handler.topic, group=d.group, outcome=ROLLED_BACK
                    )
                    for d in deliveries
                ]
            )

    def _fetched(self, handler: Handler, deliveries: Sequence[Delivery], started: float) -> None:
        if self.app.observers:
            self.app.observers.fetched(
                handler.topic,
                handler.group,
                count=len(deliveries),
                seconds=time.perf_counter() - started,
            )

    async def _before(self, handler: Handler, deliveries: Sequence[Delivery]) -> dict[str, object]:
        """What a batch needs before its transaction opens: the handler's rate
        limiter permits (one per message), then its ``prepare`` calls, at most
        ``concurrency`` at once. Waiting and calling out here holds no
        database lock and spends no attempt beyond the delivery's own.
        Returns each delivery's prepared value (or the exception it raised)
        by receipt."""
        limiter, key_of = handler.rate_limit, handler.rate_limit_key
        if limiter is not None:
            started = time.perf_counter()
            for delivery in deliveries:
                await limiter.acquire(key=None if key_of is None else key_of(delivery.message))
            if self.app.observers:
                self.app.observers.waited(
                    handler.topic,
                    handler.group,
                    reason="rate_limit",
                    seconds=time.perf_counter() - started,
                )
        prepare = handler.prepare
        if prepare is None:
            return {}
        slots = asyncio.Semaphore(handler.concurrency)
        prepared: dict[str, object] = {}

        async def one(delivery: Delivery) -> None:
            if delivery.malformed is not None:
                return
            async with slots:
                try:
                    prepared[delivery.receipt] = await prepare(delivery.message)
                except Exception as exc:  # raised again by ctx.prepared, in the handler
                    prepared[delivery.receipt] = _Failed(exc)

        await asyncio.gather(*(one(d) for d in deliveries))
        return prepared

    def _backoff(self, handler: Handler, message: Message) -> float:
        """The policy's backoff, or its ``max_delay`` once the retry budget is spent."""
        budget = handler.retry_budget
        if budget is not None and not budget.try_retry():
            return seconds(handler.retry.max_delay)
        return handler.retry.backoff(message.attempt, self._rng)

    async def _handle_all(
        self,
        handler: Handler,
        call: Callable[[Context], Awaitable[None]],
        tx: Transaction,
        deliveries: Sequence[Delivery],
        publisher: Publisher,
        prepared: dict[str, object],
    ) -> list[_Outcome]:
        """Run ``deliveries`` in ``tx``, each in its own savepoint; returns
        what became of each.

        The inbox costs two statements per batch, not one per message: it is
        read for the whole batch first (a recorded id is a duplicate: acked
        and skipped), and the ids applied are inserted at the end. If a
        concurrent transaction committed one of them meanwhile, that insert
        fails, ``tx`` rolls back and the batch comes back, to be skipped.
        Messages the handlers publish are kept until the batch is done and
        written with one ``publisher`` call, in the same transaction; those of
        a handler whose savepoint rolled back are dropped with it.
        """
        store = self._store = self.app.store
        self._outbound = self.app.outbound
        self._debug = log.isEnabledFor(logging.DEBUG)
        done = await store.inbox_seen(tx, handler.group, [d.message.id for d in deliveries])
        applied: list[str] = []
        outcomes: list[_Outcome] = []
        for delivery in deliveries:
            message = delivery.message
            if message.id in done:
                log.debug(
                    "duplicate %s skipped",
                    message.id,
                    extra={
                        "event": "conveyor.duplicate_skipped",
                        **message_ids(message, handler.group),
                    },
                )
                outcomes.append(_Outcome(DUPLICATE))
                continue
            outcome = await self._handle(
                handler, call, tx, delivery, prepared.get(delivery.receipt, _UNSET)
            )
            if outcome.kind == APPLIED:
                done.add(message.id)
                applied.append(message.id)
            outcomes.append(outcome)
        published = [m for o in outcomes for m in o.published]
        if published:
            await publisher(tx, published)
        await store.inbox_add_many(tx, handler.group, applied)
        return outcomes

    async def _handle(
        self,
        handler: Handler,
        call: Callable[[Context], Awaitable[None]],
        tx: Transaction,
        delivery: Delivery,
        prepared: object,
    ) -> _Outcome:
        """Run one delivery inside ``tx``: what became of it, with what its
        handler published (only if its savepoint committed) and the dead
        letters written (to ``tx``, acknowledged by the caller)."""
        app = self.app
        message = delivery.message
        policy = handler.retry
        sent: list[Message] = []

        async def collect(_tx: Transaction, messages: Sequence[Message]) -> None:
            sent.extend(messages)

        ctx = Context(message, handler.group, tx, collect, self._outbound, self._store)
        dead = self._dead
        if delivery.malformed is not None:
            return await dead(ctx, f"malformed message: {delivery.malformed}", "MalformedMessage")
        if len(message.payload) > app.settings.max_payload:
            # Written by something that skipped publish()'s check: refused
            # here too, so a handler never sees more than the bound.
            return await dead(
                ctx,
                f"payload of {len(message.payload)} bytes is over max_payload "
                f"({app.settings.max_payload} bytes)",
                "PayloadTooLarge",
            )
        if message.attempt > policy.max_attempts:
            return await dead(
                ctx,
                f"delivered {message.attempt} times without an outcome "
                "(worker killed or lease expired while handling it)",
                "Undeliverable",
            )
        if handler.retry_budget is not None and message.attempt == 1:
            handler.retry_budget.record_attempt()
        if prepared is not _UNSET:
            ctx.set_prepared(
                prepared.error if isinstance(prepared, _Failed) else prepared,
                failed=isinstance(prepared, _Failed),
            )
        observers = app.observers.items
        started = time.time() if observers else 0.0
        scope = handling.set(ctx)
        try:
            async with tx.savepoint():
                scoped = app.observers.scoped
                if scoped or handler.timeout is not None:
                    with app.observers.consuming(ctx) if scoped else _NOTHING:
                        await self._call(handler, call, ctx)
                else:
                    await call(ctx)
            if self._debug:
                log.debug(
                    "handled %s",
                    message.id,
                    extra={"event": "conveyor.handled", **message_ids(message, ctx.group)},
                )
            if not (observers or sent or ctx.dead_letters or ctx.committed):
                return _APPLIED
            # Positional, as in settlement(): kind, delay, reason, error type,
            # started, finished, published, dead letters, committed.
            return _Outcome(
                APPLIED,
                0.0,
                "",
                "",
                started,
                time.time() if observers else 0.0,
                sent or _EMPTY,
                ctx.dead_letters or _EMPTY,
                ctx.committed or _EMPTY,
            )
        except Skip:
            return _Outcome(APPLIED, started=started, finished=time.time())
        except DeadLetter as signal:
            ctx.dead_letters.clear()  # the savepoint's writes, dead letters included, are gone
            outcome = await dead(ctx, signal.reason, "DeadLetter")
            outcome.started, outcome.finished = started, time.time()
            return outcome
        except Retry as signal:
            ctx.dead_letters.clear()
            if message.attempt < policy.max_attempts:
                delay = (
                    signal.delay if signal.delay is not None else self._backoff(handler, message)
                )
                why = signal.reason or "Retry requested"
                self._log_retry(handler, message, delay, why)
                return _Outcome(
                    RETRY,
                    delay=delay,
                    reason=why,
                    error_type="Retry",
                    started=started,
                    finished=time.time(),
                )
            outcome = await dead(
                ctx, f"retry requested after the last attempt ({message.attempt})", "Retry"
            )
            outcome.started, outcome.finished = started, time.time()
            return outcome
        except Exception as exc:
            ctx.dead_letters.clear()
            error_type = _qualname(type(exc))
            if policy.should_retry(exc, message.attempt):
                delay = self._backoff(handler, message)
                why = f"{type(exc).__name__}: {exc}"
                self._log_retry(handler, message, delay, why)
                return _Outcome(
                    RETRY,
                    delay=delay,
                    reason=why,
                    error_type=error_type,
                    started=started,
                    finished=time.time(),
                )
            why = (
                "permanent error"
                if not policy.is_retryable(exc)
                else f"gave up after {message.attempt} attempt(s)"
            )
            outcome = await dead(
                ctx,
                f"{why}: {type(exc).__name__}: {exc}",
                error_type,
                "".join(traceback.format_exception(exc)),
            )
            outcome.started, outcome.finished = started, time.time()
            return outcome
        finally:
            handling.reset(scope)

    @staticmethod
    async def _call(
        handler: Handler, call: Callable[[Context], Awaitable[None]], ctx: Context
    ) -> None:
        """``call(ctx)``, within the handler's timeout."""
        if handler.timeout is None:
            await call(ctx)
            return
        try:
            async with asyncio.timeout(handler.timeout) as scope:
                await call(ctx)
        except TimeoutError as exc:
            if scope.expired():
                raise HandlerTimeout(
                    f"handler {handler.func.__qualname__} ran past its {handler.timeout:g}s timeout"
                ) from exc
            raise

    @staticmethod
    async def _dead(ctx: Context, reason: str, error_type: str, tb: str = "") -> _Outcome:
        """Dead-letter the message of ``ctx`` (to its transaction)."""
        await ctx.dead_letter(reason, error_type=error_type, traceback=tb)
        return _Outcome(
            DEAD_LETTER, reason=reason, error_type=error_type, dead_letters=ctx.dead_letters
        )

    def _log_retry(self, handler: Handler, message: Message, delay: float, why: str) -> None:
        log.info(
            "retrying %s in %.3fs (attempt %d of %d): %s",
            message.id,
            delay,
            message.attempt,
            handler.retry.max_attempts,
            why,
            extra={
                "event": "conveyor.retry_scheduled",
                **message_ids(message, handler.group),
                "delay": delay,
            },
        )

    async def _relay(self) -> None:
        """Publish committed outbox rows (only when the broker is not the store)."""
        app = self.app
        while not self.stopping:
            task = asyncio.current_task()
            assert task is not None
            self._busy.add(task)
            try:
                rows = await app.store.outbox_claim(limit=256, lease=app.settings.lease)
                if rows:
                    messages = [m for _, m in rows]
                    started = time.perf_counter()
                    try:
                        await app.broker.publish(messages)
                    except Exception as exc:
                        if app.observers:
                            app.observers.published(
                                messages,
                                via="relay",
                                seconds=time.perf_counter() - started,
                                error=exc,
                            )
                        raise
                    await app.store.outbox_done([i for i, _ in rows])
                    if app.observers:
                        app.observers.published(
                            messages, via="relay", seconds=time.perf_counter() - started
                        )
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception:
                log.exception("outbox relay failed", extra={"event": "conveyor.relay_error"})
                rows = []
                await asyncio.sleep(0.5)
            finally:
                self._busy.discard(task)
            if not rows and not self.stopping:
                await app.store.wait_outbox(app.settings.idle_poll)

    async def _every(self, interval: float, task: Callable[[App], Awaitable[None]]) -> None:
        app = self.app
        while not self.stopping:
            try:
                await task(app)
            except Exception:
                log.exception(
                    "periodic task %s failed; it runs again in %gs",
                    getattr(task, "__qualname__", task),
                    interval,
                    extra={"event": "conveyor.periodic_failed"},
                )
            await app.clock.sleep(interval)

    async def _heartbeat(self) -> None:
        """Record this worker in the store now and every ``heartbeat_interval``."""
        app = self.app
        every = app.settings.heartbeat_interval
        info = WorkerInfo.of_this_process(
            id=self.id,
            app=app.name,
            handlers=[(h.topic, h.group) for h in app.handlers],
            started_at=time.time(),
        )
        while True:
            info = replace(
                info,
                last_seen=time.time(),
                beat_every=every,
                in_flight=self.in_flight,
                processed=self.processed,
            )
            try:
                await beat(app.store, info)
                if app.observers:
                    app.observers.beat(info.last_seen)
            except Exception as exc:
                log.warning(
                    "heartbeat not recorded: %r",
                    exc,
                    extra={"event": "conveyor.heartbeat_failed"},
                )
            await asyncio.sleep(every)

    async def _prune(self) -> None:
        app = self.app
        while True:
            with contextlib.suppress(Exception):
                await app.store.prune_inbox(
                    older_than=app.clock.time() - app.settings.inbox_retention
                )
            await asyncio.sleep(3600)


_NOTHING = contextlib.nullcontext()
_EMPTY: tuple[()] = ()
_APPLIED = _Outcome(APPLIED)  # applied, nothing sent or written, no observer to tell


def _qualname(cls: type[BaseException]) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
