"""Conveyor: reliable asynchronous operations between services."""

from conveyor._time import Clock
from conveyor.errors import (
    CircuitOpen,
    ConfigError,
    ConveyorError,
    DeadLetter,
    Overloaded,
    PermanentError,
    Retry,
    Skip,
)
from conveyor.messages import Message
from conveyor.resilience import Bulkhead, CircuitBreaker, RateLimiter, RetryBudget, RetryPolicy
from conveyor.runtime import App, Context, Middleware, Session, Worker
from conveyor.settings import Settings

__all__ = [
    "App",
    "Bulkhead",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "ConfigError",
    "Context",
    "ConveyorError",
    "DeadLetter",
    "Message",
    "Middleware",
    "Overloaded",
    "PermanentError",
    "RateLimiter",
    "Retry",
    "RetryBudget",
    "RetryPolicy",
    "Session",
    "Settings",
    "Skip",
    "Worker",
]
__version__ = "0.1.0"
