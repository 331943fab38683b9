"""The admin API of the operations console: ``AdminAPI(console)``.

``admin.router`` is a FastAPI ``APIRouter`` (prefix ``/admin``) to mount
into any app built on ``problem_api``, such as a ``JobAPI``
(``api.asgi.include_router(admin.router)``); ``admin`` itself is an ASGI
app serving the router alone. Every error is a problem body. GETs need an
API key with ``admin:read`` (or ``admin:write``), writes one with
``admin:write``: 401 without a key, 403 with a key lacking the scope. While
no key exists at all, ``require_api_key=None`` (the default) lets requests
through, as the job API does; every write is audited with the key's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request

from conveyor.errors import ConfigError
from conveyor.http._app import Problem, Receive, Scope, Send, _Problem, problem_api
from conveyor.http._console import (
    ActionResult,
    AuditPage,
    BreakerOut,
    Console,
    DeadGroupOut,
    DeadLetterDetail,
    DeadLetterPage,
    JobOut,
    JobPage,
    Missing,
    QueueOut,
    SagaPage,
    SagaTimeline,
    Selection,
    Story,
    WorkerOut,
)
from conveyor.http._keys import ADMIN_READ, ADMIN_WRITE, ApiKeys
from conveyor.sagas import STATES
from conveyor.store._protocol import DeadLetterFilter

__all__ = ["AdminAPI"]

ANONYMOUS = "anonymous"


def dead_filter(
    topic: Annotated[str | None, Query(max_length=500)] = None,
    group: Annotated[str | None, Query(max_length=500)] = None,
    error_type: Annotated[str | None, Query(max_length=500)] = None,
    reason: Annotated[str | None, Query(max_length=500)] = None,
    since: Seconds = None,
    before: Seconds = None,
) -> DeadLetterFilter:
    return DeadLetterFilter(
        topic=topic,
        group=group,
        error_type=error_type,
        reason_contains=reason,
        dead_since=since,
        dead_before=before,
    )


Filter = Annotated[DeadLetterFilter, Depends(dead_filter)]
Limit = Annotated[int, Query(ge=1, le=500)]
DeadId = Annotated[int, Path(ge=0, le=2**62)]
Seconds = Annotated[float | None, Query(ge=0, le=1e12)]


class AdminAPI:
    """The console's HTTP API over ``console`` (see the module doc).

    ``keys``: the API keys (default ``ApiKeys(console.app)``);
    ``require_api_key``: True / False, or None to require one once any exists.
    """

    def __init__(
        self,
        console: Console,
        *,
        keys: ApiKeys | None = None,
        require_api_key: bool | None = None,
        prefix: str = "/admin",
        title: str = "Conveyor admin",
    ) -> None:
        self.console = console
        self.keys = keys or ApiKeys(console.app, clock=console.clock)
        self.require_api_key = require_api_key
        self.router = APIRouter(prefix=prefix, tags=["admin"])
        self._routes()
        self.asgi = problem_api(title, lifespan=self._lifespan)
        self.asgi.include_router(self.router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.console.connect()
        yield
        await self.console.app.close()

    async def actor(self, secret: str | None, scope: str) -> str:
        """The name of the key ``secret`` if it may do ``scope`` (401 / 403
        problems otherwise); "anonymous" while keys are not required."""
        await self.console.connect()
        await self.keys.ensure()
        if secret:
            key = await self.keys.authenticate(secret)
            if key is None:
                raise _Problem(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
            if not key.allows(scope):
                raise _Problem(403, f"API key {key.name!r} has no {scope!r} scope")
            return key.name
        required = self.require_api_key
        if required is None:
            required = await self.keys.any()
        if required:
            raise _Problem(
                401,
                f"an API key with the {scope!r} scope is required: send "
                "'Authorization: Bearer <key>' or 'X-API-Key'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return ANONYMOUS

    def _guard(self, scope: str) -> Callable[[Request], Awaitable[str]]:
        async def check(request: Request) -> str:
            auth = request.headers.get("authorization", "")
            secret = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            return await self.actor(secret or request.headers.get("x-api-key"), scope)

        return check

    def _routes(self) -> None:
        console, r = self.console, self.router
        reader = Depends(self._guard(ADMIN_READ))
        writer = Depends(self._guard(ADMIN_WRITE))
        errors: dict[int | str, dict[str, Any]] = {
            code: {"model": Problem} for code in (401, 403, 422, 503)
        }
        found: dict[int | str, dict[str, Any]] = {**errors, 404: {"model": Problem}}
        actions: dict[int | str, dict[str, Any]] = {**found, 400: {"model": Problem}}

        @r.get("/queues", response_model=list[QueueOut], responses=errors)
        async def queues(actor: str = reader) -> list[QueueOut]:
            """Per topic and group: ready, in flight, delayed, dead, oldest
            age, processed and failed per minute, live consumers, open breakers."""
            return await console.queues()

        @r.get("/workers", response_model=list[WorkerOut], responses=errors)
        async def workers(
            include_stale: Annotated[bool, Query(alias="all")] = False, actor: str = reader
        ) -> list[WorkerOut]:
            """Workers from their heartbeats (live ones; all=true: stale too)."""
            return await console.workers(include_stale=include_stale)

        @r.get("/breakers", response_model=list[BreakerOut], responses=errors)
        async def breakers(actor: str = reader) -> list[BreakerOut]:
            """The app's circuit breakers: state, counts, when an open one probes."""
            return await console.breakers()

        @r.get("/dead-letters", response_model=DeadLetterPage, responses=errors)
        async def dead_letters(
            where: Filter,
            limit: Limit = 50,
            after: Annotated[int, Query(ge=0, le=2**62)] = 0,
            actor: str = reader,
        ) -> DeadLetterPage:
            """Dead letters oldest first, filtered; page on with after=<next>."""
            return await console.dead_letters(where, limit=limit, after=after)

        @r.get("/dead-letters/groups", response_model=list[DeadGroupOut], responses=errors)
        async def dead_groups(where: Filter, actor: str = reader) -> list[DeadGroupOut]:
            """Dead letters grouped by topic, group, error type and the frame
            that raised, largest group first (the reason filter is not used)."""
            return await console.dead_groups(where)

        @r.get("/dead-letters/{dead_id}", response_model=DeadLetterDetail, responses=found)
        async def dead_letter(dead_id: int, actor: str = reader) -> DeadLetterDetail:
            """One dead letter: payload, headers, error, traceback, attempts."""
            item = await console.dead_letter(dead_id)
            if item is None:
                raise _Problem(404, f"no dead letter {dead_id}")
            return item

        async def act(kind: str, selection: Selection, actor: str) -> ActionResult:
            try:
                if kind == "replay":
                    return await console.replay(selection, actor=actor)
                return await console.purge(selection, actor=actor)
            except Missing as exc:
                raise _Problem(404, str(exc)) from None

        @r.post("/dead-letters/replay", response_model=ActionResult, responses=actions)
        async def replay(selection: Selection, actor: str = writer) -> ActionResult:
            """Send the selected dead letters back through their group's inbox
            (nothing already applied is applied again); bounded; audited."""
            return await act("replay", selection, actor)

        @r.post("/dead-letters/{dead_id}/replay", response_model=ActionResult, responses=actions)
        async def replay_one(dead_id: DeadId, actor: str = writer) -> ActionResult:
            """Replay one dead letter."""
            if await console.dead_letter(dead_id) is None:
                raise _Problem(404, f"no dead letter {dead_id}")
            return await act("replay", Selection(ids=[dead_id]), actor)

        @r.post("/dead-letters/purge", response_model=ActionResult, responses=actions)
        async def purge(
            selection: Selection,
            confirm: Annotated[bool, Query(description="Must be true: a purge is final")] = False,
            actor: str = writer,
        ) -> ActionResult:
            """Delete the selected dead letters for good (confirm=true); bounded; audited."""
            if not confirm:
                raise _Problem(400, "a purge deletes dead letters for good: send confirm=true")
            return await act("purge", selection, actor)

        @r.get("/sagas", response_model=SagaPage, responses=errors)
        async def sagas(
            state: Annotated[list[str] | None, Query()] = None,
            name: Annotated[str | None, Query(max_length=200)] = None,
            older_than: Seconds = None,
            stuck: bool = False,
            limit: Limit = 50,
            after: Annotated[str | None, Query(max_length=200)] = None,
            actor: str = reader,
        ) -> SagaPage:
            """Sagas newest first: by state, name, age (older_than seconds),
            stuck (active past their step's deadline); page on with after=<next>."""
            states = [s.strip().upper() for s in state or []]
            unknown = [s for s in states if s not in STATES]
            if unknown:
                raise ConfigError(f"unknown saga state {unknown[0]!r}; use {', '.join(STATES)}")
            return await console.sagas(
                states=states,
                name=name,
                older_than=older_than,
                stuck=stuck,
                limit=limit,
                after=after,
            )

        @r.get("/sagas/{saga_id}", response_model=SagaTimeline, responses=found)
        async def saga(saga_id: str, actor: str = reader) -> SagaTimeline:
            """One saga: state, current step and the command it waits on, its timeline."""
            item = await console.saga(saga_id)
            if item is None:
                raise _Problem(404, f"no saga {saga_id!r}")
            return item

        @r.get("/jobs", response_model=JobPage, responses=errors)
        async def jobs(
            status: Annotated[str | None, Query(max_length=20)] = None,
            kind: Annotated[str | None, Query(max_length=200)] = None,
            limit: Limit = 50,
            after: Annotated[str | None, Query(max_length=200)] = None,
            actor: str = reader,
        ) -> JobPage:
            """HTTP jobs newest first, by status and kind."""
            return await console.job_list(status=status, kind=kind, limit=limit, after=after)

        @r.get("/jobs/{job_id}", response_model=JobOut, responses=found)
        async def job(job_id: str, actor: str = reader) -> JobOut:
            """One job."""
            item = await console.job(job_id)
            if item is None:
                raise _Problem(404, f"no job {job_id!r} (unknown, or its record expired)")
            return item

        @r.get("/search", response_model=Story, responses=errors)
        async def search(
            q: Annotated[str, Query(min_length=1, max_length=500)], actor: str = reader
        ) -> Story:
            """The story of any id (message, correlation, saga, job,
            idempotency key, trace, dead-letter number or business key)."""
            return await console.search(q)

        @r.get("/audit", response_model=AuditPage, responses=errors)
        async def audit(
            limit: Limit = 50,
            before: Annotated[str | None, Query(max_length=64)] = None,
            actor_name: Annotated[str | None, Query(alias="actor", max_length=200)] = None,
            action: Annotated[str | None, Query(max_length=100)] = None,
            actor: str = reader,
        ) -> AuditPage:
            """Admin actions newest first; page on with before=<next>."""
            return await console.audit(limit=limit, before=before, actor=actor_name, action=action)
