"""What the operations console knows, read from the store and the broker:
queues, dead letters (listed, grouped by cause, replayed, purged), sagas and
their timelines, jobs, workers, breakers, the audit log, and the story of
any id. The admin API (``AdminAPI``) and the dashboard both call ``Console``.

Every read is of committed rows and bounded (pages, ``LIMIT``); every write
is a bulk action over at most ``max_bulk`` records, done a batch per
transaction through the runtime's replay and purge (so a replay goes through
the inbox like ``conveyor dlq replay``), each batch writing its count to the
action's audit entry in its own transaction.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Generic, TypeVar

import pydantic

from conveyor._time import Clock, SystemClock
from conveyor.errors import ConfigError
from conveyor.http._audit import SCHEMA as AUDIT_SCHEMA
from conveyor.http._audit import AuditLog
from conveyor.http._jobs import FINAL, JobRecord, Jobs, StoredResponse
from conveyor.messages import CORRELATION_ID, trace_id
from conveyor.runtime import App, purge_dead_letters, replay_dead_letters
from conveyor.runtime._heartbeat import workers as read_workers
from conveyor.runtime._journal import BREAKERS_SCHEMA, JOURNAL_SCHEMA
from conveyor.sagas._history import ACTIVE, SagaEvent, SagaRecord
from conveyor.sagas._tables import find_sagas, read_saga
from conveyor.sagas._timeline import spans
from conveyor.store._protocol import DeadLetterFilter, DeadLetterRecord, Store, Transaction

__all__ = [
    "ActionResult",
    "AuditOut",
    "BreakerOut",
    "BusinessKey",
    "Console",
    "DeadGroupOut",
    "DeadLetterDetail",
    "DeadLetterOut",
    "Missing",
    "Selection",
    "Story",
    "frame_of",
]

BusinessKey = Callable[[Store, str], Awaitable[str | None]]
"""``async def f(store, text) -> correlation id | None``: what a business id
(an order id) stands for in the app's messages."""

_FRAMES_SCHEMA = """CREATE TABLE IF NOT EXISTS conveyor_dead_frames (
    dead_id BIGINT PRIMARY KEY,
    msg_id TEXT NOT NULL,
    dead_at DOUBLE PRECISION NOT NULL,
    frame TEXT NOT NULL
)"""
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)', re.MULTILINE)
_RATE_WINDOW = 300.0
_BREAKER_FRESH = 60.0


def frame_of(traceback: str) -> str:
    """The frame a traceback ends in (where the error was raised), as
    ``file.py:LINE in function``; "" when there is none (a malformed
    message, a saga giving up)."""
    found = _FRAME.findall(traceback or "")
    if not found:
        return ""
    path, line, func = found[-1]
    return f"{PurePath(path).name}:{line} in {func}"


class QueueOut(pydantic.BaseModel):
    topic: str
    group: str
    ready: int
    in_flight: int
    delayed: int
    dead: int
    oldest_age: float | None = pydantic.Field(description="Seconds the oldest message waits")
    consumers: int = pydantic.Field(description="Live workers consuming it (heartbeats)")
    paused_by: list[str] = pydantic.Field(description="Open breakers pausing its consumers")
    processed_per_min: float
    failed_per_min: float


class BreakerOut(pydantic.BaseModel):
    name: str
    state: str
    open_until: float | None
    calls: int
    failures: int
    rejections: int
    opened: int
    guards: list[str] = pydantic.Field(description="topic/group of the handlers it guards")
    processes: int
    updated_at: float


class WorkerOut(pydantic.BaseModel):
    id: str
    app: str
    host: str
    pid: int
    handlers: list[str]
    started_at: float
    last_seen: float
    in_flight: int
    processed: int
    live: bool


class DeadLetterOut(pydantic.BaseModel):
    id: int
    group: str
    topic: str
    message_id: str
    correlation_id: str
    type: str
    key: str | None
    attempts: int
    reason: str
    error_type: str
    frame: str
    dead_at: float


class JournalOut(pydantic.BaseModel):
    at: float
    message_id: str
    topic: str
    group: str
    event: str
    attempt: int
    error_type: str
    reason: str


class DeadLetterDetail(DeadLetterOut):
    headers: dict[str, str]
    payload: str
    payload_encoding: str = pydantic.Field(description="utf-8, or base64 for other bytes")
    traceback: str
    created_at: float
    history: list[JournalOut] = pydantic.Field(description="Its attempts, from the journal")


class DeadLetterPage(pydantic.BaseModel):
    items: list[DeadLetterOut]
    total: int = pydantic.Field(description="How many match the filters in all")
    next: str | None = pydantic.Field(description="Cursor of the next page (None: last page)")


class DeadGroupOut(pydantic.BaseModel):
    id: str
    topic: str
    group: str
    error_type: str
    frame: str
    count: int
    first_seen: float
    last_seen: float
    sample_reason: str


class Selection(pydantic.BaseModel):
    """Which dead letters a replay or purge acts on: ``ids``, a ``dead_group``
    id (from the groups), filters, or ``all``; at least one must be given."""

    model_config = pydantic.ConfigDict(extra="forbid")

    ids: list[Annotated[int, pydantic.Field(ge=0, le=2**62)]] | None = pydantic.Field(
        default=None, max_length=1000
    )
    dead_group: str | None = pydantic.Field(default=None, max_length=64)
    topic: str | None = pydantic.Field(default=None, max_length=500)
    group: str | None = pydantic.Field(default=None, max_length=500)
    error_type: str | None = pydantic.Field(default=None, max_length=500)
    reason_contains: str | None = pydantic.Field(default=None, max_length=500)
    dead_since: float | None = pydantic.Field(default=None, ge=0, le=1e12)
    dead_before: float | None = pydantic.Field(default=None, ge=0, le=1e12)
    all: bool = False
    limit: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=2**31,
        description="At most this many (and at most the server's bound)",
    )

    def chosen(self) -> bool:
        return self.all or any(
            v is not None
            for v in (
                self.ids,
                self.dead_group,
                self.topic,
                self.group,
                self.error_type,
                self.reason_contains,
                self.dead_since,
                self.dead_before,
            )
        )


class ActionResult(pydantic.BaseModel):
    action: str
    affected: int = pydantic.Field(description="Records replayed or purged")
    remaining: int = pydantic.Field(description="Records the selection still matches")
    audit_id: str | None


class SagaOut(pydantic.BaseModel):
    id: str
    name: str
    version: int
    state: str
    step: str = pydantic.Field(description="The current step and phase; '' once done")
    waits_on: str | None = pydantic.Field(description="The command topic it waits on")
    attempt: int
    deadline: float | None
    stuck: bool = pydantic.Field(description="Active past its step's deadline")
    error: str
    created_at: float
    updated_at: float


class SagaEventOut(pydantic.BaseModel):
    seq: int
    type: str
    step: str
    at: float
    offset: float = pydantic.Field(description="Seconds since the saga started")
    since_previous: float
    phase: str
    attempt: int | None
    reason: str
    detail: dict[str, Any]


class StepSpanOut(pydantic.BaseModel):
    step: str
    phase: str
    sent_at: float
    ended_at: float | None
    duration: float | None
    outcome: str
    requests: int


class SagaTimeline(pydantic.BaseModel):
    saga: SagaOut
    data: dict[str, Any]
    steps: list[str]
    events: list[SagaEventOut]
    spans: list[StepSpanOut]


class SagaPage(pydantic.BaseModel):
    items: list[SagaOut]
    next: str | None


class JobOut(pydantic.BaseModel):
    id: str
    kind: str
    owner: str
    status: str
    progress: float | None
    note: str | None
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None


class JobPage(pydantic.BaseModel):
    items: list[JobOut]
    next: str | None


class AuditOut(pydantic.BaseModel):
    id: str
    at: float
    actor: str
    action: str
    target: dict[str, Any]
    affected: int


class AuditPage(pydantic.BaseModel):
    items: list[AuditOut]
    next: str | None


class MessageOut(pydantic.BaseModel):
    id: str
    topic: str
    groups: list[str]
    last_event: str
    attempts: int
    last_error: str
    events: list[JournalOut]


class Story(pydantic.BaseModel):
    """Everything known of one id, and a one-line verdict."""

    query: str
    found: list[str] = pydantic.Field(description="What the id is: message, saga, job...")
    correlation_id: str | None
    trace_id: str | None
    trace_url: str | None
    verdict: str
    messages: list[MessageOut]
    dead_letters: list[DeadLetterOut]
    saga: SagaTimeline | None
    job: JobOut | None
    breakers: list[BreakerOut]


@dataclass(frozen=True, slots=True)
class _GroupKey:
    topic: str
    group: str
    error_type: str
    frame: str

    @property
    def id(self) -> str:
        raw = json.dumps([self.topic, self.group, self.error_type, self.frame])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _dead_out(r: DeadLetterRecord) -> DeadLetterOut:
    m = r.message
    return DeadLetterOut(
        id=r.id,
        group=r.group,
        topic=m.topic,
        message_id=m.id,
        correlation_id=m.correlation_id,
        type=m.type,
        key=m.key,
        attempts=r.attempts,
        reason=r.reason,
        error_type=r.error_type,
        frame=frame_of(r.traceback),
        dead_at=r.dead_at,
    )


def _job_out(r: JobRecord) -> JobOut:
    return JobOut(
        id=r.id,
        kind=r.kind,
        owner=r.owner,
        status=r.status,
        progress=r.progress,
        note=r.note,
        error=r.error,
        created_at=r.created_at,
        updated_at=r.updated_at,
        finished_at=r.finished_at,
    )


def _steps_of(events: Sequence[SagaEvent]) -> list[str]:
    started = next((e for e in events if e.type == "started"), None)
    steps = started.detail.get("steps") if started is not None else None
    return [str(s) for s in steps] if isinstance(steps, list) else []


def _waits_on(record: SagaRecord, events: Sequence[SagaEvent]) -> str | None:
    """The command topic of the request an active saga waits for."""
    if record.state not in ACTIVE or record.token is None:
        return None
    for e in reversed(events):
        if e.type == "sent":
            to = e.detail.get("to")
            return None if to in (None, "", "local") else str(to)
    return None


def _saga_out(record: SagaRecord, events: Sequence[SagaEvent], now: float) -> SagaOut:
    names = _steps_of(events)
    step = ""
    if record.phase and record.step >= 0 and record.state in ACTIVE:
        name = names[record.step] if record.step < len(names) else f"#{record.step}"
        step = f"{name} ({record.phase})"
    return SagaOut(
        id=record.id,
        name=record.name,
        version=record.version,
        state=record.state,
        step=step,
        waits_on=_waits_on(record, events),
        attempt=record.attempt,
        deadline=record.deadline,
        stuck=record.state in ACTIVE and record.deadline is not None and record.deadline < now,
        error=record.error,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _short(error_type: str) -> str:
    """An error type without its module (``ProviderTimeout``)."""
    return error_type.rsplit(".", 1)[-1]


def _clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


T = TypeVar("T")
_log = logging.getLogger("conveyor.console")
_LARGE = 100_000
"""Rows an answer counted above which it is served stale while the next is
computed (a page polling a million-row queue never waits on the count)."""


class _Reused(Generic[T]):
    """One answer, reused: a small one for ``ttl`` seconds, one over a large
    table (``size`` >= ``_LARGE``) for ``large_ttl`` and then, for up to
    ``max_stale`` seconds, served as it is while one background task
    computes the next: counting a million rows takes hundreds of
    milliseconds, which no page poll should wait for. A ``large_ttl`` of 0
    reuses nothing."""

    def __init__(
        self, clock: Clock, *, ttl: float, large_ttl: float, max_stale: float = 30.0
    ) -> None:
        self.ttl = ttl
        self.large_ttl = large_ttl
        self.clock = clock
        self.max_stale = max_stale
        self._value: T | None = None
        self._at = 0.0
        self._large = False
        self._task: asyncio.Task[None] | None = None

    def forget(self) -> None:
        self._value = None

    async def get(self, compute: Callable[[], Awaitable[tuple[T, int]]]) -> T:
        now = self.clock.monotonic()
        if self._value is not None and self.large_ttl > 0:
            age = now - self._at
            if age < (self.large_ttl if self._large else self.ttl):
                return self._value
            if self._large and age < self.max_stale:
                if self._task is None or self._task.done():
                    self._task = asyncio.create_task(self._background(compute))
                return self._value
        return await self._refresh(compute)

    async def _refresh(self, compute: Callable[[], Awaitable[tuple[T, int]]]) -> T:
        value, size = await compute()
        self._value, self._at, self._large = value, self.clock.monotonic(), size >= _LARGE
        return value

    async def _background(self, compute: Callable[[], Awaitable[tuple[T, int]]]) -> None:
        try:
            await self._refresh(compute)
        except Exception:  # the stale answer stays; the next poll tries again
            _log.warning("console: refreshing a reused answer failed", exc_info=True)


class Console:
    """The console's reads and actions on ``app`` (see the module doc).

    - ``jobs``: the HTTP job API's ``Jobs``, to list and find jobs.
    - ``trace_link``: a URL template with ``{trace_id}`` (Jaeger's
      ``http://jaeger:16686/trace/{trace_id}``, or any trace UI).
    - ``business_keys``: functions mapping a business id to the correlation
      id of its messages (an order id to its saga's), tried by ``search``.
    - ``max_bulk``: the most records one replay or purge acts on.
    - ``groups_ttl``: seconds a dead-letter grouping is reused (0: never),
      and the queue figures once they count over 100,000 messages (smaller
      ones are counted afresh each time). Over 100,000 rows either is then
      served as it is (up to 30 s old) while the next is counted in the
      background, so no page poll waits on counting a deep queue; a replay
      or purge through this console forgets both.
    """

    def __init__(
        self,
        app: App,
        *,
        jobs: Jobs | None = None,
        trace_link: str | None = None,
        business_keys: Sequence[BusinessKey] = (),
        max_bulk: int = 10_000,
        groups_ttl: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        if trace_link is not None and "{trace_id}" not in trace_link:
            raise ConfigError(f"trace_link {trace_link!r} must hold {{trace_id}}")
        if max_bulk < 1:
            raise ConfigError(f"max_bulk must be >= 1, got {max_bulk}")
        self.app = app
        self.jobs = jobs
        self.trace_link = trace_link
        self.business_keys = list(business_keys)
        self.max_bulk = max_bulk
        self.clock: Clock = clock or SystemClock()
        self.audit_log = AuditLog(app.store, clock=self.clock)
        self.groups_ttl = groups_ttl
        self._groups: dict[str, _Reused[list[DeadGroupOut]]] = {}
        # Small queue figures are always counted afresh: a page shows an action's effect.
        self._queues: _Reused[list[QueueOut]] = _Reused(self.clock, ttl=0.0, large_ttl=groups_ttl)
        self._ready = False
        self._swept = 0.0

    @property
    def store(self) -> Store:
        return self.app.store

    async def connect(self) -> None:
        """Connect the app and create the console's tables (idempotent)."""
        await self.app.connect()  # again after a close(): cheap when connected
        if self._ready:
            return
        if self.jobs is not None:
            await self.jobs.store.connect(self.app)
        async with self.store.transaction() as tx:
            for statement in (
                *JOURNAL_SCHEMA,
                BREAKERS_SCHEMA,
                _FRAMES_SCHEMA,
                AUDIT_SCHEMA,
            ):
                await tx.execute(statement)
        self.audit_log = AuditLog(self.app.store, clock=self.clock)
        self._ready = True

    # -- queues, workers, breakers -------------------------------------------

    async def queues(self) -> list[QueueOut]:
        """Per (topic, group): depth, age, dead letters, consumers, breakers,
        rates; reused as ``groups_ttl`` says."""
        await self.connect()
        return await self._queues.get(self._count_queues)

    async def _count_queues(self) -> tuple[list[QueueOut], int]:
        now = self.clock.time()
        stats = {(s.topic, s.group): s for s in await self.app.broker.stats()}
        dead = await self.store.dead_letter_counts()
        live = [w for w in await read_workers(self.store) if w.live(now)]
        breakers = [b for b in await self.breakers() if b.state == "OPEN"]
        rates: dict[tuple[str, str], list[int]] = {}
        for topic, group, event, count in await self.store.read(
            "SELECT topic, grp, event, COUNT(*) FROM conveyor_journal WHERE at >= ? AND grp <> '' "
            "GROUP BY topic, grp, event",
            (now - _RATE_WINDOW,),
        ):
            pair = rates.setdefault((str(topic), str(group)), [0, 0])
            if event in ("applied", "duplicate"):
                pair[0] += int(count)
            elif event in ("retry", "dead_letter", "rolled_back"):
                pair[1] += int(count)
        out = []
        for key in sorted(set(stats) | set(dead)):
            topic, group = key
            s = stats.get(key)
            done, failed = rates.get(key, [0, 0])
            out.append(
                QueueOut(
                    topic=topic,
                    group=group,
                    ready=s.ready if s else 0,
                    in_flight=s.in_flight if s else 0,
                    delayed=s.delayed if s else 0,
                    dead=dead.get(key, 0),
                    oldest_age=None if s is None or s.oldest is None else max(0.0, now - s.oldest),
                    consumers=sum(1 for w in live if key in w.handlers),
                    paused_by=[b.name for b in breakers if f"{topic}/{group}" in b.guards],
                    processed_per_min=round(done * 60 / _RATE_WINDOW, 2),
                    failed_per_min=round(failed * 60 / _RATE_WINDOW, 2),
                )
            )
        return out, sum(q.ready + q.in_flight + q.delayed + q.dead for q in out)

    async def sparklines(self, *, minutes: int = 15) -> dict[tuple[str, str], list[int]]:
        """Messages handled per minute and queue over the last ``minutes``
        (oldest first), from the journal."""
        await self.connect()
        start = self.clock.time() - minutes * 60
        out: dict[tuple[str, str], list[int]] = {}
        for topic, group, bucket, count in await self.store.read(
            "SELECT topic, grp, minute, COUNT(*) FROM (SELECT topic, grp, "
            "CAST((at - ?) / 60 AS INTEGER) AS minute FROM conveyor_journal "
            "WHERE at >= ? AND event IN ('applied', 'duplicate')) handled "
            "GROUP BY topic, grp, minute",
            (start, start),
        ):
            line = out.setdefault((str(topic), str(group)), [0] * minutes)
            index = min(max(int(bucket), 0), minutes - 1)
            line[index] += int(count)
        return out

    async def saga_counts(self) -> dict[str, int]:
        """Sagas per state."""
        await self.connect()
        try:
            rows = await self.store.read(
                "SELECT state, COUNT(*) FROM conveyor_sagas GROUP BY state"
            )
        except Exception:
            return {}  # no saga yet
        return {str(r[0]): int(r[1]) for r in rows}

    async def workers(self, *, include_stale: bool = False) -> list[WorkerOut]:
        await self.connect()
        now = self.clock.time()
        return [
            WorkerOut(
                id=w.id,
                app=w.app,
                host=w.host,
                pid=w.pid,
                handlers=[f"{t}/{g}" for t, g in w.handlers],
                started_at=w.started_at,
                last_seen=w.last_seen,
                in_flight=w.in_flight,
                processed=w.processed,
                live=w.live(now),
            )
            for w in await read_workers(self.store)
            if include_stale or w.live(now)
        ]

    async def breakers(self) -> list[BreakerOut]:
        """Each breaker of the app's handlers, as the journals of the
        processes running them last wrote it: the worst state across them
        (OPEN over HALF_OPEN over CLOSED), counts summed."""
        await self.connect()
        now = self.clock.time()
        rows = await self.store.read(
            "SELECT name, state, open_until, calls, failures, rejections, opened, guards, "
            "updated_at FROM conveyor_breakers WHERE updated_at >= ? ORDER BY name",
            (now - _BREAKER_FRESH,),
        )
        rank = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}
        merged: dict[str, BreakerOut] = {}
        for name, state, until, calls, failures, rejections, opened, guards, updated in rows:
            state = str(state)
            if state == "OPEN" and until is not None and float(until) <= now:
                state = "HALF_OPEN"  # its open time is over: the next call probes
            before = merged.get(str(name))
            item = BreakerOut(
                name=str(name),
                state=state,
                open_until=None if state != "OPEN" or until is None else float(until),
                calls=int(calls),
                failures=int(failures),
                rejections=int(rejections),
                opened=int(opened),
                guards=sorted(set(str(guards).split())),
                processes=1,
                updated_at=float(updated),
            )
            if before is not None:
                worst = before if rank[before.state] >= rank[item.state] else item
                item = worst.model_copy(
                    update={
                        "calls": before.calls + item.calls,
                        "failures": before.failures + item.failures,
                        "rejections": before.rejections + item.rejections,
                        "opened": before.opened + item.opened,
                        "guards": sorted(set(before.guards) | set(item.guards)),
                        "processes": before.processes + 1,
                        "updated_at": max(before.updated_at, item.updated_at),
                        "open_until": max(
                            (u for u in (before.open_until, item.open_until) if u is not None),
                            default=None,
                        ),
                    }
                )
            merged[item.name] = item
        return list(merged.values())

    # -- dead letters --------------------------------------------------------

    async def dead_letters(
        self, where: DeadLetterFilter | None, *, limit: int = 50, after: int = 0
    ) -> DeadLetterPage:
        """One page of matching dead letters, oldest first."""
        await self.connect()
        records = await self.store.dead_letters(where, limit=limit + 1, after=after)
        more = len(records) > limit
        records = records[:limit]
        return DeadLetterPage(
            items=[_dead_out(r) for r in records],
            total=await self.store.dead_letter_count(where),
            next=str(records[-1].id) if more and records else None,
        )

    async def dead_letter(self, dead_id: int) -> DeadLetterDetail | None:
        """One dead letter with payload, headers, traceback and attempt history."""
        await self.connect()
        found = await self.store.dead_letters(DeadLetterFilter(ids=[dead_id]), limit=1)
        if not found:
            return None
        r = found[0]
        try:
            payload, encoding = r.message.payload.decode(), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(r.message.payload).decode(), "base64"
        history = await self._journal(
            "msg_id = ? AND (grp = ? OR grp = '')", (r.message.id, r.group), limit=200
        )
        return DeadLetterDetail(
            **_dead_out(r).model_dump(),
            headers=dict(r.message.headers),
            payload=payload,
            payload_encoding=encoding,
            traceback=r.traceback,
            created_at=r.message.created_at,
            history=history,
        )

    async def _index_frames(self) -> None:
        """Note the frame of each dead letter not noted yet (a batch at a
        time; what was noted stays), so grouping reads no tracebacks twice."""
        store = self.store
        while True:
            rows = await store.read(
                "SELECT d.id, d.msg_id, d.dead_at, d.traceback FROM conveyor_dead d "
                "LEFT JOIN conveyor_dead_frames f ON f.dead_id = d.id AND f.msg_id = d.msg_id "
                "AND f.dead_at = d.dead_at WHERE f.dead_id IS NULL ORDER BY d.id LIMIT 2000"
            )
            if not rows:
                break
            values = [(int(r[0]), str(r[1]), float(r[2]), frame_of(str(r[3]))) for r in rows]
            async with store.transaction() as tx:
                for start in range(0, len(values), 250):
                    chunk = values[start : start + 250]
                    await tx.execute(
                        "INSERT INTO conveyor_dead_frames (dead_id, msg_id, dead_at, frame) "
                        f"VALUES {', '.join(['(?, ?, ?, ?)'] * len(chunk))} "
                        "ON CONFLICT (dead_id) DO UPDATE SET msg_id = excluded.msg_id, "
                        "dead_at = excluded.dead_at, frame = excluded.frame",
                        [v for row in chunk for v in row],
                    )
            if len(rows) < 2000:
                break
        now = self.clock.monotonic()
        if now - self._swept > 300:
            self._swept = now
            async with store.transaction() as tx:
                await tx.execute(
                    "DELETE FROM conveyor_dead_frames WHERE NOT EXISTS "
                    "(SELECT 1 FROM conveyor_dead d WHERE d.id = conveyor_dead_frames.dead_id)"
                )

    async def dead_groups(self, where: DeadLetterFilter | None = None) -> list[DeadGroupOut]:
        """Dead letters grouped by (topic, group, error type, frame), largest
        first; an answer is reused for ``groups_ttl`` seconds (many pages
        polling share it), and forgotten when this console replays or purges."""
        await self.connect()
        key = repr(where)
        reused = self._groups.get(key)
        if reused is None:
            if len(self._groups) > 100:
                self._groups.clear()
            reused = self._groups[key] = _Reused(
                self.clock, ttl=self.groups_ttl, large_ttl=self.groups_ttl
            )
        return await reused.get(lambda: self._dead_groups(where))

    async def _dead_groups(self, where: DeadLetterFilter | None) -> tuple[list[DeadGroupOut], int]:
        await self._index_frames()
        clauses, params = [], []
        if where is not None:
            for column, op, value in (
                ("d.topic", "=", where.topic),
                ("d.grp", "=", where.group),
                ("d.error_type", "=", where.error_type),
                ("d.dead_at", ">=", where.dead_since),
                ("d.dead_at", "<", where.dead_before),
            ):
                if value is not None:
                    clauses.append(f"{column} {op} ?")
                    params.append(value)
        filt = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        rows = await self.store.read(
            "SELECT d.topic, d.grp, d.error_type, COALESCE(f.frame, ''), COUNT(*), "
            "MIN(d.dead_at), MAX(d.dead_at), MAX(d.reason) FROM conveyor_dead d "
            "LEFT JOIN conveyor_dead_frames f ON f.dead_id = d.id AND f.msg_id = d.msg_id "
            f"AND f.dead_at = d.dead_at {filt}"
            "GROUP BY d.topic, d.grp, d.error_type, COALESCE(f.frame, '') "
            "ORDER BY COUNT(*) DESC, d.topic, d.grp LIMIT 500",
            params,
        )
        out = []
        for topic, group, error, frame, count, first, last, reason in rows:
            key = _GroupKey(str(topic), str(group), str(error), str(frame))
            out.append(
                DeadGroupOut(
                    id=key.id,
                    topic=key.topic,
                    group=key.group,
                    error_type=key.error_type,
                    frame=key.frame,
                    count=int(count),
                    first_seen=float(first),
                    last_seen=float(last),
                    sample_reason=str(reason)[:300],
                )
            )
        return out, sum(g.count for g in out)

    async def _resolve(
        self, selection: Selection
    ) -> tuple[DeadLetterFilter, Callable[[DeadLetterRecord], bool] | None]:
        if not selection.chosen():
            raise ConfigError(
                "say which dead letters: ids, dead_group, topic/group/error_type/"
                "reason_contains/dead_since/dead_before, or all"
            )
        topic, group, error = selection.topic, selection.group, selection.error_type
        keep: Callable[[DeadLetterRecord], bool] | None = None
        if selection.dead_group is not None:
            match = next(
                (g for g in await self.dead_groups() if g.id == selection.dead_group), None
            )
            if match is None:
                raise Missing(f"no dead-letter group {selection.dead_group!r} (it may be empty)")
            if any(
                mine is not None and mine != theirs
                for mine, theirs in ((topic, match.topic), (group, match.group))
            ):
                raise ConfigError("dead_group and topic/group name different dead letters")
            topic, group, error = match.topic, match.group, match.error_type
            frame = match.frame

            def keep(r: DeadLetterRecord) -> bool:
                return frame_of(r.traceback) == frame

        where = DeadLetterFilter(
            ids=selection.ids,
            topic=topic,
            group=group,
            error_type=error,
            reason_contains=selection.reason_contains,
            dead_since=selection.dead_since,
            dead_before=selection.dead_before,
        )
        return where, keep

    async def _act(self, action: str, actor: str, selection: Selection) -> ActionResult:
        await self.connect()
        self._groups.clear()
        self._queues.forget()
        where, keep = await self._resolve(selection)
        limit = min(selection.limit or self.max_bulk, self.max_bulk)
        target = selection.model_dump(exclude_none=True, exclude_defaults=True)
        audit = self.audit_log
        entry: list[str] = []

        async def each_batch(tx: Transaction, page: Sequence[DeadLetterRecord]) -> None:
            if entry:
                await audit.add(tx, entry[0], len(page))
            else:
                entry.append(
                    await audit.record(
                        tx, actor=actor, action=action, target=target, affected=len(page)
                    )
                )
            marks = ", ".join("?" * len(page))
            await tx.execute(
                f"DELETE FROM conveyor_dead_frames WHERE dead_id IN ({marks})",
                [r.id for r in page],
            )

        run = replay_dead_letters if action == "dead_letters.replay" else purge_dead_letters
        done = await run(self.app, where, limit=limit, keep=keep, each_batch=each_batch)
        if not entry:  # nothing matched: the attempt is recorded all the same
            async with self.store.transaction() as tx:
                entry.append(
                    await audit.record(tx, actor=actor, action=action, target=target, affected=0)
                )
        self._groups.clear()
        self._queues.forget()
        remaining = await self.store.dead_letter_count(where)
        if keep is not None:
            remaining = sum(
                g.count for g in await self.dead_groups() if g.id == selection.dead_group
            )
        return ActionResult(action=action, affected=done, remaining=remaining, audit_id=entry[0])

    async def replay(self, selection: Selection, *, actor: str) -> ActionResult:
        """Send the selected dead letters back to their groups through the
        inbox (same message ids: nothing already applied is applied again)."""
        return await self._act("dead_letters.replay", actor, selection)

    async def purge(self, selection: Selection, *, actor: str) -> ActionResult:
        """Delete the selected dead letters for good."""
        return await self._act("dead_letters.purge", actor, selection)

    # -- sagas ---------------------------------------------------------------

    async def sagas(
        self,
        *,
        states: Sequence[str] = (),
        name: str | None = None,
        older_than: float | None = None,
        stuck: bool = False,
        limit: int = 50,
        after: str | None = None,
    ) -> SagaPage:
        await self.connect()
        now = self.clock.time()
        cursor = None
        if after:
            at, _, saga_id = after.partition("~")
            try:
                cursor = (float(at), saga_id)
            except ValueError:
                raise ConfigError(f"invalid saga cursor {after!r}") from None
        records = await find_sagas(
            self.store,
            states=states,
            name=name,
            created_before=None if older_than is None else now - older_than,
            stuck_at=now if stuck else None,
            limit=limit + 1,
            after=cursor,
        )
        more = len(records) > limit
        records = records[:limit]
        items = []
        for r in records:
            events = await self._saga_events(r.id) if r.state in ACTIVE else []
            items.append(_saga_out(r, events, now))
        last = records[-1] if records else None
        return SagaPage(
            items=items,
            next=f"{last.created_at!r}~{last.id}" if more and last is not None else None,
        )

    async def _saga_events(self, saga_id: str) -> list[SagaEvent]:
        found = await read_saga(self.store, saga_id)
        return [] if found is None else found[1]

    async def saga(self, saga_id: str) -> SagaTimeline | None:
        """One saga's state, current step and the timeline of its history."""
        await self.connect()
        found = await read_saga(self.store, saga_id)
        if found is None:
            return None
        record, events = found
        start = events[0].at if events else record.created_at
        out_events = []
        previous = start
        for e in events:
            d = e.detail
            attempt = d.get("attempt")
            out_events.append(
                SagaEventOut(
                    seq=e.seq,
                    type=e.type,
                    step=e.step,
                    at=e.at,
                    offset=round(e.at - start, 6),
                    since_previous=round(e.at - previous, 6),
                    phase=str(d.get("phase", "")),
                    attempt=int(attempt) if isinstance(attempt, int) else None,
                    reason=str(d.get("reason", "")),
                    detail=dict(d),
                )
            )
            previous = e.at
        return SagaTimeline(
            saga=_saga_out(record, events, self.clock.time()),
            data=dict(record.data),
            steps=_steps_of(events),
            events=out_events,
            spans=[
                StepSpanOut(
                    step=s.step,
                    phase=s.phase,
                    sent_at=s.sent_at,
                    ended_at=s.ended_at,
                    duration=None if s.ended_at is None else s.ended_at - s.sent_at,
                    outcome=s.outcome,
                    requests=s.requests,
                )
                for s in spans(events)
            ],
        )

    # -- jobs ----------------------------------------------------------------

    async def job_list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> JobPage:
        """Jobs newest first (SQL job store), or a page of a Redis scan."""
        await self.connect()
        if self.jobs is None:
            return JobPage(items=[], next=None)
        store = self.jobs.store
        found: list[JobRecord] = []
        cursor: str | None = None
        from conveyor.http.sql_jobs import SqlJobStore

        if isinstance(store, SqlJobStore):
            clauses, params = [], []
            if kind:
                clauses.append("kind = ?")
                params.append(kind)
            if status in FINAL:
                clauses.append("status = ?")
                params.append(status)
            elif status is not None:
                clauses.append("status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')")
            if after:
                clauses.append("id < ?")
                params.append(after)
            filt = f"WHERE {' AND '.join(clauses)} " if clauses else ""
            batch = limit + 1
            while True:
                rows = await self.store.read(
                    f"SELECT id FROM conveyor_jobs {filt}ORDER BY id DESC LIMIT ?",
                    [*params, batch],
                )
                for (job_id,) in rows:
                    record = await store.get(str(job_id))
                    if record is not None and (status is None or record.status == status):
                        found.append(record)
                if len(found) > limit or len(rows) < batch:
                    break
                if after:
                    params[-1] = str(rows[-1][0])
                else:
                    clauses.append("id < ?")
                    params.append(str(rows[-1][0]))
                    filt = f"WHERE {' AND '.join(clauses)} "
            more = len(found) > limit
            found = found[:limit]
            cursor = found[-1].id if more and found else None
        else:
            found, cursor = await _redis_jobs(store, status, kind, limit, after)
        return JobPage(items=[_job_out(r) for r in found], next=cursor)

    async def job(self, job_id: str) -> JobOut | None:
        await self.connect()
        if self.jobs is None:
            return None
        record = await self.jobs.store.get(job_id)
        return None if record is None else _job_out(record)

    async def _job_by_idempotency_key(self, key: str) -> JobOut | None:
        if self.jobs is None:
            return None
        from conveyor.http.sql_jobs import SqlJobStore

        store = self.jobs.store
        responses: list[str] = []
        if isinstance(store, SqlJobStore):
            rows = await self.store.read(
                "SELECT response FROM conveyor_idempotency WHERE idem_key = ? LIMIT 5", (key,)
            )
            responses = [str(r[0]) for r in rows if r[0]]
        else:
            responses = await _redis_idempotency(store, key)
        for text in responses:
            try:
                job_id = json.loads(StoredResponse.from_json(text).body).get("id")
            except (ValueError, AttributeError):
                continue
            if job_id:
                found = await self.job(str(job_id))
                if found is not None:
                    return found
        return None

    # -- audit ---------------------------------------------------------------

    async def audit(
        self,
        *,
        limit: int = 50,
        before: str | None = None,
        actor: str | None = None,
        action: str | None = None,
    ) -> AuditPage:
        await self.connect()
        entries = await self.audit_log.entries(
            limit=limit + 1, before=before, actor=actor, action=action
        )
        more = len(entries) > limit
        entries = entries[:limit]
        return AuditPage(
            items=[
                AuditOut(
                    id=e.id,
                    at=e.at,
                    actor=e.actor,
                    action=e.action,
                    target=dict(e.target),
                    affected=e.affected,
                )
                for e in entries
            ],
            next=entries[-1].id if more and entries else None,
        )

    # -- search --------------------------------------------------------------

    async def _journal(
        self, where: str, params: Sequence[object], *, limit: int = 500
    ) -> list[JournalOut]:
        rows = await self.store.read(
            "SELECT at, msg_id, topic, grp, event, attempt, error_type, reason "
            f"FROM conveyor_journal WHERE {where} ORDER BY at LIMIT ?",
            (*params, limit),
        )
        return [
            JournalOut(
                at=float(r[0]),
                message_id=str(r[1]),
                topic=str(r[2]),
                group=str(r[3]),
                event=str(r[4]),
                attempt=int(r[5]),
                error_type=str(r[6]),
                reason=str(r[7]),
            )
            for r in rows
        ]

    async def _dead_by_correlation(self, ids: Sequence[str]) -> list[DeadLetterRecord]:
        clauses, params = [], []
        for value in ids:
            escaped = json.dumps(value).replace("\\", "\\\\").replace("%", r"\%")
            escaped = escaped.replace("_", r"\_")
            clauses.append("msg_id = ? OR headers LIKE ? ESCAPE '\\'")
            params.extend([value, f'%"{CORRELATION_ID}":{escaped}%'])
        if not clauses:
            return []
        rows = await self.store.read(
            f"SELECT id FROM conveyor_dead WHERE {' OR '.join(clauses)} ORDER BY id LIMIT 100",
            params,
        )
        if not rows:
            return []
        ids_found = [int(r[0]) for r in rows]
        return await self.store.dead_letters(DeadLetterFilter(ids=ids_found), limit=len(ids_found))

    async def search(self, query: str) -> Story:
        """The story of ``query``: a message id, correlation id, saga id, job
        id, idempotency key, trace id, a dead letter's number or a business
        key; with a one-line verdict of where it is and why."""
        await self.connect()
        q = query.strip()
        now = self.clock.time()
        found: list[str] = []
        correlations: set[str] = set()
        hits = await self.store.read(
            "SELECT DISTINCT correlation_id, "
            "CASE WHEN msg_id = ? THEN 'message' WHEN correlation_id = ? THEN 'correlation' "
            "WHEN idem_key = ? THEN 'idempotency key' ELSE 'trace' END "
            "FROM conveyor_journal WHERE msg_id = ? OR correlation_id = ? OR idem_key = ? "
            "OR trace_id = ? LIMIT 50",
            (q, q, q, q, q, q, q),
        )
        for corr, what in hits:
            correlations.add(str(corr))
            if what not in found:
                found.append(str(what))
        if q.isdigit():
            number = await self.store.dead_letters(DeadLetterFilter(ids=[int(q)]), limit=1)
            if number:
                found.append("dead letter")
                correlations.add(number[0].message.correlation_id)
        for resolve in self.business_keys:
            corr = await resolve(self.store, q)
            if corr:
                found.append("business key")
                correlations.add(corr)
        saga = await self.saga(q)
        if saga is None:
            for corr in sorted(correlations):
                saga = await self.saga(corr)
                if saga is not None:
                    break
        elif "saga" not in found:
            found.append("saga")
            correlations.add(q)
        job = await self.job(q)
        if job is not None:
            found.append("job")
        else:
            job = await self._job_by_idempotency_key(q)
            if job is not None:
                found.append("idempotency key")
        dead_records = await self._dead_by_correlation(sorted(correlations | {q}))
        for r in dead_records:
            correlations.add(r.message.correlation_id)
            if "dead letter" not in found and r.message.id == q:
                found.append("message")
        if dead_records and "dead letter" not in found:
            found.append("dead letter")
        if saga is not None and "saga" not in found:
            found.append("saga")
        events: list[JournalOut] = []
        if correlations:
            marks = ", ".join("?" * len(correlations))
            events = await self._journal(
                f"correlation_id IN ({marks})", sorted(correlations), limit=2000
            )
        messages = _messages(events)
        trace = await self._trace_of(correlations)
        breakers = await self.breakers()
        story = Story(
            query=q,
            found=found,
            correlation_id=min(correlations) if len(correlations) == 1 else None,
            trace_id=trace,
            trace_url=None
            if trace is None or self.trace_link is None
            else self.trace_link.replace("{trace_id}", trace),
            verdict="",
            messages=messages,
            dead_letters=[_dead_out(r) for r in dead_records],
            saga=saga,
            job=job,
            breakers=breakers,
        )
        story.verdict = _verdict(story, now)
        return story

    async def _trace_of(self, correlations: set[str]) -> str | None:
        if not correlations:
            return None
        marks = ", ".join("?" * len(correlations))
        rows = await self.store.read(
            f"SELECT trace_id FROM conveyor_journal WHERE correlation_id IN ({marks}) "
            "AND trace_id <> '' ORDER BY at LIMIT 1",
            sorted(correlations),
        )
        if rows:
            return str(rows[0][0])
        for r in await self._dead_by_correlation(sorted(correlations)):
            found = trace_id(r.message.traceparent)
            if found:
                return found
        return None


class Missing(LookupError):
    """A selection names something that does not exist (404 at the edge)."""


def _messages(events: Sequence[JournalOut]) -> list[MessageOut]:
    by_id: dict[str, list[JournalOut]] = {}
    for e in events:
        by_id.setdefault(e.message_id, []).append(e)
    out = []
    for message_id, items in by_id.items():
        handled = [e for e in items if e.group]
        errors = [e for e in handled if e.error_type or e.reason]
        out.append(
            MessageOut(
                id=message_id,
                topic=items[0].topic,
                groups=sorted({e.group for e in handled}),
                last_event=items[-1].event,
                attempts=len([e for e in handled if e.event != "duplicate"]),
                last_error=(errors[-1].error_type or errors[-1].reason) if errors else "",
                events=items,
            )
        )
    return out


def _verdict(story: Story, now: float) -> str:
    """One line: where the request is and why it has not finished."""
    saga = story.saga
    if saga is not None:
        s = saga.saga
        if s.state == "COMPLETED":
            took = s.updated_at - s.created_at
            return f"saga {s.name} {s.id} completed in {_ago(took)}"
        if s.state in ("COMPENSATED", "FAILED"):
            why = f": {s.error}" if s.error else ""
            return f"saga {s.name} {s.id} {s.state.lower()}{why}"
        topic = s.waits_on
        since = next(
            (e.at for e in reversed(saga.events) if e.type == "sent"),
            s.updated_at,
        )
        parts = [f"waiting in {topic or s.step or s.name} for {_ago(now - since)}"]
        if s.step:
            parts[0] += f" (step {s.step})"
        on_topic = [m for m in story.messages if topic is not None and m.topic == topic]
        attempts = max([m.attempts for m in on_topic] or [0])
        dead = [d for d in story.dead_letters if topic is not None and d.topic == topic]
        if dead:
            attempts = max(attempts, dead[-1].attempts)
        if attempts:
            parts.append(f"{attempts} attempt{'s' if attempts != 1 else ''}")
        last_error = next((m.last_error for m in reversed(on_topic) if m.last_error), "")
        if dead:
            parts.append(f"dead-lettered ({_short(dead[-1].error_type) or dead[-1].reason})")
        elif last_error:
            parts.append(f"last error {_short(last_error)}")
        if s.stuck:
            parts.append("past its deadline")
        for b in story.breakers:
            if (
                b.state != "CLOSED"
                and topic is not None
                and any(g.startswith(f"{topic}/") for g in b.guards)
            ):
                state = "open" if b.state == "OPEN" else "half-open"
                until = f" until {_clock_time(b.open_until)}" if b.open_until else ""
                parts.append(f"circuit {b.name} {state}{until}")
        return ", ".join(parts)
    if story.dead_letters:
        d = story.dead_letters[-1]
        return (
            f"dead in {d.topic} (group {d.group}) after {d.attempts} attempts: "
            f"{_short(d.error_type) or d.reason}"
        )
    if story.job is not None:
        j = story.job
        extra = f": {j.error}" if j.error else ""
        return f"job {j.kind} {j.id} {j.status.lower()}{extra}"
    if story.messages:
        m = story.messages[-1]
        where = f" by {', '.join(m.groups)}" if m.groups else ""
        error = f", last error {_short(m.last_error)}" if m.last_error else ""
        return f"message on {m.topic}: {m.last_event}{where}, {m.attempts} attempts{error}"
    return f"nothing is known of {story.query!r} (unknown, or older than the journal keeps)"


async def _redis_jobs(
    store: object, status: str | None, kind: str | None, limit: int, after: str | None
) -> tuple[list[JobRecord], str | None]:
    """A page of a Redis job store: a SCAN of its job keys (``after`` is the
    SCAN cursor), filtered; Redis keeps no order to page by."""
    from conveyor.http.redis_jobs import RedisJobStore

    if not isinstance(store, RedisJobStore):
        return [], None
    client = store.client
    prefix = f"conveyor:{{{store.namespace}}}:job:"
    cursor = int(after or 0)
    found: list[JobRecord] = []
    rounds = 0
    while True:
        cursor, keys = await client.scan(cursor=cursor, match=f"{prefix}*", count=200)
        for key in keys:
            name = key.decode() if isinstance(key, bytes) else str(key)
            record = await store.get(name[len(prefix) :])
            if record is None or (kind and record.kind != kind):
                continue
            if status is not None and record.status != status:
                continue
            found.append(record)
        rounds += 1
        if cursor == 0 or len(found) >= limit or rounds >= 50:
            break
    found.sort(key=lambda r: r.id, reverse=True)
    return found[:limit], None if cursor == 0 else str(cursor)


async def _redis_idempotency(store: object, key: str) -> list[str]:
    from conveyor.http.redis_jobs import RedisJobStore

    if not isinstance(store, RedisJobStore):
        return []
    client = store.client
    pattern = f"conveyor:{{{store.namespace}}}:idem:*:{_glob_escape(key)}"
    out: list[str] = []
    async for name in client.scan_iter(match=pattern, count=500):
        value = await client.hget(name, "response")
        if value:
            out.append(value.decode() if isinstance(value, bytes) else str(value))
        if len(out) >= 5:
            break
    return out


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def selection_of(values: Mapping[str, Any]) -> Selection:
    """A ``Selection`` from form or query values (the dashboard's forms)."""
    return Selection.model_validate({k: v for k, v in values.items() if v not in (None, "")})
