"""How long each step of a saga took, read from its history (the CLI's
``sagas show`` and the console's timeline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.sagas._history import SagaEvent

__all__ = ["StepSpan", "spans"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSpan:
    """How long one phase of one step took, from its first request to its outcome."""

    step: str
    phase: str
    sent_at: float
    ended_at: float | None
    outcome: str
    requests: int


def spans(events: Sequence[SagaEvent]) -> list[StepSpan]:
    """Per step and phase, in the order they began: the first request, the
    outcome and how many requests it took (resends and retries included)."""
    order: list[tuple[str, str]] = []
    first: dict[tuple[str, str], float] = {}
    ended: dict[tuple[str, str], tuple[float, str]] = {}
    requests: dict[tuple[str, str], int] = {}
    for e in events:
        if e.type == "sent":
            key = (e.step, str(e.detail.get("phase", "")))
            if key not in first:
                order.append(key)
                first[key] = e.at
            requests[key] = requests.get(key, 0) + 1
            continue
        outcome = {
            "succeeded": ("action", "succeeded"),
            "failed": ("action", "timed out" if e.detail.get("timed_out") else "failed"),
            "compensated": ("compensation", "compensated"),
            "saga_failed": ("compensation", "gave up"),
        }.get(e.type)
        if outcome is not None:
            ended[(e.step, outcome[0])] = (e.at, outcome[1])
    return [
        StepSpan(
            step=step,
            phase=phase,
            sent_at=first[(step, phase)],
            ended_at=ended[(step, phase)][0] if (step, phase) in ended else None,
            outcome=ended[(step, phase)][1] if (step, phase) in ended else "waiting",
            requests=requests[(step, phase)],
        )
        for step, phase in order
    ]
