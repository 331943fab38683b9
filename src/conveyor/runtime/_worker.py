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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conveyor._time import seconds
from conveyor._urls import redact
from conveyor.brokers._protocol import (
    BrokerBinding,
    DeadLetterSink,
    Delivery,
    TransactionalBroker,
)
from conveyor.errors import DeadLetter, HandlerTimeout, Retry, Skip
from conveyor.messages import Message
from conveyor.resilience._breaker import admit
from conveyor.runtime._context import Context, Publisher
from conveyor.runtime._handlers import Handler
from conveyor.store._protocol import Transaction

if TYPE_CHECKING:
    from conveyor.runtime._app import App

__all__ = ["Worker"]

log = logging.getLogger("conveyor.worker")


@dataclass(frozen=True, slots=True)
class _Outcome:
    retry: bool = False
    delay: float = 0.0
    applied: bool = False
    """Handled or skipped: the group's inbox records the message id."""
    dead: tuple[str, str] | None = None
    """Dead-lettered in the store: (reason, error_type), for a ``DeadLetterSink``."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """A ``prepare`` call that raised: the handler meets the error at ``ctx.prepared``."""

    error: Exception


_UNSET = object()
_ACK = _Outcome()
_APPLIED = _Outcome(applied=True)


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
        failures = 0
        while not self.stopping:
            # Paused, outside _busy so stop() cancels the wait, while a breaker
            # is open: the messages stay in the broker and keep their attempts.
            size = await admit(handler.breakers, prefetch) if handler.breakers else prefetch
            self._busy.add(task)
            try:
                if binding is not None:
                    count = await self._bound_batch(handler, call, binding, size)
                else:
                    count = await self._batch(handler, call, size)
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
        # The claim commits on its own: the attempt it counts must survive a
        # worker that dies handling the message, or a message that kills every
        # worker would be claimed at attempt 1 forever, never dead-lettered.
        async with store.transaction() as tx:
            deliveries = await binding.claim(
                tx, handler.topic, handler.group, prefetch, lease=self.app.settings.lease
            )
        if not deliveries:
            return 0
        try:
            prepared = await self._before(handler, deliveries)
            async with store.transaction() as tx:
                outcomes = await self._handle_all(
                    handler, call, tx, deliveries, binding.publish, prepared
                )
                settled = list(zip(deliveries, outcomes, strict=True))
                await binding.ack(tx, [d for d, outcome in settled if not outcome.retry])
                await binding.nack(tx, [(d, o.delay) for d, o in settled if o.retry])
        except BaseException:
            # Rolled back (the grace period ran out, or the commit failed):
            # hand the batch back now rather than when its lease expires.
            # The attempt stays counted. Best effort: a dead worker cannot.
            with contextlib.suppress(Exception):
                async with store.transaction() as tx:
                    await binding.nack(tx, [(d, 0.0) for d in deliveries])
            raise
        await self._sink_dead(settled)
        self.processed += len(deliveries)
        return len(deliveries)

    async def _batch(
        self, handler: Handler, call: Callable[[Context], Awaitable[None]], prefetch: int
    ) -> int:
        app = self.app
        broker, store = app.broker, app.store
        lease = app.settings.lease
        deliveries = await broker.fetch(
            handler.topic, handler.group, max_messages=prefetch, lease=lease
        )
        if not deliveries:
            return 0
        if handler.concurrency == 1:
            try:
                prepared = await self._before(handler, deliveries)
            except BaseException:
                with contextlib.suppress(Exception):  # hand the batch back now
                    for delivery in deliveries:
                        await broker.nack(delivery, delay=0.0)
                raise
            # A redelivered message may be one that kills its worker: it is
            # committed and acknowledged alone, after the others, so that it
            # cannot take their attempts with it again.
            fresh = [d for d in deliveries if d.message.attempt == 1]
            again = [[d] for d in deliveries if d.message.attempt > 1]
            for group in [fresh, *again] if fresh else again:
                await self._grouped(handler, call, group, prepared)
            return len(deliveries)
        limit = asyncio.Semaphore(handler.concurrency)

        async def one(delivery: Delivery) -> None:
            async with limit:
                if self.stopping:
                    await broker.nack(delivery, delay=0.0)
                    return
                try:
                    prepared = await self._before(handler, [delivery])
                    async with store.transaction() as tx:
                        [outcome] = await self._handle_all(
                            handler, call, tx, [delivery], store.outbox_add, prepared
                        )
                except BaseException:
                    with contextlib.suppress(Exception):  # hand it back, as above
                        await broker.nack(delivery, delay=0.0)
                    raise
                await self._sink_dead([(delivery, outcome)])
                if outcome.retry:
                    await broker.nack(delivery, delay=outcome.delay)
                else:
                    await broker.ack([delivery])
                self.processed += 1

        # Settle the whole batch before reporting a failure (say, an ack the
        # broker refused): the other deliveries must not run on outside the
        # worker, where stop() and the grace period cannot see them.
        results = await asyncio.gather(*(one(d) for d in deliveries), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(deliveries)

    async def _before(self, handler: Handler, deliveries: Sequence[Delivery]) -> dict[str, object]:
        """What a batch needs before its transaction opens: the handler's rate
        limiter permits (one per message), then its ``prepare`` calls, at most
        ``concurrency`` at once. Waiting and calling out here holds no
        database lock and spends no attempt beyond the delivery's own.
        Returns each delivery's prepared value (or the exception it raised)
        by receipt."""
        limiter, key_of = handler.rate_limit, handler.rate_limit_key
        if limiter is not None:
            for delivery in deliveries:
                await limiter.acquire(key=None if key_of is None else key_of(delivery.message))
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

    async def _grouped(
        self,
        handler: Handler,
        call: Callable[[Context], Awaitable[None]],
        deliveries: list[Delivery],
        prepared: dict[str, object],
    ) -> None:
        """Group commit on the generic path: the batch shares one store
        transaction (a savepoint per delivery, as on the bound path) and one
        acknowledgement sent after the commit."""
        broker, store = self.app.broker, self.app.store
        try:
            async with store.transaction() as tx:
                outcomes = await self._handle_all(
                    handler, call, tx, deliveries, store.outbox_add, prepared
                )
        except BaseException:
            with contextlib.suppress(Exception):  # rolled back: hand the batch back now
                for delivery in deliveries:
                    await broker.nack(delivery, delay=0.0)
            raise
        settled = list(zip(deliveries, outcomes, strict=True))
        await self._sink_dead(settled)
        try:
            # A lost ack only means a redelivery, which the inbox skips.
            await broker.ack([d for d, outcome in settled if not outcome.retry])
        finally:
            for delivery, outcome in settled:
                if outcome.retry:
                    await broker.nack(delivery, delay=outcome.delay)
        self.processed += len(deliveries)

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
        whether to ack or retry each.

        The inbox costs two statements per batch, not one per message: it is
        read for the whole batch first (a recorded id is a duplicate: acked
        and skipped), and the ids applied are inserted at the end. If a
        concurrent transaction committed one of them meanwhile, that insert
        fails, ``tx`` rolls back and the batch comes back, to be skipped.
        Messages the handlers publish are kept until the batch is done and
        written with one ``publisher`` call, in the same transaction; those of
        a handler whose savepoint rolled back are dropped with it.
        """
        store = self.app.store
        done = await store.inbox_seen(tx, handler.group, [d.message.id for d in deliveries])
        applied: list[str] = []
        outcomes: list[_Outcome] = []
        published: list[Message] = []
        for delivery in deliveries:
            message = delivery.message
            if message.id in done:
                log.debug(
                    "duplicate %s skipped",
                    message.id,
                    extra={"event": "conveyor.duplicate_skipped", "message_id": message.id},
                )
                outcomes.append(_ACK)
                continue
            outcome = await self._handle(
                handler, call, tx, delivery, published, prepared.get(delivery.receipt, _UNSET)
            )
            if outcome.applied:
                done.add(message.id)
                applied.append(message.id)
            outcomes.append(outcome)
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
        published: list[Message],
        prepared: object,
    ) -> _Outcome:
        """Run one delivery inside ``tx``; returns whether to ack or retry and
        whether the inbox must record it. What the handler publishes joins
        ``published`` only if its savepoint commits.

        Dead letters are written to ``tx`` here and acknowledged by the caller.
        """
        app = self.app
        message = delivery.message
        policy = handler.retry
        if delivery.malformed is not None:
            return await self._dead(
                tx,
                handler,
                message,
                f"malformed message: {delivery.malformed}",
                "MalformedMessage",
                "",
            )
        if len(message.payload) > app.settings.max_payload:
            # Written by something that skipped publish()'s check: refused
            # here too, so a handler never sees more than the bound.
            return await self._dead(
                tx,
                handler,
                message,
                f"payload of {len(message.payload)} bytes is over max_payload "
                f"({app.settings.max_payload} bytes)",
                "PayloadTooLarge",
                "",
            )
        if message.attempt > policy.max_attempts:
            return await self._dead(
                tx,
                handler,
                message,
                f"delivered {message.attempt} times without an outcome "
                "(worker killed or lease expired while handling it)",
                "Undeliverable",
                "",
            )
        if handler.retry_budget is not None and message.attempt == 1:
            handler.retry_budget.record_attempt()
        sent: list[Message] = []

        async def collect(_tx: Transaction, messages: Sequence[Message]) -> None:
            sent.extend(messages)

        ctx = Context(message, handler.group, tx, collect, app.codec, app.settings.max_payload)
        if prepared is not _UNSET:
            ctx.set_prepared(
                prepared.error if isinstance(prepared, _Failed) else prepared,
                failed=isinstance(prepared, _Failed),
            )
        try:
            async with tx.savepoint():
                if handler.timeout is None:
                    await call(ctx)
                else:
                    try:
                        async with asyncio.timeout(handler.timeout) as scope:
                            await call(ctx)
                    except TimeoutError as exc:
                        if scope.expired():
                            raise HandlerTimeout(
                                f"handler {handler.func.__qualname__} ran past its "
                                f"{handler.timeout:g}s timeout"
                            ) from exc
                        raise
            published.extend(sent)
            return _APPLIED
        except Skip:
            return _APPLIED
        except DeadLetter as signal:
            return await self._dead(tx, handler, message, signal.reason, "DeadLetter", "")
        except Retry as signal:
            if message.attempt < policy.max_attempts:
                delay = (
                    signal.delay if signal.delay is not None else self._backoff(handler, message)
                )
                self._log_retry(handler, message, delay, signal.reason or "Retry requested")
                return _Outcome(retry=True, delay=delay)
            return await self._dead(
                tx,
                handler,
                message,
                f"retry requested after the last attempt ({message.attempt})",
                "Retry",
                "",
            )
        except Exception as exc:
            if policy.should_retry(exc, message.attempt):
                delay = self._backoff(handler, message)
                self._log_retry(handler, message, delay, f"{type(exc).__name__}: {exc}")
                return _Outcome(retry=True, delay=delay)
            why = (
                "permanent error"
                if not policy.is_retryable(exc)
                else f"gave up after {message.attempt} attempt(s)"
            )
            return await self._dead(
                tx,
                handler,
                message,
                f"{why}: {type(exc).__name__}: {exc}",
                _qualname(type(exc)),
                "".join(traceback.format_exception(exc)),
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
                "message_id": message.id,
                "correlation_id": message.correlation_id,
                "group": handler.group,
            },
        )

    async def _dead(
        self,
        tx: Transaction,
        handler: Handler,
        message: Message,
        reason: str,
        error_type: str,
        tb: str,
    ) -> _Outcome:
        await self.app.store.dead_letter(
            tx,
            group=handler.group,
            message=message,
            reason=reason,
            error_type=error_type,
            traceback=tb,
        )
        log.warning(
            "dead-lettered %s for %s: %s",
            message.id,
            handler.group,
            reason,
            extra={
                "event": "conveyor.dead_lettered",
                "message_id": message.id,
                "correlation_id": message.correlation_id,
                "group": handler.group,
            },
        )
        return _Outcome(dead=(reason, error_type))

    async def _sink_dead(self, settled: Sequence[tuple[Delivery, _Outcome]]) -> None:
        """Hand committed dead letters to a broker that keeps its own (Kafka's
        dead-letter topic). A failure loses nothing, the store has them."""
        broker = self.app.broker
        if not isinstance(broker, DeadLetterSink):
            return
        for delivery, outcome in settled:
            if outcome.dead is None:
                continue
            reason, error_type = outcome.dead
            try:
                await broker.dead_letter(delivery, reason=reason, error_type=error_type)
            except Exception as exc:
                log.warning(
                    "broker dead-letter copy of %s failed: %r",
                    delivery.message.id,
                    exc,
                    extra={
                        "event": "conveyor.dead_letter_sink_failed",
                        "message_id": delivery.message.id,
                        "correlation_id": delivery.message.correlation_id,
                        "group": delivery.group,
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
                    await app.broker.publish([m for _, m in rows])
                    await app.store.outbox_done([i for i, _ in rows])
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

    async def _prune(self) -> None:
        app = self.app
        while True:
            with contextlib.suppress(Exception):
                await app.store.prune_inbox(
                    older_than=app.clock.time() - app.settings.inbox_retention
                )
            await asyncio.sleep(3600)


def _qualname(cls: type[BaseException]) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
