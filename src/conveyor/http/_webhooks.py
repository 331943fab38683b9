"""Webhooks: endpoints registered per owner, signed deliveries, retries.

An owner (an API key) registers endpoint URLs; each endpoint has its own
``whsec_`` secret. ``enqueue`` queues one event for one endpoint through the
session's outbox, so the delivery is scheduled if and only if the caller's
transaction commits. A Conveyor handler on topic ``conveyor.webhooks``
then POSTs it, signed the Standard Webhooks way (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``; see ``conveyor.client.verify``),
through the SSRF guard of ``conveyor.http._ssrf``.

Outcomes, per Standard Webhooks:

- 2xx: delivered.
- 410 Gone: the receiver wants no more; the endpoint is disabled.
- 429, 5xx, connection errors and timeouts: retried with capped exponential
  backoff and full jitter (``retry``), waiting at least a ``Retry-After``.
- 3xx (redirects are never followed) and any other status: failed at once.

Every attempt is a row of ``conveyor_webhook_deliveries`` (status code,
error, duration, outcome), written in the handler's transaction. That is why
a retry is scheduled by publishing the next attempt, in the same transaction
as the row, rather than by raising ``Retry`` (which rolls the handler's
writes back); likewise a delivery that fails for good is dead-lettered by
writing the dead letter in that transaction. A dead letter holds the first
attempt under a fresh message id, so replaying it starts a new schedule.

Delivery is at least once: a worker that dies after the POST and before its
commit delivers again, with the same ``webhook-id``, which receivers use to
drop duplicates. Secrets are kept in the store in clear (signing needs them).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pydantic

from conveyor._retry_after import parse_retry_after
from conveyor._time import Clock, seconds
from conveyor.client._verify import new_secret, signature_header
from conveyor.errors import UnknownEndpoint, UnsafeTarget, WebhookError
from conveyor.http._ssrf import Guard, GuardedTransport
from conveyor.messages import Message, uuid7
from conveyor.resilience import RetryPolicy
from conveyor.runtime import App, Context, Session

__all__ = [
    "DELIVERED",
    "DROPPED",
    "FAILED",
    "GONE",
    "GROUP",
    "RETRYING",
    "SCHEMA",
    "TOPIC",
    "DeliveryAttempt",
    "Endpoint",
    "Webhooks",
]

log = logging.getLogger(__name__)

TOPIC = "conveyor.webhooks"
GROUP = "conveyor_webhooks"

DELIVERED = "delivered"
RETRYING = "retrying"
FAILED = "failed"
GONE = "gone"
DROPPED = "dropped"

DEFAULT_RETRY = RetryPolicy(max_attempts=15, base_delay=5.0, max_delay=6 * 3600.0)
"""About 17 hours of capped backoff (8 on average, with full jitter)."""

MAX_RETRY_AFTER = 24 * 3600.0
"""A ``Retry-After`` longer than this is read as this."""

_ERROR_BODY = 512
"""Bytes of a failed response's body kept in the attempt's error."""

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conveyor_webhook_endpoints (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        previous TEXT NOT NULL DEFAULT '[]',
        enabled INTEGER NOT NULL,
        disabled_reason TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS conveyor_webhook_endpoints_owner_url "
    "ON conveyor_webhook_endpoints (owner, url)",
    """CREATE TABLE IF NOT EXISTS conveyor_webhook_deliveries (
        id TEXT PRIMARY KEY,
        webhook_id TEXT NOT NULL,
        endpoint_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        url TEXT NOT NULL,
        event_type TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        status_code INTEGER,
        error TEXT NOT NULL DEFAULT '',
        duration DOUBLE PRECISION NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        next_at DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS conveyor_webhook_deliveries_webhook "
    "ON conveyor_webhook_deliveries (webhook_id)",
    "CREATE INDEX IF NOT EXISTS conveyor_webhook_deliveries_endpoint "
    "ON conveyor_webhook_deliveries (endpoint_id, at)",
)

_ENDPOINT_COLUMNS = "id, owner, url, secret, previous, enabled, disabled_reason"
_DELIVERY_COLUMNS = (
    "webhook_id, endpoint_id, url, event_type, attempt, outcome, status_code, error, "
    "duration, at, next_at"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A registered webhook endpoint. ``secret`` is the current signing
    secret; a disabled endpoint (``enabled`` False, ``disabled_reason``) gets
    no deliveries."""

    id: str
    owner: str
    url: str
    secret: str
    enabled: bool
    disabled_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryAttempt:
    """One attempt to deliver one webhook (``webhook_id``) to one endpoint.

    ``outcome`` is ``delivered``, ``retrying`` (``next_at`` says when),
    ``failed`` (dead-lettered), ``gone`` (410: endpoint disabled) or
    ``dropped`` (the endpoint was removed or disabled before the attempt).
    ``status_code`` is None when no response came; ``at`` is when the
    attempt started (epoch seconds), ``duration`` how long it took.
    """

    webhook_id: str
    endpoint_id: str
    url: str
    event_type: str
    attempt: int
    outcome: str
    status_code: int | None
    error: str
    duration: float
    at: float
    next_at: float | None


class _Task(pydantic.BaseModel):
    """The message body of one delivery attempt. ``payload`` is the exact
    JSON text sent (and signed) on every attempt."""

    model_config = pydantic.ConfigDict(frozen=True)

    webhook_id: str
    endpoint_id: str
    owner: str
    url: str
    event_type: str
    payload: str
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What one delivery attempt found: the endpoint (None if it was removed
    or disabled), the result, when it started and how long it took."""

    endpoint: Endpoint | None
    result: _Result
    at: float
    duration: float


@dataclass(frozen=True, slots=True)
class _Result:
    outcome: str
    status_code: int | None = None
    error: str = ""
    retry_after: float | None = None
    transient: bool = False


class Webhooks:
    """Webhook endpoints and their deliveries; see the module doc.

    Construct it before the app connects: it registers the delivery handler
    on ``app`` (topic ``conveyor.webhooks``, group ``conveyor_webhooks``).
    ``allow`` lists CIDRs and host names the SSRF guard permits anyway;
    ``retry`` sets the delivery schedule (its ``max_attempts`` and backoff;
    which failures retry is fixed by the status code); ``timeout`` bounds
    the resolution and the POST each (seconds); a rotated secret keeps
    signing for ``rotation_grace``. ``transport`` (tests) is the httpx
    transport under the guard; ``resolver`` replaces DNS; ``concurrency``
    deliveries run at once.

    Each attempt (resolution, connection, request and response together) is
    bounded by ``timeout`` in total, however slowly a receiver trickles its
    answer. It runs as the delivery handler's ``prepare``, before the
    handler's store transaction opens: no POST is ever made while a
    transaction holds a database lock. The handler then records the outcome.
    """

    def __init__(
        self,
        app: App,
        *,
        allow: Sequence[str] = (),
        retry: RetryPolicy | None = None,
        timeout: float | timedelta = 10.0,
        rotation_grace: float | timedelta = 24 * 3600.0,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
        concurrency: int = 4,
    ) -> None:
        self.app = app
        self.guard = Guard(allow=allow, resolver=resolver)
        self.retry = retry or DEFAULT_RETRY
        self.timeout = seconds(timeout)
        self.rotation_grace = seconds(rotation_grace)
        self.clock: Clock = clock or app.clock
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        app.handler(
            TOPIC,
            group=GROUP,
            concurrency=concurrency,
            # Fetch no more than can run: a delivery waiting behind a slow
            # receiver inside a leased batch would only be delayed.
            prefetch=concurrency,
            # The attempt itself runs before the transaction (see the class doc).
            prepare=self._attempt,
            timeout=10.0,
        )(self._deliver)

    @property
    def client(self) -> httpx.AsyncClient:
        """The httpx client deliveries go through (guarded, no redirects)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=GuardedTransport(self.guard, self._transport),
                follow_redirects=False,
                timeout=self.timeout,
                headers={"user-agent": "conveyor-webhooks"},
            )
        return self._client

    async def aclose(self) -> None:
        """Close the delivery client (and the transport under it)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def create_tables(self, session: Session) -> None:
        """Create the endpoint and delivery tables if missing (idempotent)."""
        for statement in SCHEMA:
            await session.execute(statement)

    async def check(self, url: str) -> str:
        """Resolve ``url``'s host and run the SSRF guard on every address it
        has, within ``timeout``; returns the URL as it will be stored.
        ``UnsafeTarget`` if refused, ``WebhookError`` if the host does not
        resolve in time. Call it before ``register``, outside any
        transaction: it waits on DNS."""
        try:
            async with asyncio.timeout(self.timeout):
                target = await self.guard.check(url)
        except TimeoutError:
            raise WebhookError(
                f"webhook URL {url!r} cannot be used: its host did not resolve within "
                f"{self.timeout:g}s"
            ) from None
        except httpx.TransportError as exc:
            raise WebhookError(f"webhook URL {url!r} cannot be used: {exc}") from None
        return str(target.url)

    async def register(self, session: Session, *, owner: str, url: str) -> Endpoint:
        """Register ``url`` for ``owner`` with a fresh secret. Only its form is
        checked here (http(s), a host, no user info; a literal address must
        pass the guard): ``register`` runs in ``session``'s transaction and
        makes no network call. Run ``check(url)`` first to refuse a host that
        resolves to a private address before it is stored; every delivery
        resolves and checks it again anyway. Registering a URL the owner
        already has returns that endpoint, enabled again if it was disabled."""
        parsed = self.guard.parse(url)
        self.guard.check_literal(parsed)
        normal = str(parsed)
        now = self.clock.time()
        existing = await self._find(session, "owner = ? AND url = ?", (owner, normal))
        if existing is not None:
            if not existing.enabled:
                await session.execute(
                    "UPDATE conveyor_webhook_endpoints SET enabled = 1, disabled_reason = '', "
                    "updated_at = ? WHERE id = ?",
                    (now, existing.id),
                )
                existing = Endpoint(
                    id=existing.id, owner=owner, url=normal, secret=existing.secret, enabled=True
                )
            return existing
        endpoint = Endpoint(id=uuid7(), owner=owner, url=normal, secret=new_secret(), enabled=True)
        await session.execute(
            "INSERT INTO conveyor_webhook_endpoints (id, owner, url, secret, previous, enabled, "
            "disabled_reason, created_at, updated_at) VALUES (?, ?, ?, ?, '[]', 1, '', ?, ?)",
            (endpoint.id, owner, normal, endpoint.secret, now, now),
        )
        log.info(
            "webhook endpoint %s registered for %s",
            endpoint.id,
            normal,
            extra={"event": "conveyor.webhook_registered", "endpoint_id": endpoint.id},
        )
        return endpoint

    async def rotate(self, session: Session, *, owner: str, endpoint_id: str) -> Endpoint:
        """Give the endpoint a new secret; the old one keeps signing next to
        it for ``rotation_grace`` so receivers can switch without a gap.
        ``UnknownEndpoint`` if the owner has no such endpoint."""
        row = await session.fetchone(
            "SELECT secret, previous FROM conveyor_webhook_endpoints WHERE id = ? AND owner = ?",
            (endpoint_id, owner),
        )
        if row is None:
            raise UnknownEndpoint(f"no webhook endpoint {endpoint_id!r} for this owner")
        now = self.clock.time()
        previous = [p for p in _previous(row[1]) if p["until"] > now]
        previous.append({"secret": row[0], "until": now + self.rotation_grace})
        secret = new_secret()
        await session.execute(
            "UPDATE conveyor_webhook_endpoints SET secret = ?, previous = ?, updated_at = ? "
            "WHERE id = ?",
            (secret, json.dumps(previous), now, endpoint_id),
        )
        endpoint = await self._find(session, "id = ?", (endpoint_id,))
        assert endpoint is not None
        return endpoint

    async def remove(self, session: Session, *, owner: str, endpoint_id: str) -> bool:
        """Delete the endpoint; queued deliveries to it are dropped. False if
        the owner had no such endpoint."""
        changed = await session.execute(
            "DELETE FROM conveyor_webhook_endpoints WHERE id = ? AND owner = ?",
            (endpoint_id, owner),
        )
        return changed > 0

    async def endpoints(self, session: Session, *, owner: str) -> list[Endpoint]:
        """The owner's endpoints, oldest first, enabled or not."""
        rows = await session.fetchall(
            f"SELECT {_ENDPOINT_COLUMNS} FROM conveyor_webhook_endpoints WHERE owner = ? "
            "ORDER BY created_at, id",
            (owner,),
        )
        return [_endpoint(r) for r in rows]

    async def endpoint_for(self, session: Session, *, owner: str, url: str) -> Endpoint | None:
        """The owner's endpoint for ``url`` (enabled or not), or None."""
        try:
            normal = str(self.guard.parse(url))
        except UnsafeTarget:
            return None
        return await self._find(session, "owner = ? AND url = ?", (owner, normal))

    async def enqueue(
        self,
        session: Session,
        *,
        owner: str,
        url: str,
        event_type: str,
        data: Mapping[str, object],
    ) -> str:
        """Queue ``{"type", "timestamp", "data"}`` for the owner's enabled
        endpoint at ``url``, in ``session``'s transaction; returns the
        ``webhook-id``. ``UnknownEndpoint`` if there is no such enabled
        endpoint."""
        endpoint = await self.endpoint_for(session, owner=owner, url=url)
        if endpoint is None or not endpoint.enabled:
            state = "disabled" if endpoint is not None else "registered"
            raise UnknownEndpoint(
                f"no {state} webhook endpoint for {url!r}; register it with POST /webhooks"
            )
        event = {"type": event_type, "timestamp": _iso(self.clock.time()), "data": dict(data)}
        webhook_id = "msg_" + uuid7().replace("-", "")
        task = _Task(
            webhook_id=webhook_id,
            endpoint_id=endpoint.id,
            owner=owner,
            url=endpoint.url,
            event_type=event_type,
            payload=json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=_json),
        )
        await session.publish(TOPIC, task, key=endpoint.id, type=event_type)
        return webhook_id

    async def deliveries(
        self,
        session: Session,
        *,
        owner: str,
        endpoint_id: str | None = None,
        webhook_id: str | None = None,
        limit: int = 100,
    ) -> list[DeliveryAttempt]:
        """The owner's delivery attempts, newest first, optionally for one
        endpoint or one webhook."""
        clauses, params = ["owner = ?"], [owner]
        if endpoint_id is not None:
            clauses.append("endpoint_id = ?")
            params.append(endpoint_id)
        if webhook_id is not None:
            clauses.append("webhook_id = ?")
            params.append(webhook_id)
        rows = await session.fetchall(
            f"SELECT {_DELIVERY_COLUMNS} FROM conveyor_webhook_deliveries "
            f"WHERE {' AND '.join(clauses)} ORDER BY at DESC, attempt DESC LIMIT ?",
            (*params, limit),
        )
        return [
            DeliveryAttempt(
                webhook_id=r[0],
                endpoint_id=r[1],
                url=r[2],
                event_type=r[3],
                attempt=int(r[4]),
                outcome=r[5],
                status_code=None if r[6] is None else int(r[6]),
                error=r[7],
                duration=float(r[8]),
                at=float(r[9]),
                next_at=None if r[10] is None else float(r[10]),
            )
            for r in rows
        ]

    async def _find(
        self, session: Session, where: str, params: Sequence[object]
    ) -> Endpoint | None:
        row = await session.fetchone(
            f"SELECT {_ENDPOINT_COLUMNS} FROM conveyor_webhook_endpoints WHERE {where}", params
        )
        return None if row is None else _endpoint(row)

    async def _attempt(self, message: Message) -> _Attempt:
        """One attempt, made before the delivery handler's transaction opens
        (its ``prepare``): read the endpoint, sign, POST within ``timeout``."""
        task = message.decode(_Task, self.app.codec)
        rows = await self.app.store.read(
            f"SELECT {_ENDPOINT_COLUMNS} FROM conveyor_webhook_endpoints WHERE id = ?",
            (task.endpoint_id,),
        )
        now = self.clock.time()
        row = rows[0] if rows else None
        if row is None or not row[5]:
            why = "endpoint removed" if row is None else f"endpoint disabled: {row[6]}"
            return _Attempt(None, _Result(DROPPED, error=why), now, 0.0)
        endpoint = _endpoint(row)
        keys = [endpoint.secret, *(p["secret"] for p in _previous(row[4]) if p["until"] > now)]
        body = task.payload.encode()
        timestamp = int(now)
        headers = {
            "webhook-id": task.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(keys, task.webhook_id, timestamp, body),
            "content-type": "application/json",
        }
        started = self.clock.monotonic()
        observers = self.app.observers
        call: dict[str, object] = {}
        with observers.calling(
            message, method="POST", url=endpoint.url, headers=headers, result=call
        ):
            try:
                async with asyncio.timeout(self.timeout):
                    result = await self._post(endpoint.url, body, headers)
            except TimeoutError:
                result = _Result(RETRYING, error=f"no complete answer within {self.timeout:g}s")
            call.update(status=result.status_code, outcome=result.outcome, error=result.error)
        duration = max(0.0, self.clock.monotonic() - started)
        return _Attempt(endpoint, result, now, duration)

    async def _deliver(self, ctx: Context, task: _Task) -> None:
        """The delivery handler: records the attempt its ``prepare`` made."""
        attempt: _Attempt = ctx.prepared
        endpoint, result, now, duration = (
            attempt.endpoint,
            attempt.result,
            attempt.at,
            attempt.duration,
        )
        observers = self.app.observers
        if observers:
            outcome = result.outcome
            if outcome == RETRYING and task.attempt >= self.retry.max_attempts:
                outcome = FAILED
            ctx.on_commit(lambda: observers.webhook_attempted(outcome=outcome, seconds=duration))
        if endpoint is None:
            await self._record(ctx, task, result, now)
            return
        if result.outcome == GONE:
            await ctx.execute(
                "UPDATE conveyor_webhook_endpoints SET enabled = 0, disabled_reason = ?, "
                "updated_at = ? WHERE id = ?",
                (f"the receiver answered 410 Gone at {_iso(now)}", now, endpoint.id),
            )
            log.warning(
                "webhook endpoint %s disabled: %s answered 410 Gone",
                endpoint.id,
                endpoint.url,
                extra={"event": "conveyor.webhook_endpoint_disabled", "endpoint_id": endpoint.id},
            )
        if result.outcome != RETRYING:
            await self._record(ctx, task, result, now, duration)
            if result.outcome == FAILED:
                await self._dead(ctx, task, endpoint, result.error)
            return
        if task.attempt >= self.retry.max_attempts:
            error = f"gave up after {task.attempt} attempt(s): {result.error}"
            failed = _Result(FAILED, result.status_code, error)
            await self._record(ctx, task, failed, now, duration)
            await self._dead(ctx, task, endpoint, error)
            return
        delay = self.retry.backoff(task.attempt)
        if result.retry_after is not None:
            delay = max(delay, result.retry_after)
        await self._record(ctx, task, result, now, duration, self.clock.time() + delay)
        await ctx.publish(
            TOPIC,
            task.model_copy(update={"attempt": task.attempt + 1}),
            key=endpoint.id,
            type=task.event_type,
            delay=delay,
        )
        log.info(
            "webhook %s to %s: attempt %d failed (%s); next in %.1fs",
            task.webhook_id,
            endpoint.url,
            task.attempt,
            result.error,
            delay,
            extra={"event": "conveyor.webhook_retry_scheduled", "webhook_id": task.webhook_id},
        )

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> _Result:
        """POST once and classify the answer (never raises for HTTP trouble)."""
        try:
            request = self.client.build_request("POST", url, content=body, headers=headers)
            response = await self.client.send(request, stream=True)
        except UnsafeTarget as exc:
            return _Result(FAILED, error=str(exc))
        except httpx.TimeoutException as exc:
            return _Result(RETRYING, error=f"timed out after {self.timeout:g}s ({exc!r})")
        except httpx.TransportError as exc:
            return _Result(RETRYING, error=f"{type(exc).__name__}: {exc}")
        try:
            status = response.status_code
            if 200 <= status < 300:
                return _Result(DELIVERED, status)
            detail = await _head(response)
        except httpx.HTTPError as exc:
            # The status line came; the body broke off. Only 2xx counts as delivered.
            detail = f"(body unreadable: {type(exc).__name__})"
        finally:
            await response.aclose()
        if status == 410:
            return _Result(GONE, status, f"HTTP 410 Gone {detail}".strip())
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(
                response.headers.get("retry-after"), limit=MAX_RETRY_AFTER, now=self.clock.time()
            )
            return _Result(RETRYING, status, f"HTTP {status} {detail}".strip(), retry_after)
        if 300 <= status < 400:
            where = response.headers.get("location", "")
            return _Result(
                FAILED,
                status,
                f"HTTP {status}: redirect to {where!r} not followed; register the final URL",
            )
        return _Result(FAILED, status, f"HTTP {status} {detail}".strip())

    async def _record(
        self,
        ctx: Context,
        task: _Task,
        result: _Result,
        at: float,
        duration: float = 0.0,
        next_at: float | None = None,
    ) -> None:
        await ctx.execute(
            "INSERT INTO conveyor_webhook_deliveries (id, webhook_id, endpoint_id, owner, url, "
            "event_type, attempt, outcome, status_code, error, duration, at, next_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                uuid7(),
                task.webhook_id,
                task.endpoint_id,
                task.owner,
                task.url,
                task.event_type,
                task.attempt,
                result.outcome,
                result.status_code,
                result.error,
                duration,
                at,
                next_at,
            ),
        )

    async def _dead(self, ctx: Context, task: _Task, endpoint: Endpoint, reason: str) -> None:
        """Dead-letter the delivery in the handler's transaction (so the
        attempt's row commits with it), as a first attempt under a fresh
        message id: a replay starts the schedule again and is not taken
        for a duplicate of the message just handled."""
        fresh = self.app.outbound.build(
            TOPIC,
            task.model_copy(update={"attempt": 1}),
            {"type": task.event_type, "key": endpoint.id, "headers": dict(ctx.message.headers)},
        )
        await ctx.dead_letter(
            f"webhook {task.webhook_id} to {endpoint.url}: {reason}",
            error_type="WebhookDeliveryFailed",
            message=fresh.with_attempt(task.attempt),
        )


def _endpoint(row: Sequence[Any]) -> Endpoint:
    return Endpoint(
        id=row[0],
        owner=row[1],
        url=row[2],
        secret=row[3],
        enabled=bool(row[5]),
        disabled_reason=row[6],
    )


def _previous(text: str) -> list[dict[str, Any]]:
    value = json.loads(text or "[]")
    return value if isinstance(value, list) else []


def _iso(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _json(value: object) -> object:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


async def _head(response: httpx.Response) -> str:
    """The first bytes of a response body, for an attempt's error."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= _ERROR_BODY:
            break
    text = data[:_ERROR_BODY].decode("utf-8", "replace").strip()
    return f"({text})" if text else ""
