"""The runtime: ``App``, handler contexts, the worker and middleware."""

from conveyor.runtime._admin import (
    QueueRow,
    iter_dead_letters,
    purge_dead_letters,
    queue_overview,
    replay_dead_letters,
)
from conveyor.runtime._app import App
from conveyor.runtime._context import Context, Middleware, PublishOptions, Session
from conveyor.runtime._handlers import HandlerOptions
from conveyor.runtime._journal import Journal
from conveyor.runtime._observe import DeadLettered, Observer, Settlement
from conveyor.runtime._worker import Worker

__all__ = [
    "App",
    "Context",
    "DeadLettered",
    "HandlerOptions",
    "Journal",
    "Middleware",
    "Observer",
    "PublishOptions",
    "QueueRow",
    "Session",
    "Settlement",
    "Worker",
    "iter_dead_letters",
    "purge_dead_letters",
    "queue_overview",
    "replay_dead_letters",
]
