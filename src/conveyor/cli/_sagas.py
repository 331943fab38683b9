"""``conveyor sagas list|show``: saga instances and their history, read from the store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from conveyor.cli._output import fit, styled, when
from conveyor.errors import ConfigError
from conveyor.sagas import (
    STATES,
    SagaEvent,
    SagaRecord,
    list_sagas,
    load_events,
    load_saga,
    rebuild,
)
from conveyor.sagas._tables import create_tables
from conveyor.sagas._timeline import StepSpan, spans
from conveyor.store import Store, store_from_url

__all__ = [
    "SagaView",
    "StepSpan",
    "fetch_saga",
    "fetch_sagas",
    "list_table",
    "parse_states",
    "record_json",
    "saga_json",
    "spans",
    "spans_table",
    "summary_table",
    "timeline_table",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaView:
    """One saga as ``show`` prints it: the stored record, its history, and
    whether folding the history gives back the record."""

    record: SagaRecord
    events: list[SagaEvent]
    step_names: list[str]

    @property
    def consistent(self) -> bool:
        return rebuild(self.record.id, self.events) == self.record


def parse_states(values: Sequence[str]) -> list[str]:
    """``values`` as saga states (any case); an unknown one is a ``ConfigError``."""
    states = []
    for value in values:
        state = value.strip().upper()
        if state not in STATES:
            raise ConfigError(
                f"unknown saga state {value!r}; use one of {', '.join(STATES)} (--state, repeatable)"
            )
        states.append(state)
    return states


async def _open(url: str) -> Store:
    store = store_from_url(url)
    await store.connect()
    return store


async def fetch_sagas(
    url: str, *, states: Sequence[str], name: str | None, limit: int
) -> tuple[list[SagaRecord], dict[str, list[str]]]:
    """Sagas on the store at ``url``, newest first, with each one's step names."""
    store = await _open(url)
    try:
        records = await list_sagas(store, states=states, name=name, limit=limit)
        names: dict[str, list[str]] = {}
        if records:
            marks = ", ".join("?" * len(records))
            async with store.transaction() as tx:
                rows = await tx.fetchall(
                    "SELECT saga_id, detail FROM conveyor_saga_events "
                    f"WHERE type = 'started' AND saga_id IN ({marks})",
                    [r.id for r in records],
                )
            names = {str(row[0]): _steps_of(json.loads(row[1])) for row in rows}
    finally:
        await store.close()
    return records, names


async def fetch_saga(url: str, saga_id: str) -> SagaView | None:
    """One saga and its history from the store at ``url``; None if unknown."""
    store = await _open(url)
    try:
        async with store.transaction() as tx:
            await create_tables(tx)
            record = await load_saga(tx, saga_id)
            events = await load_events(tx, saga_id)
    finally:
        await store.close()
    if record is None:
        return None
    started = next((e for e in events if e.type == "started"), None)
    names = _steps_of(started.detail) if started is not None else []
    return SagaView(record=record, events=events, step_names=names)


def _steps_of(detail: Any) -> list[str]:
    steps = detail.get("steps") if isinstance(detail, dict) else None
    return [str(s) for s in steps] if isinstance(steps, list) else []


def _span(value: float) -> str:
    """A duration for people: 850ms, 4.2s, 3m05s, 2h10m, 3d4h."""
    value = max(value, 0.0)
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def _current(record: SagaRecord, names: Sequence[str]) -> str:
    """The step a saga is at and in which phase; blank once it has nothing left to do."""
    if not record.phase or record.step < 0 or record.state in ("COMPLETED", "COMPENSATED"):
        return ""
    name = names[record.step] if record.step < len(names) else f"#{record.step}"
    return f"{name} ({record.phase})"


_STATE_STYLE = {
    "RUNNING": "cyan",
    "COMPENSATING": "yellow",
    "COMPLETED": "green",
    "COMPENSATED": "magenta",
    "FAILED": "bold red",
}


def _state(state: str) -> Text:
    return styled(state, _STATE_STYLE.get(state, ""))


def list_table(records: Sequence[SagaRecord], names: dict[str, list[str]], *, now: float) -> Table:
    table = Table(title=f"Sagas ({len(records)})")
    for col in ("id", "name", "version", "state", "step", "attempt", "age", "updated", "error"):
        table.add_column(col, justify="right" if col in ("version", "attempt", "age") else "left")
    for r in records:
        current = _current(r, names.get(r.id, []))
        table.add_row(
            r.id,
            r.name,
            str(r.version),
            _state(r.state),
            current,
            str(r.attempt) if current and r.attempt else "",
            _span(now - r.created_at),
            when(r.updated_at),
            fit(r.error, 60),
        )
    return table


def record_json(record: SagaRecord, names: Sequence[str]) -> dict[str, object]:
    out = asdict(record)
    out["data"] = dict(record.data)
    out["current"] = _current(record, names)
    return out


def _details(event: SagaEvent) -> str:
    d = event.detail
    parts: list[str] = []
    match event.type:
        case "started":
            parts.append(f"v{d.get('version', '?')}")
            steps = _steps_of(d)
            if steps:
                parts.append("steps " + " > ".join(steps))
        case "sent":
            parts.append(str(d.get("phase", "")))
            parts.append(f"attempt {d.get('attempt', '?')}")
            parts.append(f"to={d.get('to', '?')}")
            if d.get("delay"):
                parts.append(f"after {_span(float(d['delay']))}")
            if d.get("deadline") is not None:
                parts.append(
                    f"timeout {_span(float(d['deadline']) - event.at - float(d.get('delay') or 0))}"
                )
        case "succeeded":
            data = d.get("data") or {}
            if data:
                parts.append("data " + ", ".join(str(k) for k in data))
        case "failed":
            if d.get("timed_out"):
                parts.append("timed out")
            if d.get("reason"):
                parts.append(f"reason: {d['reason']}")
        case "compensation_failed":
            parts.append(f"attempt {d.get('attempt', '?')}")
            if d.get("timed_out"):
                parts.append("timed out")
            if d.get("reason"):
                parts.append(f"reason: {d['reason']}")
        case "ignored":
            parts.append(f"ignored: {d.get('reason', 'stale')}")
        case "saga_failed":
            parts.append("dead-lettered")
            if d.get("reason"):
                parts.append(f"reason: {d['reason']}")
        case "resumed":
            parts.append("dead letter replayed")
    return ", ".join(p for p in parts if p)


def _offset(event: SagaEvent, start: float) -> str:
    return f"+{_span(event.at - start)}"


def timeline_table(view: SagaView) -> Table:
    table = Table(title=f"History of saga {view.record.id}")
    for col in ("#", "at", "event", "step", "details"):
        table.add_column(col, justify="right" if col in ("#", "at") else "left")
    start = view.events[0].at if view.events else view.record.created_at
    for e in view.events:
        style = {"failed": "red", "compensation_failed": "red", "saga_failed": "bold red"}.get(
            e.type, "dim" if e.type == "ignored" else ""
        )
        table.add_row(
            str(e.seq),
            _offset(e, start),
            styled(e.type, style),
            e.step,
            _details(e),
        )
    return table


def spans_table(view: SagaView) -> Table:
    table = Table(title="Steps")
    for col in ("step", "phase", "outcome", "duration", "requests"):
        table.add_column(col, justify="right" if col in ("duration", "requests") else "left")
    for s in spans(view.events):
        table.add_row(
            s.step,
            s.phase,
            s.outcome,
            "" if s.ended_at is None else _span(s.ended_at - s.sent_at),
            str(s.requests),
        )
    return table


def summary_table(view: SagaView, *, now: float) -> Table:
    r = view.record
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("saga", f"{r.id}  {r.name} v{r.version}")
    table.add_row("state", _state(r.state))
    current = _current(r, view.step_names)
    if current:
        table.add_row("step", f"{current}, attempt {r.attempt}")
    table.add_row("started", f"{when(r.created_at)} ({_span(now - r.created_at)} ago)")
    table.add_row("updated", when(r.updated_at))
    if r.error:
        table.add_row("error", r.error)
    table.add_row("data", json.dumps(dict(r.data), sort_keys=True, default=str))
    return table


def saga_json(view: SagaView) -> dict[str, object]:
    start = view.events[0].at if view.events else view.record.created_at
    return {
        "saga": record_json(view.record, view.step_names),
        "consistent": view.consistent,
        "events": [
            {
                "seq": e.seq,
                "type": e.type,
                "step": e.step,
                "at": e.at,
                "offset": round(e.at - start, 6),
                "detail": dict(e.detail),
            }
            for e in view.events
        ],
        "steps": [asdict(s) for s in spans(view.events)],
    }
