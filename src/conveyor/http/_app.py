"""The ASGI app of the job API (FastAPI): ``JobAPI(jobs, ...)``.

Routes: ``POST /jobs/{kind}`` (202 + ``Location`` + ``Retry-After``),
``GET``/``DELETE /jobs/{kind}/{id}``, ``/webhooks`` (when ``Jobs`` has
webhooks), ``/healthz``, ``/readyz``, ``/openapi.json``. Every error is an
RFC 9457 problem body (``application/problem+json``). No state lives in a
server's memory: job, idempotency, key and webhook records are in the job
store and the App's store, rate limits in Redis when a Redis URL is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import timedelta
from types import EllipsisType
from typing import TYPE_CHECKING, Any, NoReturn

import pydantic
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from conveyor._time import Clock, seconds
from conveyor._urls import redact
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    UnknownEndpoint,
    WebhookError,
)
from conveyor.http._jobs import (
    CANCELLED,
    PENDING,
    STATUSES,
    IdempotencyRecord,
    JobKind,
    Jobs,
    StoredResponse,
    fingerprint,
)
from conveyor.http._json import body_problem
from conveyor.http._keys import ApiKeys
from conveyor.http.sql_jobs import read_rows
from conveyor.resilience import Limiter, LoadShedder, RateLimiter, parse_rate

if TYPE_CHECKING:
    from conveyor.observability.metrics import Metrics
    from conveyor.runtime import App

__all__ = ["JobAPI", "Problem"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PROBLEM = "application/problem+json"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# An Idempotency-Key or Callback-Url is printable ASCII (structured-field
# strings, URIs): anything else is a 422, never a store error.
_PRINTABLE = r"^[\x20-\x7e]*$"
MiB = 1024 * 1024


class Problem(pydantic.BaseModel):
    """An RFC 9457 problem body."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class FieldError(pydantic.BaseModel):
    loc: list[str | int]
    msg: str


class ValidationProblem(Problem):
    errors: list[FieldError] = []


class Accepted(pydantic.BaseModel):
    id: str
    kind: str
    status: str
    status_url: str


class JobStatus(pydantic.BaseModel):
    id: str
    kind: str
    status: str = pydantic.Field(json_schema_extra={"enum": list(STATUSES)})
    progress: float | None
    note: str | None
    result: Any = None
    error: str | None
    created_at: str
    updated_at: str
    finished_at: str | None


class EndpointIn(pydantic.BaseModel):
    url: str = pydantic.Field(min_length=1, max_length=2000)


class EndpointOut(pydantic.BaseModel):
    id: str
    url: str
    secret: str


class EndpointInfo(pydantic.BaseModel):
    id: str
    url: str
    enabled: bool


class _Problem(HTTPException):
    def __init__(
        self,
        status: int,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, object]] | None = None,
    ) -> None:
        super().__init__(status, detail, headers)
        self.errors = errors


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem_response(
    status: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, object]] | None = None,
) -> Response:
    """An ``application/problem+json`` response (RFC 9457)."""
    return JSONResponse(
        problem_body(status, detail, errors), status, headers=headers, media_type=PROBLEM
    )


def problem_body(
    status: int, detail: str, errors: list[dict[str, object]] | None = None
) -> dict[str, object]:
    """The RFC 9457 body of ``problem_response`` (also written by the server
    itself, for requests that never reach the app)."""
    body: dict[str, object] = {
        "type": "about:blank",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return body


class _BodyLimit:
    """413 for a body over ``limit`` bytes: at once when ``Content-Length``
    says so, else as soon as the streamed body passes it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > self.limit or length < 0:
                    status = 413 if length > self.limit else 400
                    await problem_response(status, self._detail(length))(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _Problem(413, self._detail(seen))
            return message

        await self.app(scope, limited, send)

    def _detail(self, size: int) -> str:
        if size < 0:
            return "invalid Content-Length header"
        return (
            f"the request body is over the {self.limit}-byte limit; "
            "send less, or store large data elsewhere and send a reference"
        )


class _PathGuard:
    """404 for a path holding a control character (NUL included): no route
    or record has one, and PostgreSQL text cannot even be searched for it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _CONTROL.search(scope.get("path", "")):
            detail = "no resource has a control character in its path"
            await problem_response(404, detail)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Timed:
    """Tells the app's observers each request's route (its template, never
    the path: no ids as labels), method, status and duration."""

    def __init__(self, inner: Callable[[Scope, Receive, Send], Awaitable[None]], app: App) -> None:
        self.inner = inner
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        observers = self.app.observers
        if scope["type"] != "http" or not observers:
            await self.inner(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.inner(scope, receive, sent)
        finally:
            route = scope.get("route")
            observers.http_request(
                route=getattr(route, "path", None) or "unmatched",
                method=str(scope.get("method", "")),
                status=status,
                seconds=time.perf_counter() - started,
            )


class JobAPI:
    """The HTTP job API of ``jobs`` (an ASGI app: serve it with
    ``conveyor serve MODULE:ATTR`` or any ASGI server).

    - ``keys``: API keys (default ``ApiKeys(jobs.app)``). ``require_api_key``:
      True / False, or None (default) to require a key as soon as one exists.
      Keys are sent as ``Authorization: Bearer <key>`` or ``X-API-Key``.
    - ``rate_limit``: per key (``"100/s"``, bursts of ``rate_burst``); shared by
      every replica through Redis when ``redis_url`` is given (its
      ``namespace=`` names the limit), else counted per replica. ``None`` turns it off; ``limiter`` overrides both.
    - ``unauthenticated_limit``: requests without a valid key (missing or
      unknown; they would be 401) per client address, as ``"10/s"`` with
      bursts of its count; 429 + ``Retry-After`` beyond. Default: the App's
      ``http_unauthenticated_limit`` setting (``CONVEYOR_HTTP_UNAUTHENTICATED_LIMIT``,
      ``"10/s"``); ``None`` turns it off. Shared through Redis like ``rate_limit``.
    - ``max_body``: request body limit in bytes (413 beyond).
    - ``shed_above``: 503 while a kind's queue holds more messages (a kind's
      own ``shed_above`` wins).
    - ``idempotency_keep``: how long an Idempotency-Key is remembered (24 h);
      ``idempotency_lease``: how long a request may take to create its job
      before another request with the key may take over (a crashed one);
      ``idempotency_wait``: how long a request with the key and body of one
      still creating its job waits for that job (then the same 202), before
      it answers 409 + ``Retry-After`` instead.
    - ``retry_after``: the ``Retry-After`` seconds of 202 and of pending polls.
    - ``prune_every``: seconds between deletions of expired records (run by
      the server's lifespan, or ``async with api``).
    - ``metrics``: serve ``GET /metrics`` (Prometheus' text format: this
      process's requests, accepted jobs, and the queues, jobs and sagas read
      from the store; needs the prometheus extra). ``tracing``: each request
      a server span, the jobs it starts in its trace (needs the otel extra).
      None (default): as the settings say (``CONVEYOR_METRICS``,
      ``CONVEYOR_TRACING``).
    """

    def __init__(
        self,
        jobs: Jobs,
        *,
        keys: ApiKeys | None = None,
        require_api_key: bool | None = None,
        rate_limit: str | None = "100/s",
        rate_burst: int = 100,
        redis_url: str | None = None,
        limiter: Limiter | None = None,
        unauthenticated_limit: str | EllipsisType | None = ...,
        max_body: int = MiB,
        shed_above: int | None = None,
        idempotency_keep: float | timedelta = timedelta(hours=24),
        idempotency_lease: float | timedelta = 30.0,
        idempotency_wait: float | timedelta = 5.0,
        retry_after: float = 1.0,
        prune_every: float | timedelta = 60.0,
        title: str = "Conveyor jobs",
        metrics: bool | None = None,
        tracing: bool | None = None,
    ) -> None:
        if max_body < 1:
            raise ConfigError(f"max_body must be >= 1 byte, got {max_body}")
        self.jobs = jobs
        self.app = jobs.app
        self.clock: Clock = jobs.clock
        self.keys = keys or ApiKeys(jobs.app, clock=jobs.clock)
        self.require_api_key = require_api_key
        self.max_body = max_body
        self.shed_above = shed_above
        self.idempotency_keep = seconds(idempotency_keep)
        self.idempotency_lease = seconds(idempotency_lease)
        self.idempotency_wait = seconds(idempotency_wait)
        self.retry_after = max(1, math.ceil(retry_after))
        self.prune_every = seconds(prune_every)
        self._policy: str | None = None
        self._limiter: Limiter | None = limiter
        if rate_limit is not None:
            rate, per = parse_rate(rate_limit)
            self._policy = f'"default";q={max(1, round(rate))};w={max(1, round(per))}'
            if limiter is None:
                self._limiter = self._rate_limiter(
                    "conveyor-http", rate_limit, rate_burst, redis_url
                )
        if unauthenticated_limit is ...:
            unauthenticated_limit = jobs.app.settings.http_unauthenticated_limit
        self._anonymous: Limiter | None = None
        if unauthenticated_limit is not None:
            count, _ = parse_rate(unauthenticated_limit)
            self._anonymous = self._rate_limiter(
                "conveyor-http-anonymous", unauthenticated_limit, max(1, round(count)), redis_url
            )
        self._shedders: dict[str, LoadShedder] = {}
        self._connected = False
        self._background: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        settings = self.app.settings
        self.metrics: Metrics | None = None
        if settings.metrics if metrics is None else metrics:
            from conveyor.observability.metrics import Metrics

            self.metrics = Metrics(self.app)
        self.asgi = self._build(title)
        entry: Callable[[Scope, Receive, Send], Awaitable[None]] = _Timed(
            _BodyLimit(self.asgi, max_body), self.app
        )
        if settings.tracing if tracing is None else tracing:
            from conveyor.observability.tracing import Tracing, wrap_asgi

            tracer = next((o for o in self.app.observers.items if isinstance(o, Tracing)), None)
            if tracer is None:
                tracer = Tracing(self.app)
            entry = wrap_asgi(entry, tracer_provider=tracer.provider)
        self._entry = entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    def _rate_limiter(self, name: str, spec: str, burst: int, redis_url: str | None) -> Limiter:
        """A limiter of ``spec`` permits: shared through Redis when
        ``redis_url`` is given (its ``namespace=`` names the limit), else
        this replica's own."""
        rate, per = parse_rate(spec)
        if redis_url is None:
            return RateLimiter(rate, per, burst=burst, clock=self.clock)
        from conveyor._redis import RedisConfig
        from conveyor._redis import client as redis_client
        from conveyor.resilience.redis_limiter import RedisRateLimiter

        config = RedisConfig(redis_url)
        return RedisRateLimiter(
            redis_client(config),
            f"{name}:{config.namespace}",
            rate,
            per,
            burst=burst,
            clock=self.clock,
        )

    async def connect(self) -> None:
        """Connect the App (its store creates the job tables) and the key table."""
        if not self._connected:
            await self.app.connect()
            await self.jobs.store.connect(self.app)
            await self.keys.ensure()
            if self.jobs.webhooks is not None:
                async with self.app.transaction() as session:
                    await self.jobs.webhooks.create_tables(session)
            self._connected = True

    async def __aenter__(self) -> JobAPI:
        await self.connect()
        self._stopping = asyncio.Event()
        self._background = asyncio.create_task(self._maintain(self._stopping))
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._background = self._background, None
        if task is None:
            return
        # Ask the loop to stop between rounds rather than cancel it inside a
        # Redis call: redis-py can swallow a cancellation there, which would
        # leave the task running and the server's shutdown waiting forever.
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=5.0)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def _maintain(self, stopping: asyncio.Event) -> None:
        """Relay a Redis job store's outbox and prune expired records."""
        store = self.jobs.store
        last_prune = -math.inf
        while not stopping.is_set():
            moved = 0
            try:
                moved = await store.relay()
                if self.clock.monotonic() - last_prune >= self.prune_every:
                    last_prune = self.clock.monotonic()
                    pruned = await store.prune()
                    if pruned:
                        log.debug("pruned %d expired job record(s)", pruned)
            except Exception:
                log.exception("job store upkeep failed", extra={"event": "conveyor.jobs_upkeep"})
            if not moved:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 0.05)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        async with self:
            yield
        await self.app.close()

    async def _owner(self, request: Request) -> str:
        """The API key's name, "" when keys are off; 401 otherwise."""
        await self.connect()
        auth = request.headers.get("authorization", "")
        secret = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        secret = secret or request.headers.get("x-api-key")
        if secret:
            key = await self.keys.authenticate(secret)
            if key is not None and not key.allows("jobs"):
                raise _Problem(403, f"API key {key.name!r} has no 'jobs' scope")
            if key is not None:
                return key.name
            await self._unauthenticated(request, "unknown API key")
        required = self.require_api_key
        if required is None:
            required = await self.keys.any()
        if required:
            await self._unauthenticated(
                request,
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'",
            )
        return ""

    async def _unauthenticated(self, request: Request, detail: str) -> NoReturn:
        """401, or 429 once the client's address is past the limit of
        requests without a valid key (guessing keys, or a client that never
        sends one, costs it its budget, not the server's)."""
        if self._anonymous is not None:
            address = request.client.host if request.client is not None else "-"
            try:
                await self._anonymous.acquire(key=address, timeout=0)
            except RateLimited as exc:
                wait = max(1, math.ceil(exc.retry_after))
                raise _Problem(
                    429,
                    "too many requests without a valid API key from this address; "
                    f"retry in {wait}s",
                    headers={"Retry-After": str(wait)},
                ) from None
        raise _Problem(401, detail, headers={"WWW-Authenticate": "Bearer"})

    async def _limit(self, owner: str) -> None:
        if self._limiter is None:
            return
        try:
            await self._limiter.acquire(key=owner or "-", timeout=0)
        except RateLimited as exc:
            wait = max(1, math.ceil(exc.retry_after))
            assert self._policy is not None
            raise _Problem(
                429,
                f"rate limit of this API key exceeded; retry in {wait}s",
                headers={
                    "Retry-After": str(wait),
                    "RateLimit-Policy": self._policy,
                    "RateLimit": f'"default";r=0;t={wait}',
                },
            ) from None

    async def _shed(self, kind: JobKind) -> None:
        threshold = kind.shed_above if kind.shed_above is not None else self.shed_above
        if threshold is None:
            return
        shedder = self._shedders.get(kind.name)
        if shedder is None:
            broker = self.app.broker

            async def depth(topic: str) -> int:
                return max(
                    (q.ready + q.delayed for q in await broker.stats() if q.topic == topic),
                    default=0,
                )

            shedder = self._shedders[kind.name] = LoadShedder(threshold, depth, clock=self.clock)
        try:
            await shedder.check(kind.topic)
        except Overloaded as exc:
            wait = max(1, math.ceil(exc.retry_after))
            raise _Problem(
                503,
                f"job kind {kind.name!r} has too much work waiting; retry in {wait}s",
                headers={"Retry-After": str(wait)},
            ) from None

    def _build(self, title: str) -> FastAPI:
        api = problem_api(title, lifespan=self._lifespan, retry_after=self.retry_after)

        async def authorized(request: Request) -> str:
            owner = await self._owner(request)
            await self._limit(owner)
            return owner

        errors: dict[int | str, dict[str, Any]] = {
            code: {"model": Problem} for code in (401, 404, 409, 413, 422, 429, 503)
        }
        for kind in self.jobs.kinds.values():
            self._routes(api, kind, authorized, errors)
        if self.jobs.webhooks is not None:
            self._webhook_routes(api, authorized)

        if self.metrics is not None:
            from prometheus_client import CONTENT_TYPE_LATEST

            metrics = self.metrics

            @api.get("/metrics", tags=["health"], response_class=Response)
            async def metrics_text() -> Response:
                """Prometheus' text format (see docs/observability.md)."""
                try:
                    async with asyncio.timeout(5):
                        await metrics.refresh()
                except Exception as exc:
                    log.warning(
                        "metrics: reading the queues failed: %s",
                        redact(f"{type(exc).__name__}: {exc}"),
                        extra={"event": "conveyor.metrics_refresh_failed"},
                    )
                return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

        @api.get("/healthz", tags=["health"])
        async def healthz() -> dict[str, str]:
            """Always 200 while the process serves requests."""
            return {"status": "ok"}

        @api.get("/readyz", tags=["health"], responses={503: {"model": Problem}})
        async def readyz() -> dict[str, str]:
            """200 when the broker, the store and the job store answer, else 503."""
            checks: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
                ("connecting to the broker and stores", self.connect),
                ("the store", lambda: read_rows(self.app.store, "SELECT 1")),
                ("the broker", self.app.broker.stats),
                ("the job store", self.jobs.store.ping),
            )
            for what, check in checks:
                try:
                    async with asyncio.timeout(5):
                        await check()
                except Exception as exc:
                    # The reason (URLs, hosts) goes to the log, not to the caller.
                    log.warning(
                        "not ready: %s failed: %s",
                        what,
                        redact(f"{type(exc).__name__}: {exc}"),
                        extra={"event": "conveyor.http_not_ready"},
                    )
                    raise _Problem(
                        503,
                        f"not ready: {what} failed ({type(exc).__name__})",
                        headers={"Retry-After": str(self.retry_after)},
                    ) from None
            return {"status": "ready"}

        return api

    def _routes(
        self,
        api: FastAPI,
        kind: JobKind,
        authorized: Callable[[Request], Awaitable[str]],
        errors: dict[int | str, dict[str, Any]],
    ) -> None:
        jobs, store = self.jobs, self.jobs.store
        name = kind.name

        async def submit(
            request: Request,
            body: pydantic.BaseModel,
            owner: str = Depends(authorized),
            idempotency_key: str | None = Header(default=None, max_length=255, pattern=_PRINTABLE),
            callback_url: str | None = Header(default=None, max_length=2000, pattern=_PRINTABLE),
        ) -> Response:
            await self._shed(kind)
            raw = await request.body()
            data = json.loads(raw)  # FastAPI parsed it already: this does not fail
            refused = body_problem(raw, data)
            if refused is not None:
                raise _Problem(
                    422,
                    f"invalid request: {refused}",
                    errors=[{"loc": ["body"], "msg": refused}],
                )
            if callback_url is not None:
                await self._check_callback(owner, callback_url)
            if idempotency_key is not None:
                fp = fingerprint(name, raw)
                seen = await self._claim(owner, idempotency_key, fp)
                if seen is not None:
                    return self._replay(seen.fingerprint == fp, seen.response)
            record = jobs.new_record(name, owner=owner, callback_url=callback_url)
            status_url = f"/jobs/{name}/{record.id}"
            content = json.dumps(
                {"id": record.id, "kind": name, "status": PENDING, "status_url": status_url},
                separators=(",", ":"),
            ).encode()
            headers = {"Location": status_url, "Retry-After": str(self.retry_after)}
            response = StoredResponse(status=202, headers=headers, body=content)
            try:
                await store.accept(
                    record,
                    topic=kind.topic,
                    payload={"id": record.id, "kind": name, "body": data},
                    idempotency=(
                        None
                        if idempotency_key is None
                        else (idempotency_key, response, self.idempotency_keep)
                    ),
                )
            except BaseException:
                if idempotency_key is not None:
                    with contextlib.suppress(Exception):
                        await store.release_idempotent(owner, idempotency_key)
                raise
            if self.app.observers:
                self.app.observers.job_accepted(name)
            return Response(content, 202, headers=headers, media_type="application/json")

        _annotate(submit, "body", kind.model)
        api.add_api_route(
            f"/jobs/{name}",
            submit,
            methods=["POST"],
            status_code=202,
            response_model=Accepted,
            responses=errors,
            summary=kind.summary or f"Submit a {name} job",
            tags=["jobs"],
            operation_id=f"submit_{name}",
        )

        async def status(
            job_id: str, response: Response, owner: str = Depends(authorized)
        ) -> dict[str, object]:
            record = await store.get(job_id)
            if record is None or record.kind != name or record.owner != owner:
                raise _Problem(404, f"no {name} job {job_id!r} (unknown, or its result expired)")
            if not record.finished:
                response.headers["Retry-After"] = str(self.retry_after)
            return record.status_body()

        api.add_api_route(
            f"/jobs/{name}/{{job_id}}",
            status,
            methods=["GET"],
            response_model=JobStatus,
            responses=errors,
            summary=f"Status and result of a {name} job",
            tags=["jobs"],
            operation_id=f"status_{name}",
        )

        async def cancel(job_id: str, owner: str = Depends(authorized)) -> Response:
            record = await store.get(job_id)
            if record is None or record.kind != name or record.owner != owner:
                raise _Problem(404, f"no {name} job {job_id!r} (unknown, or its result expired)")
            if not record.finished:
                record = await store.cancel(job_id, ttl=kind.ttl)
                if record is None:
                    raise _Problem(404, f"no {name} job {job_id!r}")
            if record.status != CANCELLED:
                raise _Problem(409, f"job {job_id!r} already finished ({record.status})")
            return JSONResponse(record.status_body(), 202)

        api.add_api_route(
            f"/jobs/{name}/{{job_id}}",
            cancel,
            methods=["DELETE"],
            status_code=202,
            response_model=JobStatus,
            responses=errors,
            summary=f"Cancel a {name} job",
            tags=["jobs"],
            operation_id=f"cancel_{name}",
        )

    async def _claim(self, owner: str, key: str, fp: str) -> IdempotencyRecord | None:
        """Claim ``key`` (None: this request creates the job), or the record
        of the request that holds it. While that one, with the same body,
        is still creating its job, wait for its response (a concurrent
        duplicate then gets the same answer), up to ``idempotency_wait``."""
        store = self.jobs.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.idempotency_wait
        pause = 0.005
        while True:
            seen = await store.begin_idempotent(
                owner, key, fp, lease=self.idempotency_lease, keep=self.idempotency_keep
            )
            if seen is None or seen.response is not None or seen.fingerprint != fp:
                return seen
            left = deadline - loop.time()
            if left <= 0:
                return seen
            # The original commits its job and response together, in one
            # short transaction: poll for it, briefly and more slowly.
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)

    def _replay(self, same_body: bool, response: StoredResponse | None) -> Response:
        if not same_body:
            raise _Problem(
                422,
                "this Idempotency-Key was used with a different request body; "
                "use a new key for a new request",
            )
        if response is None:
            raise _Problem(
                409,
                "the original request with this Idempotency-Key is still being processed; "
                "retry shortly",
                headers={"Retry-After": "1"},
            )
        return Response(
            response.body,
            response.status,
            headers=dict(response.headers),
            media_type="application/json",
        )

    async def _check_callback(self, owner: str, url: str) -> None:
        webhooks = self.jobs.webhooks
        if webhooks is None:
            raise _Problem(422, "this server has no webhooks; drop the Callback-Url header")
        async with self.app.transaction() as session:
            endpoint = await webhooks.endpoint_for(session, owner=owner, url=url)
        if endpoint is None or not endpoint.enabled:
            raise _Problem(
                422,
                f"Callback-Url {url!r} is not a registered, enabled webhook endpoint of "
                "this API key; register it with POST /webhooks first",
                errors=[{"loc": ["header", "Callback-Url"], "msg": "not a registered endpoint"}],
            )

    def _webhook_routes(
        self, api: FastAPI, authorized: Callable[[Request], Awaitable[str]]
    ) -> None:
        webhooks = self.jobs.webhooks
        assert webhooks is not None
        errors: dict[int | str, dict[str, Any]] = {
            code: {"model": Problem} for code in (401, 404, 422, 429)
        }

        @api.post(
            "/webhooks",
            status_code=201,
            response_model=EndpointOut,
            responses=errors,
            tags=["webhooks"],
        )
        async def register(body: EndpointIn, owner: str = Depends(authorized)) -> EndpointOut:
            """Register a callback URL; the answer holds its signing secret."""
            url = await webhooks.check(body.url)  # DNS, outside any transaction
            async with self.app.transaction() as session:
                endpoint = await webhooks.register(session, owner=owner, url=url)
            return EndpointOut(id=endpoint.id, url=endpoint.url, secret=endpoint.secret)

        @api.get(
            "/webhooks", response_model=list[EndpointInfo], responses=errors, tags=["webhooks"]
        )
        async def listing(owner: str = Depends(authorized)) -> list[EndpointInfo]:
            """This API key's webhook endpoints (secrets not shown)."""
            async with self.app.transaction() as session:
                found = await webhooks.endpoints(session, owner=owner)
            return [EndpointInfo(id=e.id, url=e.url, enabled=e.enabled) for e in found]

        @api.post(
            "/webhooks/{endpoint_id}/rotate",
            response_model=EndpointOut,
            responses=errors,
            tags=["webhooks"],
        )
        async def rotate(endpoint_id: str, owner: str = Depends(authorized)) -> EndpointOut:
            """A new signing secret; the old one keeps signing for a grace period."""
            async with self.app.transaction() as session:
                endpoint = await webhooks.rotate(session, owner=owner, endpoint_id=endpoint_id)
            return EndpointOut(id=endpoint.id, url=endpoint.url, secret=endpoint.secret)

        @api.delete("/webhooks/{endpoint_id}", status_code=204, responses=errors, tags=["webhooks"])
        async def remove(endpoint_id: str, owner: str = Depends(authorized)) -> Response:
            """Delete an endpoint."""
            async with self.app.transaction() as session:
                removed = await webhooks.remove(session, owner=owner, endpoint_id=endpoint_id)
            if not removed:
                raise _Problem(404, f"no webhook endpoint {endpoint_id!r}")
            return Response(status_code=204)


def problem_api(
    title: str,
    *,
    lifespan: Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]] | None = None,
    retry_after: int = 1,
) -> FastAPI:
    """A FastAPI app whose every error is an RFC 9457 problem body (also in
    its OpenAPI schema): unknown routes and methods, invalid requests (422
    with the fields), ``ConfigError``/``WebhookError`` (422),
    ``UnknownEndpoint`` (404), ``PayloadTooLarge`` (413), any other
    ``ConveyorError`` (503 with ``Retry-After``, naming only the error's
    kind), any other exception (500), and a path with a control character
    (404). The job API is built on it; so can your own routes."""
    api = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        errors = exc.errors if isinstance(exc, _Problem) else None
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and not isinstance(exc, _Problem):
            detail = f"no route {request.url.path!r}; see /openapi.json"
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and not isinstance(exc, _Problem):
            detail = f"{request.method} is not allowed on {request.url.path!r}"
            headers["Allow"] = _allowed(request)
        return problem_response(exc.status_code, detail, headers=headers, errors=errors)

    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errors: list[dict[str, object]] = [
            {"loc": [p for p in e.get("loc", ()) if isinstance(p, str | int)], "msg": e["msg"]}
            for e in exc.errors()
        ]
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)  # type: ignore[attr-defined]
        return problem_response(422, f"invalid request: {fields}", errors=errors)

    async def on_conveyor_error(request: Request, exc: ConveyorError) -> Response:
        if isinstance(exc, UnknownEndpoint):
            return problem_response(404, str(exc))
        if isinstance(exc, PayloadTooLarge):
            # What the request asked to queue is over the message size limit.
            return problem_response(413, f"the request is too large to queue: {exc}")
        if isinstance(exc, ConfigError | WebhookError):
            return problem_response(422, str(exc))
        log.error(
            "%s %s failed: %s",
            request.method,
            request.url.path,
            redact(repr(exc)),
            extra={"event": "conveyor.http_error"},
        )
        # What failed, for the caller; the message (URLs, hosts) only in the log.
        return problem_response(
            503,
            f"a dependency failed ({type(exc).__name__}); retry later",
            headers={"Retry-After": str(retry_after)},
        )

    async def on_crash(request: Request, exc: Exception) -> Response:
        # Logged with its traceback by the server; the caller learns nothing of it.
        return problem_response(500, "the server failed to answer this request")

    api.add_exception_handler(HTTPException, on_http_error)  # type: ignore[arg-type]
    api.add_exception_handler(RequestValidationError, on_invalid)  # type: ignore[arg-type]
    api.add_exception_handler(ConveyorError, on_conveyor_error)  # type: ignore[arg-type]
    api.add_exception_handler(Exception, on_crash)
    api.add_middleware(_PathGuard)
    original = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _problem_schemas(original())
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def _allowed(request: Request) -> str:
    """Every method of the request's path: Starlette's 405 names only those
    of the first route on the path, and GET and DELETE are two routes."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def _annotate(func: Callable[..., object], param: str, annotation: object) -> None:
    """Give ``func``'s ``param`` a run-time annotation (the kind's model), so
    FastAPI validates the body with it and documents it."""
    sig = inspect.signature(func)
    params = []
    for p in sig.parameters.values():
        if p.name == param:
            p = p.replace(annotation=annotation)
        elif isinstance(p.annotation, str):
            p = p.replace(annotation=eval(p.annotation, globals()))
        params.append(p)
    func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]


def _problem_schemas(schema: dict[str, Any]) -> dict[str, Any]:
    """Every 4xx/5xx response is a problem body: document it as such."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema()
    validation = ValidationProblem.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(validation.pop("$defs", {}))
    components["ValidationProblem"] = validation
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            for code in list(responses):
                if not code.isdigit() or int(code) < 400:
                    continue
                ref = "ValidationProblem" if code == "422" else "Problem"
                responses[code] = {
                    "description": responses[code].get("description") or _TITLES.get(int(code)),
                    "content": {PROBLEM: {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
                }
    return schema
