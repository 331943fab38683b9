"""Conveyor: reliable asynchronous operations between services."""

from conveyor.errors import (
    ConfigError,
    ConveyorError,
    DeadLetter,
    PermanentError,
    Retry,
    Skip,
)
from conveyor.messages import Message
from conveyor.resilience import RetryPolicy
from conveyor.runtime import App, Context, Middleware, Session, Worker
from conveyor.settings import Settings

__all__ = [
    "App",
    "ConfigError",
    "Context",
    "ConveyorError",
    "DeadLetter",
    "Message",
    "Middleware",
    "PermanentError",
    "Retry",
    "RetryPolicy",
    "Session",
    "Settings",
    "Skip",
    "Worker",
]
__version__ = "0.1.0"
