"""Observer hooks: what metrics, tracing, logs and the console see of every
message's life, called by the runtime from one place per event.

An ``Observer`` overrides the hooks it needs; the others do nothing:

- ``outgoing(message)``: a message was built (``App.publish``,
  ``Session.publish``, a handler's ``ctx.publish``, a saga command, a
  webhook attempt); the observer may return headers to add or replace (a
  tracer's ``traceparent``: the span that sent it).
- ``published(messages, via, seconds, error)``: messages left: ``via`` is
  ``"publish"`` (``App.publish``, straight to the broker), ``"outbox"`` (a
  transaction that wrote them committed) or ``"relay"`` (the outbox relay
  sent committed rows).
- ``fetched(topic, group, count, seconds)``: a consumer fetched a batch.
- ``consuming(ctx)``: a context manager around one handler call (middleware
  included), inside the handler's transaction.
- ``settled(events)``: what became of each message of a batch once its
  transaction ended: ``Settlement`` with the outcome (``applied``,
  ``duplicate``, ``retry`` + delay, ``dead_letter`` + reason, or
  ``rolled_back``) and the dead letters the batch wrote.
- ``dead_lettered(dead)``: dead letters committed, by a worker, a saga, a
  webhook giving up, or any ``Session.dead_letter``.
- ``waited(topic, group, reason, seconds)``: a consumer waited for rate
  limit permits, or paused while a circuit breaker was open.
- ``shed(topic)``: ``App.publish`` refused a message (``Overloaded``).
- ``saga_changed``, ``job_accepted``, ``job_finished``, ``webhook_attempted``,
  ``http_request``: what sagas, the HTTP job API and webhooks did.

Hooks are called synchronously on the event loop and must be quick; an
exception in one is logged and never changes the outcome.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from conveyor.messages import Message

if TYPE_CHECKING:
    from conveyor.runtime._context import Context
    from conveyor.sagas._history import SagaEvent, SagaRecord

__all__ = [
    "APPLIED",
    "DEAD_LETTER",
    "DUPLICATE",
    "DeadLettered",
    "Observer",
    "Observers",
    "RETRY",
    "ROLLED_BACK",
    "Settlement",
]

log = logging.getLogger("conveyor.observe")

APPLIED = "applied"
DUPLICATE = "duplicate"
RETRY = "retry"
DEAD_LETTER = "dead_letter"
ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A dead letter a transaction wrote (the message's own, or one a
    handler wrote for another message, as a saga giving up does)."""

    group: str
    message: Message
    reason: str
    error_type: str


@dataclass(slots=True)
class Settlement:
    """What became of one delivered message (read-only to observers; not
    frozen because one is built for every message settled, and a frozen
    dataclass costs a slow ``object.__setattr__`` per field).

    ``started`` and ``finished`` are wall-clock times around its handler
    (None when no handler ran: a duplicate, a malformed message); ``delay``
    is the retry's; ``reason`` and ``error_type`` are the dead letter's or
    the retried error's; ``dead_letters`` holds every dead letter its handler
    call wrote (its own included)."""

    message: Message
    topic: str
    group: str
    outcome: str
    started: float | None = None
    finished: float | None = None
    delay: float | None = None
    reason: str = ""
    error_type: str = ""
    dead_letters: tuple[DeadLettered, ...] = field(default=())


class Observer:
    """Override the hooks you need; see the module doc."""

    def outgoing(self, message: Message, *, parent: str | None) -> Mapping[str, str] | None:
        """Headers to add to (or replace in) a message just built, or None.
        ``parent``: the ``traceparent`` it was sent in the trace of (its
        cause's, the handled message's, or the one its sender set), if any."""
        return None

    @contextlib.contextmanager
    def calling(
        self,
        cause: Message,
        *,
        method: str,
        url: str,
        headers: dict[str, str],
        result: dict[str, object],
    ) -> Iterator[None]:
        """Around an HTTP call made on behalf of ``cause`` (a webhook
        attempt); the observer may add to ``headers`` (a ``traceparent``).
        The caller puts ``status`` (the HTTP status, or None) and ``outcome``
        into ``result`` before the block ends."""
        yield

    def published(
        self, messages: Sequence[Message], *, via: str, seconds: float, error: BaseException | None
    ) -> None:
        """Messages left (or failed to: ``error``) ``via`` publish, outbox or relay."""

    def fetched(self, topic: str, group: str, *, count: int, seconds: float) -> None:
        """A consumer fetched ``count`` messages (0: nothing was ready)."""

    @contextlib.contextmanager
    def consuming(self, ctx: Context) -> Iterator[None]:
        """Around one handler call."""
        yield

    def settled(self, events: Sequence[Settlement]) -> None:
        """The outcomes of one batch, after its transaction ended."""

    def dead_lettered(self, dead: Sequence[DeadLettered]) -> None:
        """Dead letters whose transaction committed (a worker's, a saga's...)."""

    def waited(self, topic: str, group: str, *, reason: str, seconds: float) -> None:
        """A consumer waited, holding no lock: ``rate_limit`` (for permits)
        or ``breaker`` (paused while a breaker of its was open)."""

    def shed(self, topic: str) -> None:
        """``App.publish`` refused a message with ``Overloaded``."""

    def beat(self, at: float) -> None:
        """This worker recorded its heartbeat at ``at``."""

    def saga_changed(
        self, record: SagaRecord, events: Sequence[SagaEvent], *, since: float
    ) -> None:
        """A saga's change committed: its record now and the events of the
        change; ``since`` is when it last changed before (a step's send)."""

    def job_accepted(self, kind: str) -> None:
        """The HTTP job API accepted a job of ``kind``."""

    def job_finished(self, kind: str, *, status: str, seconds: float) -> None:
        """A job ended (``SUCCEEDED``, ``FAILED``, ``CANCELLED``) ``seconds``
        after it was accepted."""

    def webhook_attempted(self, *, outcome: str, seconds: float) -> None:
        """One webhook delivery attempt ended with ``outcome``."""

    def http_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """The HTTP job API answered one request."""


class Observers:
    """The app's observers, called in order; a failing hook is logged."""

    __slots__ = ("items", "scoped")

    def __init__(self, items: Sequence[Observer] = ()) -> None:
        self.items: list[Observer] = []
        self.scoped: list[Observer] = []
        """The observers with a ``consuming`` scope of their own: with none,
        the worker opens no scope around a handler call."""
        for observer in items:
            self.add(observer)

    def add(self, observer: Observer) -> None:
        self.items.append(observer)
        if type(observer).consuming is not Observer.consuming:
            self.scoped.append(observer)

    def __bool__(self) -> bool:
        return bool(self.items)

    def outgoing(self, message: Message, *, parent: str | None = None) -> Message:
        extra: dict[str, str] = {}
        for observer in self.items:
            try:
                extra.update(observer.outgoing(message, parent=parent) or {})
            except Exception:
                _failed(observer, "outgoing")
        if not extra:
            return message
        return replace(message, headers={**message.headers, **extra})

    @contextlib.contextmanager
    def calling(
        self,
        cause: Message,
        *,
        method: str,
        url: str,
        headers: dict[str, str],
        result: dict[str, object],
    ) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for observer in self.items:
                try:
                    stack.enter_context(
                        observer.calling(
                            cause, method=method, url=url, headers=headers, result=result
                        )
                    )
                except Exception:
                    _failed(observer, "calling")
            yield

    def published(
        self,
        messages: Sequence[Message],
        *,
        via: str,
        seconds: float,
        error: BaseException | None = None,
    ) -> None:
        for observer in self.items:
            try:
                observer.published(messages, via=via, seconds=seconds, error=error)
            except Exception:
                _failed(observer, "published")

    def fetched(self, topic: str, group: str, *, count: int, seconds: float) -> None:
        for observer in self.items:
            try:
                observer.fetched(topic, group, count=count, seconds=seconds)
            except Exception:
                _failed(observer, "fetched")

    def consuming(self, ctx: Context) -> contextlib.AbstractContextManager[object]:
        if len(self.scoped) == 1:
            return _Guarded(self.scoped[0], ctx)
        return _All([_Guarded(observer, ctx) for observer in self.scoped])

    def settled(self, events: Sequence[Settlement]) -> None:
        for observer in self.items:
            try:
                observer.settled(events)
            except Exception:
                _failed(observer, "settled")

    def dead_lettered(self, dead: Sequence[DeadLettered]) -> None:
        for observer in self.items:
            try:
                observer.dead_lettered(dead)
            except Exception:
                _failed(observer, "dead_lettered")

    def waited(self, topic: str, group: str, *, reason: str, seconds: float) -> None:
        for observer in self.items:
            try:
                observer.waited(topic, group, reason=reason, seconds=seconds)
            except Exception:
                _failed(observer, "waited")

    def shed(self, topic: str) -> None:
        for observer in self.items:
            try:
                observer.shed(topic)
            except Exception:
                _failed(observer, "shed")

    def beat(self, at: float) -> None:
        for observer in self.items:
            try:
                observer.beat(at)
            except Exception:
                _failed(observer, "beat")

    def saga_changed(
        self, record: SagaRecord, events: Sequence[SagaEvent], *, since: float
    ) -> None:
        for observer in self.items:
            try:
                observer.saga_changed(record, events, since=since)
            except Exception:
                _failed(observer, "saga_changed")

    def job_accepted(self, kind: str) -> None:
        for observer in self.items:
            try:
                observer.job_accepted(kind)
            except Exception:
                _failed(observer, "job_accepted")

    def job_finished(self, kind: str, *, status: str, seconds: float) -> None:
        for observer in self.items:
            try:
                observer.job_finished(kind, status=status, seconds=seconds)
            except Exception:
                _failed(observer, "job_finished")

    def webhook_attempted(self, *, outcome: str, seconds: float) -> None:
        for observer in self.items:
            try:
                observer.webhook_attempted(outcome=outcome, seconds=seconds)
            except Exception:
                _failed(observer, "webhook_attempted")

    def http_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        for observer in self.items:
            try:
                observer.http_request(route=route, method=method, status=status, seconds=seconds)
            except Exception:
                _failed(observer, "http_request")


class _Guarded(contextlib.AbstractContextManager[object]):
    """One observer's ``consuming`` scope; an observer that fails to enter it
    is logged and left out, never the handler's failure."""

    __slots__ = ("_observer", "_scope")

    def __init__(self, observer: Observer, ctx: Context) -> None:
        try:
            self._scope: contextlib.AbstractContextManager[object] | None = observer.consuming(ctx)
        except Exception:
            _failed(observer, "consuming")
            self._scope = None
        self._observer = observer

    def __enter__(self) -> object:
        if self._scope is not None:
            try:
                return self._scope.__enter__()
            except Exception:
                _failed(self._observer, "consuming")
                self._scope = None
        return None

    def __exit__(self, *exc: Any) -> None:
        if self._scope is not None:
            self._scope.__exit__(*exc)


class _All(contextlib.AbstractContextManager[object]):
    """Several observers' ``consuming`` scopes, entered in order and left in
    reverse."""

    __slots__ = ("_scopes",)

    def __init__(self, scopes: list[_Guarded]) -> None:
        self._scopes = scopes

    def __enter__(self) -> None:
        for scope in self._scopes:
            scope.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for scope in reversed(self._scopes):
            scope.__exit__(*exc)


def _failed(observer: Observer, hook: str) -> None:
    log.exception(
        "observer %s failed in %s; the message's outcome is unchanged",
        type(observer).__qualname__,
        hook,
        extra={"event": "conveyor.observer_failed"},
    )
