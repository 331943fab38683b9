from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Unpack

from conveyor._time import Clock, SystemClock, seconds
from conveyor.brokers._factory import broker_from_url
from conveyor.brokers._protocol import Broker, DeadLetterSink, Delivery, TransactionalBroker
from conveyor.errors import ConfigError, Overloaded
from conveyor.messages import JSON, Codec, Message
from conveyor.resilience import (
    LoadShedder,
)
from conveyor.runtime._context import (
    Middleware,
    Outbound,
    Publisher,
    PublishOptions,
    Session,
    run_committed,
)
from conveyor.runtime._handlers import Handler, HandlerFunc, HandlerOptions
from conveyor.runtime._observe import DeadLettered, Observer, Observers
from conveyor.runtime._worker import Worker
from conveyor.settings import Settings, load_settings
from conveyor.store._factory import store_from_url
from conveyor.store._protocol import Store, Transaction
from conveyor.store._schema import ensure_layout

__all__ = ["App"]

_log = logging.getLogger("conveyor.worker")


CLOSE_TIMEOUT = 10.0
"""Seconds closing the broker, or the store, may take before it is abandoned."""


async def _bounded_close(part: Broker | Store | None, what: str) -> None:
    if part is None:
        return
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await part.close()
    except TimeoutError:
        _log.warning(
            "closing the %s took longer than %gs; its connections are left to the OS",
            what,
            CLOSE_TIMEOUT,
            extra={"event": "conveyor.close_timeout"},
        )


class App:
    """An application: its handlers, broker, store and middleware.

    ``App()`` reads ``CONVEYOR_*`` settings; pass ``settings=``, or ready-made
    ``broker=`` / ``store=`` objects, to override. Use ``async with app:`` (or
    ``connect()``/``close()``) around ``publish`` and ``transaction``.
    """

    def __init__(
        self,
        name: str = "conveyor",
        *,
        settings: Settings | None = None,
        broker: Broker | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        codec: Codec = JSON,
        middleware: Sequence[Middleware] = (),
        observers: Sequence[Observer] = (),
    ) -> None:
        self.name = name
        self._settings = settings or load_settings()
        self.clock: Clock = clock or SystemClock()
        self.codec = codec
        self._outbound: Outbound | None = None
        self.middleware: list[Middleware] = list(middleware)
        self.observers = Observers(observers)
        self.handlers: list[Handler] = []
        self._broker = broker
        self._store = store
        # Made from the settings (not handed in): replaced when they change.
        self._own_broker = broker is None
        self._own_store = store is None
        self._connected = False
        self._shedder: LoadShedder | None = None
        self._on_connect: list[Callable[[App], Awaitable[None]]] = []
        self.periodic: list[tuple[float, Callable[[App], Awaitable[None]]]] = []
        self.at_stop: list[Callable[[App], Awaitable[None]]] = []

    @property
    def settings(self) -> Settings:
        """The app's settings. Assigning new ones (before connecting, or after
        ``close()``) makes the next ``connect()`` use their broker and store."""
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        if self._connected:
            raise ConfigError(f"app {self.name!r} is connected; close() it before new settings")
        self._settings = settings
        self._shedder = None
        if self._own_broker:
            self._broker = None
        if self._own_store:
            self._store = None

    @property
    def outbound(self) -> Outbound:
        """How this app builds the messages it sends (codec, payload limit,
        causal and trace headers, what the observers add)."""
        built = self._outbound
        if (
            built is None
            or built.codec is not self.codec
            or built.max_payload != self.settings.max_payload
        ):
            built = self._outbound = Outbound(self.codec, self.settings.max_payload, self.observers)
        return built

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            self._broker = broker_from_url(self.settings.broker_url, clock=self.clock)
        return self._broker

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = store_from_url(self.settings.resolved_store_url, clock=self.clock)
        return self._store

    def handler(
        self, topic: str, *, group: str | None = None, **options: Unpack[HandlerOptions]
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register ``async def f(ctx, body: Model)`` for ``topic`` in ``group``
        (default: the function's name). ``body`` is decoded from the payload
        by its annotation (a pydantic model, ``dict``, ``bytes``...); a payload
        that does not decode is dead-lettered at once with the reason.

        The options (``HandlerOptions``): ``concurrency``, ``prefetch``,
        ``retry``, ``timeout``; ``rate_limit`` (a limiter or ``"10/s"``, per
        ``rate_limit_key(message)``) is waited for before each message,
        without spending an attempt; ``bulkhead`` guards each handler call;
        ``retry_budget`` caps retries (see docs/resilience.md). While any of
        ``breakers`` is open this consumer stops fetching; while one is
        half-open it fetches one message at a time, as the probe.

        ``prepare`` is for a handler that calls another service: ``await
        prepare(message)`` runs before the message's transaction opens (after
        its rate-limit permit), so a slow service holds no database lock; the
        handler then finds the result in ``ctx.prepared`` and records it in
        its transaction. It runs again when the message is redelivered, also
        for a duplicate the inbox then skips, so it must be idempotent (send
        an idempotency key)."""
        # Checked at once, not when the decorator is applied.
        Handler.build(_probe, topic=topic, group="probe", clock=self.clock, options=options)

        def register(func: HandlerFunc) -> HandlerFunc:
            name = group or func.__name__
            if any(h.topic == topic and h.group == name for h in self.handlers):
                raise ConfigError(
                    f"two handlers for topic {topic!r} in group {name!r}; give one a group="
                )
            self.handlers.append(
                Handler.build(func, topic=topic, group=name, clock=self.clock, options=options)
            )
            return func

        return register

    def observe(self, observer: Observer) -> Observer:
        """Add an observer of every message's life (metrics, tracing...);
        see ``conveyor.runtime.Observer``."""
        self.observers.add(observer)
        return observer

    def use(self, middleware: Middleware) -> Middleware:
        """Append an around-hook; the first added is the outermost."""
        self.middleware.append(middleware)
        return middleware

    def on_connect(
        self, hook: Callable[[App], Awaitable[None]]
    ) -> Callable[[App], Awaitable[None]]:
        """Run ``await hook(app)`` each time the app connects, after the store
        is open (create tables here, with ``app.transaction()``); hooks must
        be idempotent."""
        self._on_connect.append(hook)
        return hook

    def every(
        self, interval: float | timedelta, *, at_stop: bool = False
    ) -> Callable[[Callable[[App], Awaitable[None]]], Callable[[App], Awaitable[None]]]:
        """Run ``await task(app)`` in every worker, then again ``interval``
        after it returns, until the worker stops. A task that raises is
        logged and runs again at its next turn; it must be idempotent, since
        every worker process runs it. With ``at_stop`` it also runs once
        more when a worker stops, after its handlers have finished (for a
        task that writes out what they left behind: a buffer, a journal)."""
        period = seconds(interval)
        if period <= 0:
            raise ConfigError(f"interval must be > 0 seconds, got {period}")

        def register(
            task: Callable[[App], Awaitable[None]],
        ) -> Callable[[App], Awaitable[None]]:
            self.periodic.append((period, task))
            if at_stop:
                self.at_stop.append(task)
            return task

        return register

    async def connect(self) -> None:
        """Connect broker and store, run the ``on_connect`` hooks and declare
        every handler's subscription."""
        if self._connected:
            return
        await self.store.connect()
        await ensure_layout(self.store, migrate=self.settings.migrate, now=self.clock.time())
        await self.broker.connect()
        # Connected from here on, so that hooks may use transaction().
        self._connected = True
        try:
            for hook in self._on_connect:
                await hook(self)
            for h in self.handlers:
                await self.broker.declare(h.topic, h.group)
        except BaseException:
            self._connected = False
            raise

    async def close(self) -> None:
        """Close broker and store, each within ``CLOSE_TIMEOUT``: a server
        that stopped answering (a connection blackholed, a close handshake
        never acknowledged) must not keep a stopping process alive. The
        store is closed even when closing the broker fails."""
        try:
            await _bounded_close(self._broker, "broker")
        finally:
            await _bounded_close(self._store, "store")
            self._connected = False

    async def __aenter__(self) -> App:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(self, topic: str, body: object, **options: Unpack[PublishOptions]) -> Message:
        """Publish straight to the broker; durable once this returns.

        Inside a handler use ``ctx.publish`` instead, so the message commits
        with the handler's writes.
        """
        message = self.outbound.build(topic, body, options)
        await self.connect()
        if self.settings.shed_above is not None:
            await self._shed(topic, self.settings.shed_above)
        if not self.observers:
            await self.broker.publish([message])
            return message
        started = time.perf_counter()
        try:
            await self.broker.publish([message])
        except BaseException as exc:
            self.observers.published(
                [message], via="publish", seconds=time.perf_counter() - started, error=exc
            )
            raise
        self.observers.published([message], via="publish", seconds=time.perf_counter() - started)
        return message

    async def _shed(self, topic: str, threshold: int) -> None:
        """Refuse with ``Overloaded`` while any group's backlog on ``topic``
        (ready + delayed) is over ``threshold``; depth is cached for 1s."""
        if self._shedder is None:
            broker = self.broker

            async def depth(topic: str) -> int:
                return max(
                    (q.ready + q.delayed for q in await broker.stats() if q.topic == topic),
                    default=0,
                )

            self._shedder = LoadShedder(threshold, depth, clock=self.clock)
        try:
            await self._shedder.check(topic)
        except Overloaded:
            if self.observers:
                self.observers.shed(topic)
            raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        """A store transaction whose ``publish`` goes through the outbox:
        rows and messages commit together or not at all."""
        await self.connect()
        publisher = self._publisher()
        sent: list[Message] = []

        async def recorded(tx: Transaction, messages: Sequence[Message]) -> None:
            await publisher(tx, messages)
            sent.extend(messages)

        started = time.perf_counter()
        async with self.store.transaction() as tx:
            session = Session(
                tx, recorded if self.observers else publisher, self.outbound, self.store
            )
            yield session
        if sent:
            self.observers.published(sent, via="outbox", seconds=time.perf_counter() - started)
        if session.dead_letters:
            await self.dead_lettered(session.dead_letters)
        run_committed(session.committed)

    async def dead_lettered(self, dead: Sequence[DeadLettered]) -> None:
        """After the commit of dead letters (``Session.dead_letter``): copy
        them to a broker that keeps its own (Kafka's dead-letter topic; a
        failure loses nothing, the store has them) and tell the observers."""
        broker = self.broker
        if isinstance(broker, DeadLetterSink):
            for item in dead:
                try:
                    await broker.dead_letter(
                        Delivery(item.message, item.group, ""),
                        reason=item.reason,
                        error_type=item.error_type,
                    )
                except Exception as exc:
                    _log.warning(
                        "broker dead-letter copy of %s failed: %r",
                        item.message.id,
                        exc,
                        extra={
                            "event": "conveyor.dead_letter_sink_failed",
                            "message_id": item.message.id,
                            "group": item.group,
                        },
                    )
        if self.observers:
            self.observers.dead_lettered(dead)

    def _publisher(self) -> Publisher:
        broker = self.broker
        binding = broker.bind(self.store) if isinstance(broker, TransactionalBroker) else None
        return binding.publish if binding is not None else self.store.outbox_add

    def worker(self, *, grace_period: float | None = None) -> Worker:
        return Worker(self, grace_period=grace_period)

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run a worker until SIGTERM/SIGINT, then shut down gracefully."""
        worker = self.worker()
        loop = asyncio.get_running_loop()
        installed = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, worker.stop)
                    installed.append(sig)
        try:
            await worker.run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.close()


async def _probe(ctx: object) -> None:
    """Stands in for a handler function while options are checked."""
