"""Resilience primitives, usable on their own; no broker imports here."""

from conveyor.resilience._breaker import BreakerState, CircuitBreaker, CountWindow, TimeWindow
from conveyor.resilience._budget import RetryBudget
from conveyor.resilience._bulkhead import Bulkhead
from conveyor.resilience._call_retry import Attempt, retry, retrying
from conveyor.resilience._limiter import Limiter, RateLimiter, parse_rate
from conveyor.resilience._retry import RetryPolicy
from conveyor.resilience._shed import LoadShedder
from conveyor.resilience._timeout import Timeout, timeout

__all__ = [
    "Attempt",
    "BreakerState",
    "Bulkhead",
    "CircuitBreaker",
    "CountWindow",
    "Limiter",
    "LoadShedder",
    "RateLimiter",
    "RetryBudget",
    "RetryPolicy",
    "TimeWindow",
    "Timeout",
    "parse_rate",
    "retry",
    "retrying",
    "timeout",
]
