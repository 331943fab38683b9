"""Jobs: kinds of asynchronous work behind the HTTP API, their records and
the ``JobStore`` contract.

A job kind is a pydantic input model, an ``async def run(job, body)`` handler
and a result TTL. ``Jobs.kind`` registers the handler on the ``App`` as a
normal Conveyor handler (topic ``conveyor.jobs.<kind>``), so jobs get the
runtime's retries, inbox and outbox. The job's state lives in a ``JobStore``:

- ``accept`` persists the record and queues its message in one atomic step
  (the store's outbox, or one Redis ``MULTI``), with the idempotency record;
- ``mark_running``, ``set_progress`` and ``cancel`` commit on their own,
  outside the handler's transaction, so a status poll sees them at once;
- ``finish`` records the final state inside the handler's transaction (the
  webhook delivery of a job with a callback is queued in that transaction
  too); it never overwrites a cancelled or finished job.

A finished job's record expires ``ttl`` seconds after it finished; ``get``
returns ``None`` for an unknown or expired id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Unpack

import pydantic

from conveyor._time import Clock, seconds
from conveyor.errors import ConfigError, PermanentError, UnknownEndpoint
from conveyor.http._json import json_text
from conveyor.messages import uuid7
from conveyor.resilience import RetryPolicy
from conveyor.runtime import App, Context, HandlerOptions, Session

if TYPE_CHECKING:
    from conveyor.http._webhooks import Webhooks

__all__ = [
    "CANCELLED",
    "FAILED",
    "FINAL",
    "PENDING",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "IdempotencyRecord",
    "JobContext",
    "JobKind",
    "JobRecord",
    "JobStore",
    "Jobs",
    "StoredResponse",
    "fingerprint",
]

log = logging.getLogger(__name__)

PENDING = "PENDING"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
STATUSES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

TOPIC_PREFIX = "conveyor.jobs."
DEFAULT_TTL = 180.0

M = TypeVar("M", bound=pydantic.BaseModel)
JobFunc = Callable[["JobContext", Any], Awaitable[object]]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """One job as stored. ``owner`` is the API key name that created it ("" when
    keys are off); ``expires_at`` is set once the job is final."""

    id: str
    kind: str
    owner: str = ""
    status: str = PENDING
    progress: float | None = None
    note: str | None = None
    result: object = None
    error: str | None = None
    callback_url: str | None = None
    created_at: float
    updated_at: float
    finished_at: float | None = None
    expires_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def status_body(self) -> dict[str, object]:
        """The body of ``GET /jobs/{kind}/{id}`` (and of a job webhook's ``data``)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "note": self.note,
            "result": self.result,
            "error": self.error,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": None if self.finished_at is None else _iso(self.finished_at),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredResponse:
    """A response kept for an Idempotency-Key: replayed byte for byte."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def to_json(self) -> str:
        return json_text(
            {"status": self.status, "headers": dict(self.headers), "body": self.body.decode()}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredResponse:
        data = json.loads(text)
        return cls(status=int(data["status"]), headers=data["headers"], body=data["body"].encode())


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotencyRecord:
    """An Idempotency-Key seen for ``owner``: ``response`` is None while the
    original request is still being created (until ``lease_until``)."""

    owner: str
    key: str
    fingerprint: str
    response: StoredResponse | None
    lease_until: float
    expires_at: float


def fingerprint(kind: str, body: bytes) -> str:
    """SHA-256 of the kind and the body's canonical JSON (key order and
    whitespace do not matter); the raw bytes when the body is not JSON."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))
    except ValueError:
        canonical = body.decode("utf-8", "replace")
    return hashlib.sha256(f"{kind}\n{canonical}".encode()).hexdigest()


class JobStore(Protocol):
    """Where job records and idempotency records live; shared by every
    replica (no state in a server's memory). Implementations:
    ``conveyor.http.sql_jobs.SqlJobStore`` and
    ``conveyor.http.redis_jobs.RedisJobStore``. Every method raises
    ``StoreError`` (or ``BrokerError`` for Redis) when the backend fails."""

    async def connect(self, app: App) -> None:
        """Create tables / clients; idempotent. Called when ``app`` connects."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the store does not answer (``/readyz``)."""
        ...

    async def begin_idempotent(
        self, owner: str, key: str, fingerprint: str, *, lease: float, keep: float
    ) -> IdempotencyRecord | None:
        """Claim ``key`` for ``owner`` (state "creating" for ``lease`` seconds),
        committed at once. Returns None when this request now owns the key,
        else the existing record (a stored response, or another request still
        creating it). An expired lease is taken over."""
        ...

    async def release_idempotent(self, owner: str, key: str) -> None:
        """Forget a claim whose request failed before it created a job."""
        ...

    async def accept(
        self,
        record: JobRecord,
        *,
        topic: str,
        payload: Mapping[str, object],
        idempotency: tuple[str, StoredResponse, float] | None = None,
    ) -> None:
        """Persist ``record`` and queue ``payload`` on ``topic`` atomically;
        with ``idempotency=(key, response, keep)`` also store the response
        for ``(record.owner, key)`` in the same atomic step."""
        ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or expired (live state merged in)."""
        ...

    async def mark_running(self, job_id: str) -> bool:
        """Status RUNNING, committed at once; False if cancelled or final."""
        ...

    async def set_progress(self, job_id: str, progress: float, note: str | None) -> None:
        """Progress in [0, 1] and a note, committed at once (ignored once final)."""
        ...

    async def cancel(self, job_id: str, *, ttl: float) -> JobRecord | None:
        """Cancel a job that has not finished, committed at once; returns the
        record as it now is (finished ones unchanged), None when unknown.

        Atomic with ``finish``: a cancel that wins means ``finish`` records
        CANCELLED; a cancel that loses returns the final status ``finish``
        recorded, even before the handler's transaction has committed."""
        ...

    async def is_cancelled(self, job_id: str) -> bool: ...

    async def finish(
        self,
        session: Session,
        job_id: str,
        *,
        status: str,
        result: object = None,
        error: str | None = None,
        ttl: float,
    ) -> JobRecord | None:
        """Record a final ``status`` as part of ``session``'s transaction (SQL
        stores) or at once (Redis). Returns the final record, or None when the
        job was already final (cancelled meanwhile: nothing is overwritten)."""
        ...

    async def prune(self) -> int:
        """Delete expired job and idempotency records; returns how many."""
        ...

    async def relay(self) -> int:
        """Move accepted jobs' messages to the broker when the store keeps its
        own outbox (Redis); returns how many moved. 0 for SQL stores, whose
        messages go through the App's outbox relay."""
        ...


class JobContext:
    """What a job handler gets besides its body.

    ``progress`` commits immediately, outside the handler's transaction, so a
    status poll sees it while the job runs. ``cancelled()`` tells whether a
    ``DELETE`` came in; a handler that checks it can stop early (its result is
    never recorded for a cancelled job either way). ``ctx`` is the message's
    handler context: write to the store or publish messages through it and
    they commit with the job's final state.
    """

    __slots__ = ("_store", "ctx", "id", "kind")

    def __init__(self, *, id: str, kind: str, ctx: Context, store: JobStore) -> None:
        self.id = id
        self.kind = kind
        self.ctx = ctx
        self._store = store

    @property
    def attempt(self) -> int:
        return self.ctx.attempt

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        return self.ctx.log

    async def progress(self, fraction: float, note: str | None = None) -> None:
        """Report progress in [0, 1] (clamped) and an optional note."""
        await self._store.set_progress(self.id, min(1.0, max(0.0, float(fraction))), note)

    async def cancelled(self) -> bool:
        return await self._store.is_cancelled(self.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobKind:
    """A registered kind: name, input model, handler and settings."""

    name: str
    model: type[pydantic.BaseModel]
    func: JobFunc
    ttl: float
    retry: RetryPolicy
    timeout: float | None
    shed_above: int | None
    summary: str = ""

    @property
    def topic(self) -> str:
        return TOPIC_PREFIX + self.name


class Jobs:
    """The registry of job kinds of one ``App`` and the store of their records.

    ``store`` defaults to ``SqlJobStore()`` on the App's store. ``webhooks``
    (a ``conveyor.http.Webhooks`` on the same App) receives a delivery for each
    job submitted with a ``Callback-Url`` when it finishes. ``clock`` (default:
    the App's) drives every timestamp and TTL::

        jobs = Jobs(app)

        @jobs.kind("sum_of_primes", ttl=180)
        async def sum_of_primes(job: JobContext, body: Range) -> int: ...
    """

    def __init__(
        self,
        app: App,
        *,
        store: JobStore | None = None,
        webhooks: Webhooks | None = None,
        clock: Clock | None = None,
    ) -> None:
        if store is None:
            from conveyor.http.sql_jobs import SqlJobStore

            store = SqlJobStore(clock=clock or app.clock)
        self.app = app
        self.store: JobStore = store
        self.webhooks = webhooks
        self.clock: Clock = clock or app.clock
        self.kinds: dict[str, JobKind] = {}
        app.on_connect(self._connect_store)

    async def _connect_store(self, app: App) -> None:
        await self.store.connect(app)

    def kind(
        self,
        name: str,
        *,
        ttl: float | timedelta = DEFAULT_TTL,
        shed_above: int | None = None,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[Callable[[JobContext, M], Awaitable[object]]], Callable[..., Awaitable[object]]]:
        """Register ``async def run(job: JobContext, body: Model) -> result``.

        The result must be JSON-serialisable (or a pydantic model): a result
        that is not (also NaN, a lone surrogate, nesting deeper than 64
        levels) makes the job FAILED, saying why. ``ttl``:
        how long a finished job's record is kept (default 180 s). ``retry``:
        the handler's retry policy; the job is FAILED once it gives up (or on
        ``PermanentError``). ``timeout`` bounds one attempt (a retryable
        failure). ``shed_above``: ``POST`` answers 503 while more than this
        many messages of the kind wait. The other options are
        ``App.handler``'s (``HandlerOptions``: ``concurrency``, ``prefetch``,
        ``breakers``, ``rate_limit``, ``bulkhead``, ``retry_budget``...), for
        the handler that runs the kind's jobs.
        """
        if not name or "/" in name:
            raise ConfigError(f"job kind {name!r} must be a non-empty name without '/'")
        if name in self.kinds:
            raise ConfigError(f"job kind {name!r} is registered twice; pick another name")
        retry = options.pop("retry", None) or RetryPolicy()
        timeout = options.pop("timeout", None)
        ttl_s = seconds(ttl)
        if ttl_s <= 0:
            raise ConfigError(f"job kind {name!r}: ttl must be > 0, got {ttl_s}")

        def register(
            func: Callable[[JobContext, M], Awaitable[object]],
        ) -> Callable[..., Awaitable[object]]:
            model = _body_model(func, name)
            kind = JobKind(
                name=name,
                model=model,
                func=func,
                ttl=ttl_s,
                retry=retry,
                timeout=None if timeout is None else seconds(timeout),
                shed_above=shed_above,
                summary=(func.__doc__ or "").strip().split("\n")[0],
            )
            self.kinds[name] = kind
            # The timeout is the job's own (a failure the job records), not the
            # handler's, which would end the attempt outside the job.
            handler_options: HandlerOptions = {**options, "retry": kind.retry}
            self.app.handler(kind.topic, group=kind.topic, **handler_options)(self._handler(kind))
            return func

        return register

    def new_record(
        self, kind: str, *, owner: str = "", callback_url: str | None = None
    ) -> JobRecord:
        now = self.clock.time()
        return JobRecord(
            id=uuid7(),
            kind=kind,
            owner=owner,
            callback_url=callback_url,
            created_at=now,
            updated_at=now,
        )

    def _handler(self, kind: JobKind) -> Callable[[Context, dict[str, Any]], Awaitable[None]]:
        async def run_job(ctx: Context, message: dict[str, Any]) -> None:
            await self._run(kind, ctx, message)

        run_job.__qualname__ = run_job.__name__ = f"job_{kind.name}"
        return run_job

    async def _run(self, kind: JobKind, ctx: Context, message: dict[str, Any]) -> None:
        store = self.store
        job_id = str(message["id"])
        record = await store.get(job_id)
        if record is None:
            return  # expired and pruned
        if record.finished:
            # Cancelled before it ran: record it (and queue its webhook) once.
            if record.status == CANCELLED:
                await self._finish(kind, ctx, job_id, CANCELLED)
            return
        if not await store.mark_running(job_id):
            await self._finish(kind, ctx, job_id, CANCELLED)
            return
        job = JobContext(id=job_id, kind=kind.name, ctx=ctx, store=store)
        try:
            body = kind.model.model_validate(message["body"])
            if kind.timeout is None:
                result = await kind.func(job, body)
            else:
                async with asyncio.timeout(kind.timeout):
                    result = await kind.func(job, body)
        except Exception as exc:
            if isinstance(exc, pydantic.ValidationError):
                exc = PermanentError(f"the stored body no longer validates: {exc}")
            if kind.retry.should_retry(exc, ctx.attempt):
                raise
            # The final failure is recorded and acknowledged here (a raise
            # would roll the record back with the handler's savepoint).
            ctx.log.warning(
                "job %s (%s) failed after %d attempt(s): %s",
                job_id,
                kind.name,
                ctx.attempt,
                "".join(traceback.format_exception(exc)),
                extra={"event": "conveyor.job_failed"},
            )
            await self._finish(kind, ctx, job_id, FAILED, error=_describe(exc))
            return
        if isinstance(result, pydantic.BaseModel):
            result = result.model_dump(mode="json")
        try:
            json_text(result)
        except ValueError as exc:
            # Stored, it would break every read of the job: a failure instead.
            error = f"the job's result is not storable JSON: {exc}"
            await self._finish(kind, ctx, job_id, FAILED, error=error)
            return
        await self._finish(kind, ctx, job_id, SUCCEEDED, result=result)

    async def _finish(
        self,
        kind: JobKind,
        ctx: Context,
        job_id: str,
        status: str,
        *,
        result: object = None,
        error: str | None = None,
    ) -> None:
        status = CANCELLED if await self.store.is_cancelled(job_id) else status
        done = await self.store.finish(
            ctx,
            job_id,
            status=status,
            result=result if status == SUCCEEDED else None,
            error=error if status == FAILED else None,
            ttl=kind.ttl,
        )
        if done is not None:
            await self.notify(ctx, done)
            observers = self.app.observers
            if observers:
                took = max(0.0, (done.finished_at or done.updated_at) - done.created_at)
                ctx.on_commit(
                    lambda: observers.job_finished(kind.name, status=done.status, seconds=took)
                )

    async def notify(self, session: Session, record: JobRecord) -> None:
        """Queue the webhook of a finished job that has a callback URL (in
        ``session``'s transaction)."""
        if record.callback_url is None or self.webhooks is None:
            return
        try:
            await self.webhooks.enqueue(
                session,
                owner=record.owner,
                url=record.callback_url,
                event_type=f"job.{record.status.lower()}",
                data=record.status_body(),
            )
        except UnknownEndpoint as exc:
            # The endpoint was removed or disabled (410) after the job was
            # accepted: the job's outcome stands; only the callback is dropped.
            log.warning(
                "job %s finished %s; its callback is not sent: %s",
                record.id,
                record.status,
                exc,
                extra={"event": "conveyor.job_callback_dropped", "job_id": record.id},
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "TimeoutError: the job ran past its timeout"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _body_model(func: Callable[..., object], name: str) -> type[pydantic.BaseModel]:
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise ConfigError(
            f"job kind {name!r}: cannot resolve the annotations of {func.__qualname__} ({exc}); "
            "define the body model at module level"
        ) from None
    params = list(inspect.signature(func).parameters)
    if not inspect.iscoroutinefunction(func) or len(params) != 2:
        raise ConfigError(
            f"job kind {name!r}: {func.__qualname__} must be `async def run(job, body: Model)`"
        )
    model = hints.get(params[1])
    if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
        raise ConfigError(
            f"job kind {name!r}: annotate the body of {func.__qualname__} with a pydantic model"
        )
    return model


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def with_status(record: JobRecord, **changes: Any) -> JobRecord:
    """A copy of ``record`` with ``changes`` (a helper for stores)."""
    return replace(record, **changes)
