"""The event loop a Conveyor process runs on: ``event_loop`` in the
settings (``CONVEYOR_EVENT_LOOP``). ``auto`` takes uvloop when it is
installed (the ``http`` extra's ``uvicorn[standard]`` brings it, and
``conveyor serve`` already runs on it through uvicorn) and asyncio's own
otherwise; ``uvloop`` insists on it; ``asyncio`` never uses it."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from conveyor.errors import ConfigError

__all__ = ["EventLoop", "loop_factory", "run"]

T = TypeVar("T")

EventLoop = Literal["auto", "asyncio", "uvloop"]


def loop_factory(choice: EventLoop = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop ``choice`` names (None: asyncio's default)."""
    if choice == "asyncio":
        return None
    if importlib.util.find_spec("uvloop") is None:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop=uvloop (CONVEYOR_EVENT_LOOP) but uvloop is not installed: "
                "pip install uvloop, or use auto"
            )
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: EventLoop = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
