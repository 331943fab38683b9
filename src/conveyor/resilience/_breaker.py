"""The circuit breaker: closed, open, half-open, over a sliding window."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import ParamSpec, TypeVar, cast

from conveyor._time import Clock, SystemClock, seconds
from conveyor.errors import CircuitOpen, ConfigError, HandlerSignal

__all__ = ["BreakerState", "CircuitBreaker", "CountWindow", "TimeWindow"]

log = logging.getLogger("conveyor.resilience")

P = ParamSpec("P")
T = TypeVar("T")


class BreakerState(enum.Enum):
    """Where a breaker is; ``value`` is a gauge a metrics exporter can publish."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


_CLOSED, _HALF_OPEN, _OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


@dataclass(frozen=True, slots=True)
class CountWindow:
    """Judge the last ``size`` recorded calls."""

    size: int = 100

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"CountWindow size must be >= 1, got {self.size}")


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Judge the calls recorded in the last ``duration`` (seconds or
    ``timedelta``), kept in ``buckets`` equal slices: a call leaves the window
    whole slices at a time, so the window spans between
    ``duration * (1 - 1/buckets)`` and ``duration``."""

    duration: float | timedelta = 60.0
    buckets: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "duration", seconds(self.duration))
        if seconds(self.duration) <= 0:
            raise ConfigError(f"TimeWindow duration must be > 0 seconds, got {self.duration}")
        if self.buckets < 1:
            raise ConfigError(f"TimeWindow buckets must be >= 1, got {self.buckets}")


class _Counts:
    """Calls, failures and slow calls in the window; O(1) per record, no
    allocation after construction."""

    __slots__ = ("calls", "failures", "slow")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        raise NotImplementedError

    def expire(self, now: float) -> None:
        """Drop what has left the window by ``now``."""

    def reset(self) -> None:
        raise NotImplementedError


class _CountRing(_Counts):
    __slots__ = ("_next", "_ring", "_size")

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        # 0 success, 1 failure, 2 slow success, 3 slow failure; -1 empty.
        self._ring = [-1] * size
        self._next = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        old = self._ring[self._next]
        if old >= 0:
            self.calls -= 1
            self.failures -= old & 1
            self.slow -= old >> 1
        self._ring[self._next] = failed | (slow << 1)
        self._next = (self._next + 1) % self._size
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def reset(self) -> None:
        self._ring = [-1] * self._size
        self._next = 0
        self.calls = self.failures = self.slow = 0


class _TimeBuckets(_Counts):
    __slots__ = ("_b_calls", "_b_failures", "_b_slow", "_head", "_n", "_width")

    def __init__(self, window: TimeWindow) -> None:
        super().__init__()
        self._n = window.buckets
        self._width = seconds(window.duration) / window.buckets
        self._b_calls = [0] * self._n
        self._b_failures = [0] * self._n
        self._b_slow = [0] * self._n
        self._head = -1  # index (time // width) of the newest slice

    def expire(self, now: float) -> None:
        index = math.floor(now / self._width)
        if index <= self._head:
            return
        # Clear the slices between the newest one and now; at most n of them.
        start = max(self._head + 1, index - self._n + 1)
        for i in range(start, index + 1):
            slot = i % self._n
            self.calls -= self._b_calls[slot]
            self.failures -= self._b_failures[slot]
            self.slow -= self._b_slow[slot]
            self._b_calls[slot] = self._b_failures[slot] = self._b_slow[slot] = 0
        self._head = index

    def add(self, failed: bool, slow: bool, now: float) -> None:
        self.expire(now)
        slot = self._head % self._n
        self._b_calls[slot] += 1
        self._b_failures[slot] += failed
        self._b_slow[slot] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def reset(self) -> None:
        for counts in (self._b_calls, self._b_failures, self._b_slow):
            counts[:] = [0] * self._n
        self.calls = self.failures = self.slow = 0


# Never a verdict on the dependency: control signals of a handler, and another
# breaker's refusal (breakers nest).
_NEUTRAL: tuple[type[BaseException], ...] = (HandlerSignal, CircuitOpen)

Listener = Callable[[BreakerState, BreakerState], object]


class CircuitBreaker:
    """Stops calling a dependency that is failing, and probes it before
    trusting it again.

    CLOSED: calls go through; each outcome is recorded in ``window``. Once the
    window holds at least ``minimum_calls`` outcomes and the share of failures
    reaches ``failure_rate`` (or the share of calls that took at least
    ``slow_call_duration`` reaches ``slow_call_rate``), the breaker opens.
    OPEN: every call fails fast with ``CircuitOpen`` (its ``retry_after`` says
    when a probe is allowed) for ``open_for``. HALF_OPEN: the first call after
    that starts ``half_open_calls`` probes; more concurrent calls are
    rejected; once all probes have finished, the same thresholds applied to
    them close the breaker (with an empty window) or open it again.

    An exception counts as a failure when it is an instance of ``record`` and
    not of ``ignore``; otherwise it is neither success nor failure (a
    half-open probe ending so gives its slot back). Handler signals
    (``Retry``, ``Skip``, ``DeadLetter``), another breaker's ``CircuitOpen``
    and cancellation are never counted. An outcome reported after the state
    changed (a slow call that started before the breaker opened) is not
    judged. Durations are seconds or ``timedelta``, read on ``clock``.

    Use it as ``@breaker`` on an async function (a rejected call awaits
    ``fallback(exc)`` and returns its result when a fallback is set) or as
    ``async with breaker:``. Not thread-safe: one event loop per breaker.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_rate: float = 0.5,
        slow_call_rate: float = 1.0,
        slow_call_duration: float | timedelta = 60.0,
        window: CountWindow | TimeWindow | None = None,
        minimum_calls: int = 10,
        open_for: float | timedelta = 30.0,
        half_open_calls: int = 3,
        record: tuple[type[BaseException], ...] = (Exception,),
        ignore: tuple[type[BaseException], ...] = (),
        fallback: Callable[[CircuitOpen], Awaitable[object]] | None = None,
        clock: Clock | None = None,
    ) -> None:
        window = window if window is not None else CountWindow(100)
        for label, rate in (("failure_rate", failure_rate), ("slow_call_rate", slow_call_rate)):
            if not 0.0 < rate <= 1.0:
                raise ConfigError(f"breaker {name!r}: {label} must be in (0, 1], got {rate}")
        if minimum_calls < 1:
            raise ConfigError(f"breaker {name!r}: minimum_calls must be >= 1, got {minimum_calls}")
        if isinstance(window, CountWindow) and minimum_calls > window.size:
            raise ConfigError(
                f"breaker {name!r}: minimum_calls ({minimum_calls}) is larger than the "
                f"CountWindow ({window.size}), so it could never open; lower it or widen the window"
            )
        if half_open_calls < 1:
            raise ConfigError(
                f"breaker {name!r}: half_open_calls must be >= 1, got {half_open_calls}"
            )
        self.name = name
        self.failure_rate = failure_rate
        self.slow_call_rate = slow_call_rate
        self.slow_call_duration = seconds(slow_call_duration)
        self.open_for = seconds(open_for)
        if self.slow_call_duration <= 0 or self.open_for < 0:
            raise ConfigError(
                f"breaker {name!r}: slow_call_duration must be > 0 and open_for >= 0 seconds"
            )
        self.window = window
        self.minimum_calls = minimum_calls
        self.half_open_calls = half_open_calls
        self.record = record
        self.ignore = ignore
        self.fallback = fallback
        self.clock: Clock = clock or SystemClock()
        self._now = self.clock.monotonic

        # Metrics: monotonic counters and the state gauge, read by exporters.
        self.calls = 0
        """Calls let through (probes included)."""
        self.successes = 0
        self.failures = 0
        self.slow_calls = 0
        self.ignored = 0
        """Calls whose outcome was not counted (ignored error, signal, cancellation)."""
        self.rejections = 0
        """Calls refused with ``CircuitOpen``."""
        self.opened = 0
        """Times the breaker opened."""

        self._state = _CLOSED
        self._epoch = 0  # bumped on every transition; stale outcomes are not judged
        self._window: _Counts = (
            _CountRing(window.size) if isinstance(window, CountWindow) else _TimeBuckets(window)
        )
        self._opened_at = 0.0
        self._probes = 0  # half-open slots taken
        self._probe_calls = 0
        self._probe_failures = 0
        self._probe_slow = 0
        self._listeners: list[Listener] = []
        self._waiters: set[asyncio.Future[None]] = set()
        self._started: contextvars.ContextVar[tuple[float, int, object] | None] = (
            contextvars.ContextVar(f"conveyor_breaker_{name}", default=None)
        )

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state.name}>"

    @property
    def state(self) -> BreakerState:
        """The current state; OPEN turns HALF_OPEN on the first look after
        ``open_for`` has passed."""
        if self._state is _OPEN and self.clock.monotonic() >= self._opened_at + self.open_for:
            self._transition(_HALF_OPEN)
        return self._state

    @property
    def retry_after(self) -> float:
        """Seconds until a call may be let through: 0 when closed or a probe
        slot is free, the rest of ``open_for`` when open."""
        state = self.state
        if state is _OPEN:
            return max(0.0, self._opened_at + self.open_for - self.clock.monotonic())
        return 0.0

    @property
    def admits(self) -> bool:
        """Whether a call made now would be let through (nothing is taken)."""
        state = self.state
        return state is _CLOSED or (state is _HALF_OPEN and self._probes < self.half_open_calls)

    @property
    def window_counts(self) -> tuple[int, int, int]:
        """(calls, failures, slow calls) currently in the closed-state window."""
        self._window.expire(self.clock.monotonic())
        return self._window.calls, self._window.failures, self._window.slow

    def on_change(self, callback: Listener) -> Listener:
        """Call ``callback(old, new)`` on every state change (usable as a
        decorator). A listener that raises is logged and does not affect the
        breaker."""
        self._listeners.append(callback)
        return callback

    def reset(self) -> None:
        """Close the breaker with an empty window (an operator's override)."""
        if self._state is not _CLOSED:
            self._transition(_CLOSED)
        else:
            self._window.reset()

    async def wait_ready(self) -> None:
        """Return once a call would be let through (see ``admits``), without
        taking a slot: sleeps on the breaker's clock until ``open_for`` has
        passed, and wakes early on any state change or freed probe slot."""
        loop = asyncio.get_running_loop()
        while not self.admits:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            delay = self.retry_after
            sleeper = asyncio.ensure_future(self.clock.sleep(delay)) if delay > 0 else None
            try:
                await asyncio.wait(
                    [waiter] if sleeper is None else [waiter, sleeper],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                self._waiters.discard(waiter)
                if sleeper is not None:
                    sleeper.cancel()

    def _acquire(self) -> tuple[float, int]:
        """Let a call through or raise ``CircuitOpen``; returns its start and epoch."""
        now = self._now()
        state = self._state
        if state is _OPEN:
            if now < self._opened_at + self.open_for:
                self.rejections += 1
                wait = self._opened_at + self.open_for - now
                raise CircuitOpen(
                    f"circuit {self.name!r} is open; a probe is allowed in {wait:.3f}s",
                    breaker=self.name,
                    retry_after=wait,
                )
            self._transition(_HALF_OPEN)
            state = _HALF_OPEN
        if state is _HALF_OPEN:
            if self._probes >= self.half_open_calls:
                self.rejections += 1
                raise CircuitOpen(
                    f"circuit {self.name!r} is half-open and all {self.half_open_calls} "
                    "probe(s) are in flight",
                    breaker=self.name,
                    retry_after=0.0,
                )
            self._probes += 1
        self.calls += 1
        return now, self._epoch

    def _verdict(self, exc: BaseException | None) -> bool | None:
        """Whether ``exc`` ends a call as a failure; None when it does not count."""
        if exc is None:
            return False
        if (
            isinstance(exc, self.record)
            and not isinstance(exc, self.ignore)
            and not isinstance(exc, _NEUTRAL)
        ):
            return True
        return None

    def _release(self, start: float, epoch: int, exc: BaseException | None) -> None:
        """Record the outcome of a call let through at ``start`` in ``epoch``."""
        failed = False if exc is None else self._verdict(exc)
        if failed is None:
            self.ignored += 1
            if epoch == self._epoch and self._state is _HALF_OPEN:
                self._probes -= 1
                self._wake()
            return
        now = self._now()
        slow = now - start >= self.slow_call_duration
        if failed:
            self.failures += 1
        else:
            self.successes += 1
        if slow:
            self.slow_calls += 1
        if epoch != self._epoch:
            return
        if self._state is _CLOSED:
            counts = self._window
            counts.add(failed, slow, now)
            if counts.calls >= self.minimum_calls and self._tripped(
                counts.calls, counts.failures, counts.slow
            ):
                self._transition(_OPEN)
        elif self._state is _HALF_OPEN:
            self._probe_calls += 1
            self._probe_failures += failed
            self._probe_slow += slow
            if self._probe_calls >= self.half_open_calls:
                tripped = self._tripped(self._probe_calls, self._probe_failures, self._probe_slow)
                self._transition(_OPEN if tripped else _CLOSED)

    def _tripped(self, calls: int, failures: int, slow: int) -> bool:
        return failures >= self.failure_rate * calls or slow >= self.slow_call_rate * calls

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        if new is _OPEN:
            self._opened_at = self.clock.monotonic()
            self.opened += 1
        elif new is _HALF_OPEN:
            self._probes = self._probe_calls = self._probe_failures = self._probe_slow = 0
        else:
            self._window.reset()
        log.log(
            logging.WARNING if new is _OPEN else logging.INFO,
            "circuit %s: %s -> %s",
            self.name,
            old.name,
            new.name,
            extra={"event": f"conveyor.circuit_{new.name.lower()}", "breaker": self.name},
        )
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                log.exception(
                    "listener of circuit %s failed",
                    self.name,
                    extra={"event": "conveyor.circuit_listener_failed", "breaker": self.name},
                )
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def __aenter__(self) -> None:
        start, epoch = self._acquire()
        self._started.set((start, epoch, self._started.get()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._started.get()
        if token is None:
            return
        start, epoch, outer = token
        self._started.set(cast("tuple[float, int, object] | None", outer))
        self._release(start, epoch, exc)

    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """Guard ``func``: ``@breaker`` on an ``async def``."""

        @functools.wraps(func)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                start, epoch = self._acquire()
            except CircuitOpen as exc:
                if self.fallback is None:
                    raise
                return cast(T, await self.fallback(exc))
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                self._release(start, epoch, exc)
                raise
            self._release(start, epoch, None)
            return result

        return guarded


async def admit(breakers: Sequence[CircuitBreaker], batch: int) -> int:
    """Wait until every breaker would let a call through; return how many
    messages to fetch: ``batch`` when all are closed, 1 (the probe) otherwise."""
    while not all(b.admits for b in breakers):
        for breaker in breakers:
            await breaker.wait_ready()
    return batch if all(b.state is _CLOSED for b in breakers) else 1


def through(
    breakers: Sequence[CircuitBreaker], func: Callable[P, Awaitable[T]]
) -> Callable[P, Awaitable[T]]:
    """``func`` called inside ``async with`` of each breaker (first = outermost);
    no fallback: a rejection raises ``CircuitOpen``."""
    if not breakers:
        return func

    @functools.wraps(func)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        async with contextlib.AsyncExitStack() as stack:
            for breaker in breakers:
                await stack.enter_async_context(breaker)
            return await func(*args, **kwargs)

    return guarded
