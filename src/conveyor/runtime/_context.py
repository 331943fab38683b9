from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from conveyor.errors import ConfigError
from conveyor.messages import TRACEPARENT, Codec, Message, child_traceparent, trace_id
from conveyor.runtime._observe import DeadLettered, Observers
from conveyor.store._protocol import Store, Transaction

__all__ = [
    "Context",
    "Middleware",
    "Outbound",
    "PublishOptions",
    "Session",
    "handling",
    "message_ids",
]

_log = logging.getLogger("conveyor.handler")
_dead_log = logging.getLogger("conveyor.worker")
_NOT_PREPARED = object()

Publisher = Callable[[Transaction, Sequence[Message]], Awaitable[None]]


class PublishOptions(TypedDict, total=False):
    """Keyword options of every ``publish``: ``type``, ``key`` (per-key
    order), ``headers``, ``priority`` (higher first) and ``delay`` (seconds)."""

    type: str
    key: str | None
    headers: Mapping[str, str]
    priority: int
    delay: float


handling: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "conveyor_handling", default=None
)
"""The handler context the worker runs a handler in (one set per message):
the trace a message sent without a cause joins, and the ids every log record
written meanwhile carries (``Context.log_fields``)."""


def message_ids(message: Message, group: str) -> dict[str, object]:
    """The ids a log record about ``message`` carries."""
    ids: dict[str, object] = {
        "message_id": message.id,
        "correlation_id": message.correlation_id,
        "causation_id": message.causation_id,
        "topic": message.topic,
        "group": group,
        "attempt": message.attempt,
    }
    saga = message.headers.get("saga-id")
    if saga:
        ids["saga_id"] = saga
    trace = trace_id(message.traceparent)
    if trace:
        ids["trace_id"] = trace
    return ids


class Outbound:
    """How an app builds what it sends: its codec and payload limit, the
    causal headers of the message being handled, a ``traceparent``, and what
    its observers add (a tracer's own ``traceparent``). Every message the
    runtime, a saga or a webhook sends is built here."""

    __slots__ = ("codec", "max_payload", "observers")

    def __init__(self, codec: Codec, max_payload: int, observers: Observers | None = None) -> None:
        self.codec = codec
        self.max_payload = max_payload
        self.observers = observers if observers is not None else Observers()

    def build(
        self,
        topic: str,
        body: object,
        options: PublishOptions,
        *,
        cause: Message | None = None,
    ) -> Message:
        """The message for ``topic``; raises ``MessageError`` and
        ``PayloadTooLarge`` as ``Message.create`` does. With ``cause`` it
        carries the cause's correlation id, the cause's id as causation id
        and a ``traceparent`` in the cause's trace."""
        headers = dict(options.get("headers", {}))
        parent = headers.get(TRACEPARENT)
        if cause is not None:
            parent = cause.traceparent
            headers.update(cause.causal_headers())
        elif parent is None:
            current = handling.get()
            parent = None if current is None else current.message.traceparent
            headers[TRACEPARENT] = child_traceparent(parent)
        merged: PublishOptions = {**options, "headers": headers}
        message = Message.create(
            topic, body, codec=self.codec, max_payload=self.max_payload, **merged
        )
        return self.observers.outgoing(message, parent=parent) if self.observers.items else message


class Session:
    """An open store transaction plus ``publish`` into it (transactional outbox).

    Everything written through a session, rows and messages, commits together
    or not at all.
    """

    __slots__ = ("_outbound", "_publisher", "_store", "committed", "dead_letters", "tx")

    def __init__(
        self, tx: Transaction, publisher: Publisher, outbound: Outbound, store: Store
    ) -> None:
        self.tx = tx
        self._publisher = publisher
        self._outbound = outbound
        self._store = store
        self.dead_letters: list[DeadLettered] = []
        """The dead letters written through ``dead_letter`` in this transaction."""
        self.committed: list[Callable[[], None]] = []
        """Callbacks to run once this transaction has committed (``on_commit``)."""

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` once this transaction has committed, and never
        if it rolls back (in a handler: if its own savepoint rolls back).
        For counting what happened; it must be quick and must not raise."""
        self.committed.append(callback)

    def _default_message(self) -> Message:
        raise ConfigError("Session.dead_letter needs message=")

    def _default_group(self) -> str:
        raise ConfigError("Session.dead_letter needs group=")

    async def dead_letter(
        self,
        reason: str,
        *,
        error_type: str,
        traceback: str = "",
        message: Message | None = None,
        group: str | None = None,
    ) -> None:
        """Keep ``message`` (default: the one being handled) as a dead letter
        of ``group`` (default: this handler's), with ``reason``, in this
        transaction: it is written if and only if the transaction commits.
        Every dead letter Conveyor writes goes through here, so each one is
        logged once, counted by the observers and copied to a broker that
        keeps its own (Kafka's dead-letter topic).

        On a ``Session`` (not a handler's context) ``message`` and ``group``
        are required."""
        message = message or self._default_message()
        dead = DeadLettered(
            group=group or self._default_group(),
            message=message,
            reason=reason,
            error_type=error_type,
        )
        await self._store.dead_letter(
            self.tx,
            group=dead.group,
            message=dead.message,
            reason=reason,
            error_type=error_type,
            traceback=traceback,
        )
        self.dead_letters.append(dead)
        _dead_log.warning(
            "dead-lettered %s for %s: %s",
            dead.message.id,
            dead.group,
            reason,
            extra={
                "event": "conveyor.dead_lettered",
                "message_id": dead.message.id,
                "correlation_id": dead.message.correlation_id,
                "group": dead.group,
                "error_type": error_type,
            },
        )

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self.tx.execute(sql, params)

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        return await self.tx.fetchone(sql, params)

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return await self.tx.fetchall(sql, params)

    def _build(self, topic: str, body: object, options: PublishOptions) -> Message:
        return self._outbound.build(topic, body, options)

    async def publish(self, topic: str, body: object, **options: Unpack[PublishOptions]) -> Message:
        """Send a message when (and only if) this transaction commits."""
        message = self._build(topic, body, options)
        await self._publisher(self.tx, [message])
        return message

    async def send(self, messages: Sequence[Message]) -> None:
        """Send ready-made messages when (and only if) this transaction
        commits; they go out exactly as built (no headers are added)."""
        await self._publisher(self.tx, messages)


class Context(Session):
    """What a handler gets: the message, its group, the transaction, a logger.

    Messages published here carry the incoming message's correlation id and
    have it as their causation id.
    """

    __slots__ = ("_fields", "_log", "_prepare_failed", "_prepared", "group", "message")

    def __init__(
        self,
        message: Message,
        group: str,
        tx: Transaction,
        publisher: Publisher,
        outbound: Outbound,
        store: Store,
    ) -> None:
        super().__init__(tx, publisher, outbound, store)
        self.message = message
        self.group = group
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self._prepared: object = _NOT_PREPARED
        self._prepare_failed = False
        self._fields: dict[str, object] | None = None

    def log_fields(self) -> Mapping[str, object]:
        """The ids a log record written in this handler carries (computed
        when first asked: most messages log nothing)."""
        if self._fields is None:
            self._fields = message_ids(self.message, self.group)
        return self._fields

    def _default_message(self) -> Message:
        return self.message

    def _default_group(self) -> str:
        return self.group

    def set_prepared(self, value: object, *, failed: bool = False) -> None:
        """Set by the worker: what the handler's ``prepare`` returned (or raised)."""
        self._prepared, self._prepare_failed = value, failed

    @property
    def prepared(self) -> Any:
        """What the handler's ``prepare(message)`` returned, called before this
        transaction opened; if it raised, the same exception is raised here
        (a failure of the handler, retried as any other)."""
        if self._prepared is _NOT_PREPARED:
            raise ConfigError("this handler has no prepare=; nothing was prepared")
        if self._prepare_failed:
            assert isinstance(self._prepared, BaseException)
            raise self._prepared
        return self._prepared

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the message, correlation id and group."""
        if self._log is None:
            self._log = logging.LoggerAdapter(
                _log,
                {
                    "message_id": self.message.id,
                    "correlation_id": self.message.correlation_id,
                    "group": self.group,
                },
            )
        return self._log

    @property
    def attempt(self) -> int:
        return self.message.attempt

    def _build(self, topic: str, body: object, options: PublishOptions) -> Message:
        return self._outbound.build(topic, body, options, cause=self.message)


Middleware = Callable[[Context, Callable[[], Awaitable[None]]], Awaitable[None]]
"""An around-hook: ``async def mw(ctx, call_next): ...; await call_next(); ...``."""


def run_committed(callbacks: Sequence[Callable[[], None]]) -> None:
    """Run ``Session.on_commit`` callbacks; one that raises is logged."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            _log.exception(
                "an on_commit callback failed", extra={"event": "conveyor.on_commit_failed"}
            )
