"""A saga instance's state and the append-only event log it is folded from.

The orchestrator never edits a ``SagaRecord`` directly: it decides events,
appends them to the log and stores ``apply``'s result, in one transaction.
So ``rebuild(events)`` gives back the stored record, and the log is what the
CLI and the API show.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "ACTIVE",
    "COMPENSATED",
    "COMPENSATING",
    "COMPLETED",
    "FAILED",
    "RUNNING",
    "STATES",
    "TERMINAL",
    "SagaEvent",
    "SagaRecord",
    "apply",
    "rebuild",
]

RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED = (
    "RUNNING",
    "COMPENSATING",
    "COMPLETED",
    "COMPENSATED",
    "FAILED",
)
STATES = (RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED)
ACTIVE = (RUNNING, COMPENSATING)
TERMINAL = (COMPLETED, COMPENSATED, FAILED)


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaEvent:
    """One entry of a saga's history.

    ``type`` is one of: ``started``, ``sent`` (a command, or a local call,
    for ``phase`` "action" or "compensation"), ``succeeded``, ``failed`` (a
    step; ``timed_out`` when no reply came), ``compensated``,
    ``compensation_failed``, ``ignored`` (a duplicate or late reply: no change),
    ``completed``, ``saga_compensated``, ``saga_failed`` (its compensation
    command is dead-lettered), ``resumed`` (that dead letter was replayed).
    """

    seq: int
    type: str
    at: float
    step: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaRecord:
    """A saga instance as stored.

    ``done`` counts the leading steps whose action succeeded; while
    compensating, ``undo`` is the index of the next step to undo (downward).
    ``token`` names the request awaited (a reply carrying another token is
    ignored); ``deadline`` is when that wait times out.
    """

    id: str
    name: str
    version: int
    state: str
    phase: str
    step: int
    done: int
    undo: int
    attempt: int
    token: str | None
    deadline: float | None
    data: Mapping[str, Any]
    error: str
    seq: int
    created_at: float
    updated_at: float

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def _blank(saga_id: str) -> SagaRecord:
    return SagaRecord(
        id=saga_id,
        name="",
        version=0,
        state="",
        phase="",
        step=-1,
        done=0,
        undo=-1,
        attempt=0,
        token=None,
        deadline=None,
        data={},
        error="",
        seq=0,
        created_at=0.0,
        updated_at=0.0,
    )


def apply(record: SagaRecord, event: SagaEvent) -> SagaRecord:
    """The record after ``event``: the only way a saga's state changes."""
    d = event.detail
    r = replace(record, seq=event.seq)
    match event.type:
        case "started":
            return replace(
                r,
                name=str(d["name"]),
                version=int(d["version"]),
                state=RUNNING,
                phase="action",
                data=dict(d["data"]),
                created_at=event.at,
                updated_at=event.at,
            )
        case "sent":
            phase = str(d["phase"])
            return replace(
                r,
                state=RUNNING if phase == "action" else COMPENSATING,
                phase=phase,
                step=int(d["index"]),
                attempt=int(d["attempt"]),
                token=str(d["token"]),
                deadline=None if d.get("deadline") is None else float(d["deadline"]),
                updated_at=event.at,
            )
        case "succeeded":
            return replace(
                r,
                data={**r.data, **dict(d.get("data") or {})},
                done=int(d["index"]) + 1,
                attempt=0,
                token=None,
                deadline=None,
                updated_at=event.at,
            )
        case "failed":
            index = int(d["index"])
            # A step that timed out may have acted: undo it too.
            return replace(
                r,
                state=COMPENSATING,
                phase="compensation",
                undo=index if d.get("timed_out") else index - 1,
                attempt=0,
                token=None,
                deadline=None,
                error=str(d.get("reason", "")),
                updated_at=event.at,
            )
        case "compensated":
            return replace(
                r,
                state=COMPENSATING,
                undo=int(d["index"]) - 1,
                attempt=0,
                token=None,
                deadline=None,
                updated_at=event.at,
            )
        case "compensation_failed":
            return replace(r, token=None, deadline=None, updated_at=event.at)
        case "completed":
            return replace(r, state=COMPLETED, phase="", token=None, updated_at=event.at)
        case "saga_compensated":
            return replace(r, state=COMPENSATED, phase="", token=None, updated_at=event.at)
        case "saga_failed":
            # The token of the dead-lettered compensation stays: replaying it
            # from the dead-letter queue resumes the compensation.
            return replace(
                r,
                state=FAILED,
                token=None if d.get("token") is None else str(d["token"]),
                deadline=None,
                error=str(d.get("reason", "")),
                updated_at=event.at,
            )
        case _:  # "ignored" and anything informational
            return r


def rebuild(saga_id: str, events: Iterable[SagaEvent]) -> SagaRecord:
    """Fold a saga's history into its state."""
    record = _blank(saga_id)
    for event in events:
        record = apply(record, event)
    return record
