"""The console's web pages: ``Dashboard(admin)``.

Server-rendered HTML (no template engine, no front-end framework): an
overview of queues (with a sparkline of what each handled per minute), dead
letters per group, workers, breakers and sagas by state; the dead-letter
workbench (groups, drill into one, replay or purge a group after a confirm
page); sagas with a timeline chart; the story of any id behind the search box
on every page; the audit log. Parts marked live are refreshed in place every
two seconds by a few lines of JavaScript served from the package
(``console_static/``) — nothing is fetched from elsewhere.

``dashboard.router`` (prefix ``/console``) mounts into any FastAPI app;
``dashboard.asgi`` serves it with the admin API. Pages need a key with
``admin:read``, actions one with ``admin:write``: a browser signs in once on
``/console/login`` (the key goes into an HttpOnly, SameSite=Strict cookie);
while no key exists and none is required, pages open without one.
"""

from __future__ import annotations

import contextlib
import html
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from importlib import resources
from typing import Annotated
from urllib.parse import parse_qsl, urlencode

import pydantic
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from conveyor.http._admin import AdminAPI
from conveyor.http._app import Receive, Scope, Send, _Problem, problem_api
from conveyor.http._console import (
    DeadGroupOut,
    Missing,
    SagaTimeline,
    Selection,
    Story,
    selection_of,
)
from conveyor.http._keys import ADMIN_READ, ADMIN_WRITE
from conveyor.sagas import STATES
from conveyor.store._protocol import DeadLetterFilter

__all__ = ["Dashboard"]

COOKIE = "conveyor_console"
_STATIC = {"console.js": "text/javascript", "console.css": "text/css"}


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return ""
    s = max(0.0, now - at)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def _when(at: float | None) -> str:
    return "" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, empty: str, id: str = ""
) -> str:
    """A table of already-escaped cells; a number-looking header is right-aligned."""
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    ident = f' id="{_e(id)}"' if id else ""
    if not body:
        return f'<p class="empty"{ident}>{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: object, *, cls: str = "", raw: bool = False) -> str:
    text = str(value) if raw else _e(value)
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _n(value: int | float, *, bad: bool = False) -> str:
    return _td(f"{value:,}" if isinstance(value, int) else value, cls="n bad" if bad else "n")


def _spark(points: Sequence[int]) -> str:
    """An inline SVG line of ``points`` (messages per minute)."""
    if not points:
        return ""
    top = max(max(points), 1)
    width, height = 90, 18
    step = width / max(len(points) - 1, 1)
    line = " ".join(
        f"{i * step:.1f},{height - 1 - (p / top) * (height - 2):.1f}" for i, p in enumerate(points)
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" role="img" '
        f'aria-label="handled per minute, last {len(points)} min: {sum(points)}">'
        f'<polyline fill="none" stroke="#1d5fa8" stroke-width="1.5" points="{line}"/></svg>'
    )


class Dashboard:
    """The console's pages over ``admin`` (its console and keys); see the
    module doc. ``refresh``: milliseconds between live updates."""

    def __init__(self, admin: AdminAPI, *, prefix: str = "/console", refresh: int = 2000) -> None:
        self.admin = admin
        self.console = admin.console
        self.prefix = prefix.rstrip("/")
        self.refresh = refresh
        self.router = APIRouter(prefix=self.prefix, include_in_schema=False)
        self._routes()
        self.asgi = problem_api("Conveyor console", lifespan=self._lifespan)
        self.asgi.include_router(admin.router)
        self.asgi.include_router(self.router)

        @self.asgi.get("/", include_in_schema=False)
        async def root() -> Response:
            return RedirectResponse(f"{self.prefix}/", 307)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.console.connect()
        yield
        await self.console.app.close()

    def _url(self, path: str, **query: object) -> str:
        q = {k: v for k, v in query.items() if v not in (None, "", False)}
        return f"{self.prefix}{path}" + (f"?{urlencode(q, doseq=True)}" if q else "")

    async def _actor(self, request: Request, scope: str) -> str:
        auth = request.headers.get("authorization", "")
        secret = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        secret = secret or request.headers.get("x-api-key") or request.cookies.get(COOKIE)
        return await self.admin.actor(secret, scope)

    def _page(self, title: str, body: str, *, here: str, query: str = "") -> HTMLResponse:
        nav = "".join(
            f'<a href="{self._url(path)}"{" class=here" if name == here else ""}>{name}</a>'
            for name, path in (
                ("Overview", "/"),
                ("Dead letters", "/dead-letters"),
                ("Sagas", "/sagas"),
                ("Audit", "/audit"),
            )
        )
        search = (
            f'<form method="get" action="{self._url("/search")}" role="search">'
            f'<input type="search" name="q" value="{_e(query)}" '
            'placeholder="order, message, correlation, saga, job id or key" aria-label="Search">'
            "<button>Find</button></form>"
        )
        page = (
            f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)} · Conveyor</title>"
            f'<link rel="stylesheet" href="{self._url("/static/console.css")}">'
            f'<script defer src="{self._url("/static/console.js")}"></script></head>'
            f'<body data-refresh="{self.refresh}"><header><strong>Conveyor</strong>{nav}{search}'
            f"</header><main><h1>{_e(title)}</h1>{body}</main></body></html>"
        )
        return HTMLResponse(page)

    def _routes(self) -> None:
        r, console = self.router, self.console

        @r.get("/static/{name}")
        async def static(name: str) -> Response:
            if name not in _STATIC:
                raise _Problem(404, f"no console file {name!r}")
            data = resources.files("conveyor.http").joinpath("console_static", name).read_bytes()
            return Response(
                data, media_type=_STATIC[name], headers={"Cache-Control": "max-age=300"}
            )

        @r.get("/login")
        async def login_form(error: str = "") -> HTMLResponse:
            message = f'<p class="bad">{_e(error)}</p>' if error else ""
            return self._page(
                "Sign in",
                f'{message}<form method="post" action="{self._url("/login")}">'
                '<label>API key with an admin scope <input type="password" name="key" '
                'autocomplete="off" size="60"></label> <button>Sign in</button></form>',
                here="",
            )

        @r.post("/login")
        async def login(request: Request) -> Response:
            key = (await _form(request)).get("key", "")
            try:
                await self.admin.actor(key, ADMIN_READ)
            except _Problem as exc:
                return RedirectResponse(self._url("/login", error=exc.detail), 303)
            done = RedirectResponse(self._url("/"), 303)
            done.set_cookie(COOKIE, key, httponly=True, samesite="strict", path=self.prefix)
            return done

        async def reader(request: Request) -> str | Response:
            try:
                return await self._actor(request, ADMIN_READ)
            except _Problem as exc:
                if exc.status_code == 401:
                    return RedirectResponse(self._url("/login"), 303)
                raise

        @r.get("/")
        async def overview(request: Request) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            return self._page("Overview", await self._overview(), here="Overview")

        @r.get("/dead-letters")
        async def workbench(
            request: Request,
            topic: Annotated[str | None, Query(max_length=500)] = None,
            group: Annotated[str | None, Query(max_length=500)] = None,
            error_type: Annotated[str | None, Query(max_length=500)] = None,
            after: Annotated[int, Query(ge=0)] = 0,
            done: Annotated[str | None, Query(max_length=300)] = None,
        ) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            where = DeadLetterFilter(topic=topic, group=group, error_type=error_type)
            return self._page(
                "Dead letters",
                await self._workbench(where, after, done),
                here="Dead letters",
            )

        @r.get("/dead-letters/confirm")
        async def confirm(
            request: Request,
            action: Annotated[str, Query(pattern="^(replay|purge)$")],
            dead_group: Annotated[str, Query(max_length=64)],
        ) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            match = next((g for g in await console.dead_groups() if g.id == dead_group), None)
            if match is None:
                return RedirectResponse(
                    self._url("/dead-letters", done="that group is empty now"), 303
                )
            verb = "Replay" if action == "replay" else "Purge"
            effect = (
                "They go back to their consumer group through its inbox: a message it already "
                "applied is skipped."
                if action == "replay"
                else "They are deleted for good."
            )
            body = (
                f"<p>{verb} <strong>{match.count:,}</strong> dead letter(s) of "
                f"<code>{_e(match.topic)}</code> / <code>{_e(match.group)}</code>, "
                f"<code>{_e(match.error_type)}</code> at <code>{_e(match.frame)}</code>? "
                f"{effect}</p>"
                f'<form method="post" action="{self._url("/dead-letters/" + action)}">'
                f'<input type="hidden" name="dead_group" value="{_e(dead_group)}">'
                f'<button class="danger" id="confirm">{verb} {match.count:,}</button> '
                f'<a href="{self._url("/dead-letters")}">Cancel</a></form>'
            )
            return self._page(f"{verb} a group?", body, here="Dead letters")

        @r.post("/dead-letters/{action}")
        async def act(request: Request, action: str) -> Response:
            if action not in ("replay", "purge"):
                raise _Problem(404, f"no action {action!r}")
            try:
                actor = await self._actor(request, ADMIN_WRITE)
            except _Problem as exc:
                if exc.status_code == 401:
                    return RedirectResponse(self._url("/login"), 303)
                raise
            form = await _form(request)
            try:
                selection: Selection = selection_of(form)
            except pydantic.ValidationError as exc:
                raise _Problem(422, f"invalid selection: {exc.errors()[0]['msg']}") from None
            try:
                result = (
                    await console.replay(selection, actor=actor)
                    if action == "replay"
                    else await console.purge(selection, actor=actor)
                )
            except Missing as exc:
                return RedirectResponse(self._url("/dead-letters", done=str(exc)), 303)
            verb = "replayed" if action == "replay" else "purged"
            return RedirectResponse(
                self._url("/dead-letters", done=f"{verb} {result.affected} dead letter(s)"), 303
            )

        @r.get("/dead-letters/{dead_id}")
        async def dead_letter(request: Request, dead_id: int) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            d = await console.dead_letter(dead_id)
            if d is None:
                raise _Problem(404, f"no dead letter {dead_id}")
            history = _table(
                ["at", "event", "group", "attempt", "error"],
                (
                    [
                        _td(_when(h.at)),
                        _td(h.event),
                        _td(h.group),
                        _n(h.attempt),
                        _td(h.reason or h.error_type),
                    ]
                    for h in d.history
                ),
                empty="no journal entries",
            )
            body = (
                f'<p class="verdict">{_e(d.reason)}</p>'
                f"<p>message <code>{_e(d.message_id)}</code> on <code>{_e(d.topic)}</code> for "
                f"<code>{_e(d.group)}</code>, {d.attempts} attempts, dead {_when(d.dead_at)}; "
                f'correlation <a href="{self._url("/search", q=d.correlation_id)}">'
                f"{_e(d.correlation_id)}</a></p>"
                f"<h2>Attempts</h2>{history}<h2>Headers</h2><pre>{_e(json.dumps(d.headers, indent=2))}</pre>"
                f"<h2>Payload ({_e(d.payload_encoding)})</h2><pre>{_e(d.payload)}</pre>"
                f"<h2>Traceback</h2><pre>{_e(d.traceback)}</pre>"
            )
            return self._page(f"Dead letter {dead_id}", body, here="Dead letters")

        @r.get("/sagas")
        async def sagas(
            request: Request,
            state: Annotated[str | None, Query(max_length=20)] = None,
            name: Annotated[str | None, Query(max_length=200)] = None,
            stuck: bool = False,
            after: Annotated[str | None, Query(max_length=200)] = None,
        ) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            states = [state.upper()] if state and state.upper() in STATES else []
            page = await console.sagas(states=states, name=name, stuck=stuck, after=after)
            now = console.clock.time()
            options = "".join(
                f"<option{' selected' if s in states else ''}>{s}</option>" for s in ("", *STATES)
            )
            filters = (
                f'<form class="filters" method="get" action="{self._url("/sagas")}">'
                f'<label>state <select name="state">{options}</select></label>'
                f'<label>name <input name="name" value="{_e(name)}"></label>'
                f'<label><input type="checkbox" name="stuck" value="true"{" checked" if stuck else ""}> stuck</label>'
                "<button>Filter</button></form>"
            )
            table = _table(
                ["saga", "name", "state", "step", "waits on", "attempt", "started", "error"],
                (
                    [
                        _td(f'<a href="{self._url("/sagas/" + s.id)}">{_e(s.id)}</a>', raw=True),
                        _td(s.name),
                        _td(s.state + (" (stuck)" if s.stuck else ""), cls=_state_class(s.state)),
                        _td(s.step),
                        _td(s.waits_on or ""),
                        _n(s.attempt),
                        _td(_ago(s.created_at, now)),
                        _td(s.error),
                    ]
                    for s in page.items
                ),
                empty="no sagas match",
            )
            more = (
                f'<p><a href="{self._url("/sagas", state=state, name=name, stuck=stuck, after=page.next)}">next page</a></p>'
                if page.next
                else ""
            )
            return self._page(
                "Sagas", filters + f'<div id="sagas" data-live>{table}</div>' + more, here="Sagas"
            )

        @r.get("/sagas/{saga_id}")
        async def saga(request: Request, saga_id: str) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            timeline = await console.saga(saga_id)
            if timeline is None:
                raise _Problem(404, f"no saga {saga_id!r}")
            return self._page(
                f"Saga {saga_id}",
                f'<div id="saga" data-live>{self._timeline(timeline)}</div>',
                here="Sagas",
            )

        @r.get("/search")
        async def search(
            request: Request, q: Annotated[str, Query(max_length=500)] = ""
        ) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            if not q.strip():
                return self._page(
                    "Search",
                    '<p class="empty">type an id in the box above</p>',
                    here="",
                )
            story = await console.search(q)
            return self._page(
                f"Story of {q.strip()}",
                f'<div id="story" data-live>{self._story(story)}</div>',
                here="",
                query=q,
            )

        @r.get("/audit")
        async def audit(
            request: Request, before: Annotated[str | None, Query(max_length=64)] = None
        ) -> Response:
            denied = await reader(request)
            if isinstance(denied, Response):
                return denied
            page = await console.audit(limit=100, before=before)
            table = _table(
                ["when", "who", "action", "selection", "affected"],
                (
                    [
                        _td(_when(a.at)),
                        _td(a.actor),
                        _td(a.action),
                        _td(json.dumps(a.target, sort_keys=True)),
                        _n(a.affected),
                    ]
                    for a in page.items
                ),
                empty="no admin action yet",
            )
            more = (
                f'<p><a href="{self._url("/audit", before=page.next)}">older</a></p>'
                if page.next
                else ""
            )
            return self._page(
                "Audit log", f'<div id="audit" data-live>{table}</div>{more}', here="Audit"
            )

    async def _overview(self) -> str:
        console = self.console
        now = console.clock.time()
        queues = await console.queues()
        sparks = await console.sparklines()
        groups = await console.dead_groups()
        workers = await console.workers()
        breakers = await console.breakers()
        sagas = await console.saga_counts()
        queue_table = _table(
            [
                "topic",
                "group",
                "ready",
                "in flight",
                "delayed",
                "dead",
                "oldest",
                "consumers",
                "handled/min",
                "failed/min",
                "last 15 min",
                "paused by",
            ],
            (
                [
                    _td(q.topic),
                    _td(q.group),
                    _n(q.ready),
                    _n(q.in_flight),
                    _n(q.delayed),
                    _n(q.dead, bad=q.dead > 0),
                    _td("" if q.oldest_age is None else f"{q.oldest_age:.0f} s", cls="n"),
                    _n(q.consumers, bad=q.consumers == 0 and q.ready > 0),
                    _n(q.processed_per_min),
                    _n(q.failed_per_min, bad=q.failed_per_min > 0),
                    _td(_spark(sparks.get((q.topic, q.group), [])), raw=True),
                    _td(", ".join(q.paused_by), cls="bad" if q.paused_by else ""),
                ]
                for q in queues
            ),
            empty="no queues yet",
            id="queues-table",
        )
        dead_table = self._groups_table(groups[:20], now)
        worker_table = _table(
            ["host", "pid", "handlers", "started", "last seen", "in flight", "handled"],
            (
                [
                    _td(w.host),
                    _n(w.pid),
                    _td(", ".join(w.handlers)),
                    _td(_ago(w.started_at, now)),
                    _td(_ago(w.last_seen, now)),
                    _n(w.in_flight),
                    _n(w.processed),
                ]
                for w in workers
            ),
            empty="no live workers",
        )
        breaker_table = _table(
            ["breaker", "state", "probes at", "calls", "failures", "rejections", "guards"],
            (
                [
                    _td(b.name),
                    _td(b.state, cls=_breaker_class(b.state)),
                    _td(_when(b.open_until)),
                    _n(b.calls),
                    _n(b.failures),
                    _n(b.rejections),
                    _td(", ".join(b.guards)),
                ]
                for b in breakers
            ),
            empty="no circuit breakers reported (workers run a Journal to report them)",
        )
        saga_table = _table(
            ["state", "sagas"],
            (
                [
                    _td(
                        f'<a href="{self._url("/sagas", state=s)}">{s}</a>',
                        raw=True,
                        cls=_state_class(s),
                    ),
                    _n(c),
                ]
                for s, c in sorted(sagas.items())
            ),
            empty="no sagas",
        )
        return (
            f'<div id="overview" data-live><h2>Queues</h2>{queue_table}'
            f"<h2>Dead letters by cause</h2>{dead_table}"
            f"<h2>Workers</h2>{worker_table}<h2>Circuit breakers</h2>{breaker_table}"
            f"<h2>Sagas</h2>{saga_table}</div>"
        )

    def _groups_table(self, groups: Sequence[DeadGroupOut], now: float) -> str:
        return _table(
            [
                "topic",
                "group",
                "error",
                "raised at",
                "count",
                "first",
                "last",
                "sample reason",
                "",
            ],
            (
                [
                    _td(g.topic),
                    _td(g.group),
                    _td(g.error_type.rsplit(".", 1)[-1]),
                    _td(g.frame),
                    _td(
                        f'<a href="{self._url("/dead-letters", topic=g.topic, group=g.group, error_type=g.error_type)}">{g.count:,}</a>',
                        raw=True,
                        cls="n bad",
                    ),
                    _td(_ago(g.first_seen, now)),
                    _td(_ago(g.last_seen, now)),
                    _td(g.sample_reason[:120]),
                    _td(
                        f'<a class="replay" data-group="{_e(g.id)}" href="{self._url("/dead-letters/confirm", action="replay", dead_group=g.id)}">replay group</a> · '
                        f'<a class="purge" href="{self._url("/dead-letters/confirm", action="purge", dead_group=g.id)}">purge</a>',
                        raw=True,
                    ),
                ]
                for g in groups
            ),
            empty="no dead letters",
            id="groups-table",
        )

    async def _workbench(self, where: DeadLetterFilter, after: int, done: str | None) -> str:
        console = self.console
        now = console.clock.time()
        groups = await console.dead_groups(where)
        page = await console.dead_letters(where, limit=50, after=after)
        notice = f'<p class="verdict" id="notice">{_e(done)}</p>' if done else ""
        rows = _table(
            ["#", "topic", "group", "message", "attempts", "error", "dead"],
            (
                [
                    _td(f'<a href="{self._url(f"/dead-letters/{d.id}")}">{d.id}</a>', raw=True),
                    _td(d.topic),
                    _td(d.group),
                    _td(
                        f'<a href="{self._url("/search", q=d.correlation_id)}">{_e(d.message_id)}</a>',
                        raw=True,
                    ),
                    _n(d.attempts),
                    _td(d.reason[:140]),
                    _td(_ago(d.dead_at, now)),
                ]
                for d in page.items
            ),
            empty="no dead letters match",
        )
        more = (
            f'<p><a href="{self._url("/dead-letters", topic=where.topic, group=where.group, error_type=where.error_type, after=page.next)}">next page</a></p>'
            if page.next
            else ""
        )
        return (
            f'{notice}<div id="workbench" data-live><h2>Groups</h2>{self._groups_table(groups, now)}'
            f"<h2>Dead letters ({page.total:,})</h2>{rows}</div>{more}"
        )

    def _timeline(self, t: SagaTimeline) -> str:
        s = t.saga
        now = self.console.clock.time()
        start = t.events[0].at if t.events else s.created_at
        end = max([e.at for e in t.events] + [now if s.state in ("RUNNING", "COMPENSATING") else 0])
        total = max(end - start, 0.001)
        lanes = []
        for span in t.spans:
            stop = span.ended_at if span.ended_at is not None else end
            left = (span.sent_at - start) / total * 80
            width = max((stop - span.sent_at) / total * 80, 0.4)
            kind = span.phase
            if span.outcome == "waiting":
                kind += " waiting"
            elif span.outcome in ("failed", "timed out", "gave up"):
                kind += " failed"
            took = "" if span.duration is None else f" {span.duration:.2f} s"
            lanes.append(
                f'<div class="lane"><span class="label">{_e(span.step)} · {_e(span.phase)}</span>'
                f'<span class="bar {kind}" style="left:calc(12em + {left:.2f}%);width:{width:.2f}%" '
                f'title="{_e(span.outcome)}{took}, {span.requests} request(s)"></span></div>'
            )
        chart = f'<div class="chart" id="timeline">{"".join(lanes)}</div>' if lanes else ""
        events = _table(
            ["#", "at", "+", "event", "step", "phase", "attempt", "reason"],
            (
                [
                    _n(e.seq),
                    _td(_when(e.at)),
                    _td(f"+{e.offset:.3f} s", cls="n"),
                    _td(e.type, cls="bad" if "fail" in e.type else ""),
                    _td(e.step),
                    _td(e.phase),
                    _td("" if e.attempt is None else e.attempt, cls="n"),
                    _td(e.reason),
                ]
                for e in t.events
            ),
            empty="no history",
        )
        waits = f", waiting on <code>{_e(s.waits_on)}</code>" if s.waits_on else ""
        return (
            f"<p>saga <strong>{_e(s.name)}</strong> v{s.version}: "
            f'<span class="{_state_class(s.state)}">{_e(s.state)}</span>'
            f"{' at step ' + _e(s.step) if s.step else ''}{waits}"
            f"{' — stuck past its deadline' if s.stuck else ''}</p>"
            f"<h2>Timeline</h2>{chart}{events}"
            f"<h2>Data</h2><pre>{_e(json.dumps(t.data, indent=2, sort_keys=True))}</pre>"
        )

    def _story(self, story: Story) -> str:
        now = self.console.clock.time()
        parts = [f'<p class="verdict" id="verdict">{_e(story.verdict)}</p>']
        facts = [f"found as: {_e(', '.join(story.found) or 'nothing')}"]
        if story.correlation_id:
            facts.append(f"correlation id <code>{_e(story.correlation_id)}</code>")
        if story.trace_id:
            link = (
                f'<a href="{_e(story.trace_url)}">{_e(story.trace_id)}</a>'
                if story.trace_url
                else f"<code>{_e(story.trace_id)}</code>"
            )
            facts.append(f"trace {link}")
        parts.append(f"<p>{'; '.join(facts)}</p>")
        if story.saga is not None:
            parts.append(
                f'<h2>Saga <a href="{self._url("/sagas/" + story.saga.saga.id)}">'
                f"{_e(story.saga.saga.id)}</a></h2>{self._timeline(story.saga)}"
            )
        if story.job is not None:
            j = story.job
            parts.append(
                f"<h2>Job</h2><p>{_e(j.kind)} <code>{_e(j.id)}</code>: {_e(j.status)}"
                f"{' — ' + _e(j.error) if j.error else ''}</p>"
            )
        parts.append("<h2>Messages</h2>")
        parts.append(
            _table(
                ["message", "topic", "handled by", "attempts", "last", "last error"],
                (
                    [
                        _td(m.id),
                        _td(m.topic),
                        _td(", ".join(m.groups)),
                        _n(m.attempts),
                        _td(m.last_event, cls="bad" if m.last_event == "dead_letter" else ""),
                        _td(m.last_error.rsplit(".", 1)[-1]),
                    ]
                    for m in story.messages
                ),
                empty="no journal entries (run a Journal in the workers to record them)",
            )
        )
        if story.dead_letters:
            parts.append("<h2>Dead letters</h2>")
            parts.append(
                _table(
                    ["#", "topic", "group", "attempts", "error", "dead"],
                    (
                        [
                            _td(
                                f'<a href="{self._url(f"/dead-letters/{d.id}")}">{d.id}</a>',
                                raw=True,
                            ),
                            _td(d.topic),
                            _td(d.group),
                            _n(d.attempts),
                            _td(d.reason[:140]),
                            _td(_ago(d.dead_at, now)),
                        ]
                        for d in story.dead_letters
                    ),
                    empty="",
                )
            )
        return "".join(parts)


async def _form(request: Request) -> dict[str, str]:
    """The fields of a small urlencoded form (the console's own forms; no
    multipart parser needed)."""
    body = await request.body()
    if len(body) > 10_000:
        raise _Problem(413, "the form is over 10 kB")
    return dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=20))


def _state_class(state: str) -> str:
    return {"COMPLETED": "ok", "FAILED": "bad", "COMPENSATING": "warn", "COMPENSATED": "warn"}.get(
        state, ""
    )


def _breaker_class(state: str) -> str:
    return {"OPEN": "bad", "HALF_OPEN": "warn"}.get(state, "ok")
