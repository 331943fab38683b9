from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from conveyor.errors import ConfigError
from conveyor.messages import Codec, Message
from conveyor.store._protocol import Transaction

__all__ = ["Context", "Middleware", "PublishOptions", "Session", "build_message"]

_log = logging.getLogger("conveyor.handler")
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


def build_message(
    topic: str, body: object, *, codec: Codec, max_payload: int, **options: Unpack[PublishOptions]
) -> Message:
    return Message.create(topic, body, codec=codec, max_payload=max_payload, **options)


class Session:
    """An open store transaction plus ``publish`` into it (transactional outbox).

    Everything written through a session, rows and messages, commits together
    or not at all.
    """

    __slots__ = ("_codec", "_max_payload", "_publisher", "tx")

    def __init__(
        self, tx: Transaction, publisher: Publisher, codec: Codec, max_payload: int
    ) -> None:
        self.tx = tx
        self._publisher = publisher
        self._codec = codec
        self._max_payload = max_payload

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self.tx.execute(sql, params)

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        return await self.tx.fetchone(sql, params)

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return await self.tx.fetchall(sql, params)

    def _build(self, topic: str, body: object, options: PublishOptions) -> Message:
        return build_message(
            topic, body, codec=self._codec, max_payload=self._max_payload, **options
        )

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

    __slots__ = ("_log", "_prepare_failed", "_prepared", "group", "message")

    def __init__(
        self,
        message: Message,
        group: str,
        tx: Transaction,
        publisher: Publisher,
        codec: Codec,
        max_payload: int,
    ) -> None:
        super().__init__(tx, publisher, codec, max_payload)
        self.message = message
        self.group = group
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self._prepared: object = _NOT_PREPARED
        self._prepare_failed = False

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
        headers = {**options.get("headers", {}), **self.message.causal_headers()}
        return super()._build(topic, body, {**options, "headers": headers})


Middleware = Callable[[Context, Callable[[], Awaitable[None]]], Awaitable[None]]
"""An around-hook: ``async def mw(ctx, call_next): ...; await call_next(); ...``."""
