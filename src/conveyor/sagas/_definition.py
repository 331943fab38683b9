"""What a saga is: a name, a version and an ordered list of steps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import Any

from conveyor._time import seconds
from conveyor.errors import ConfigError
from conveyor.resilience import RetryPolicy
from conveyor.runtime import Context

__all__ = ["LocalCall", "Saga", "Step"]

LocalCall = Callable[[Context, dict[str, Any]], Awaitable[Mapping[str, Any] | None]]
"""``async def f(ctx, data) -> dict | None``: a step run by the orchestrator
itself, in the transaction that records its outcome."""

_NO_RETRY = RetryPolicy(max_attempts=1)
_COMPENSATION_RETRY = RetryPolicy(max_attempts=8, base_delay=1.0, max_delay=60.0)


@dataclass(frozen=True, slots=True)
class Step:
    """One step: an action and, optionally, the compensation that undoes it.

    The action is either a command sent to ``command`` (a participant replies)
    or a local call ``action``; the same for ``compensation`` /
    ``compensate``. A step with neither compensation needs no undoing (say,
    sending a receipt).

    ``timeout`` bounds how long the orchestrator waits for a reply. A step
    that times out is sent again while ``retry`` allows (the participant
    answers a repeated command with its first reply, never acting twice), then
    counts as failed *and possibly done*, so its own compensation runs too.
    A failure reply means the participant did nothing: only the steps before
    it are compensated. A compensation that fails or times out is sent again
    on ``compensation_retry``'s schedule; when that gives up the saga is
    FAILED and the compensation command is dead-lettered with the saga id.
    """

    name: str
    _: KW_ONLY
    command: str | None = None
    action: LocalCall | None = None
    compensation: str | None = None
    compensate: LocalCall | None = None
    timeout: float | timedelta | None = None
    retry: RetryPolicy = _NO_RETRY
    compensation_timeout: float | timedelta | None = None
    compensation_retry: RetryPolicy = _COMPENSATION_RETRY

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a saga step needs a name")
        if (self.command is None) == (self.action is None):
            raise ConfigError(f"step {self.name!r}: give exactly one of command= or action=")
        if self.compensation is not None and self.compensate is not None:
            raise ConfigError(
                f"step {self.name!r}: give at most one of compensation= or compensate="
            )
        for attr in ("timeout", "compensation_timeout"):
            value = getattr(self, attr)
            if value is not None:
                if seconds(value) <= 0:
                    raise ConfigError(f"step {self.name!r}: {attr} must be > 0 seconds")
                object.__setattr__(self, attr, seconds(value))

    @property
    def compensable(self) -> bool:
        return self.compensation is not None or self.compensate is not None

    def timeout_for(self, phase: str) -> float | None:
        value = self.timeout if phase == "action" else self.compensation_timeout
        return None if value is None else seconds(value)

    def target(self, phase: str) -> str | None:
        """The command topic of ``phase`` ("action" or "compensation"); None if local."""
        return self.command if phase == "action" else self.compensation

    def local(self, phase: str) -> LocalCall | None:
        return self.action if phase == "action" else self.compensate

    def policy(self, phase: str) -> RetryPolicy:
        return self.retry if phase == "action" else self.compensation_retry


@dataclass(frozen=True, slots=True)
class Saga:
    """A named, versioned, ordered list of steps.

    Instances remember the version they started with; change the steps under
    a new version and keep the old definition registered until its instances
    have finished.
    """

    name: str
    _: KW_ONLY
    steps: Sequence[Step]
    version: int = 1
    step_index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in " /*>"):
            raise ConfigError(
                f"saga name {self.name!r} must be a non-empty word (no spaces, /, *, >)"
            )
        if not self.steps:
            raise ConfigError(f"saga {self.name!r} has no steps")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ConfigError(f"saga {self.name!r} has two steps with one name")
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "step_index", {n: i for i, n in enumerate(names)})

    @property
    def topic(self) -> str:
        """Where replies, timeouts and local-step calls for this saga go."""
        return f"saga.{self.name}"
