"""The event loop a Conveyor process runs on: ``event_loop`` in the
settings (``CONVEYOR_EVENT_LOOP``). ``asyncio`` (the default) is asyncio's
own; ``uvloop`` insists on uvloop; ``auto`` takes it when installed (the
``http`` extra's ``uvicorn[standard]`` brings it; ``conveyor serve`` runs on
it through uvicorn in any case). asyncio is the default because uvloop
measured no faster for a worker (its time goes to Python per message, see
docs/benchmarks.md) and reports a lost connection differently (a
``RuntimeError``), which drivers' error handling does not all expect.

``kill -USR1`` on such a process writes every task's stack to stderr
(``dump_tasks``): where a worker that stopped making progress waits."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TextIO, TypeVar

from conveyor.errors import ConfigError

__all__ = ["EventLoop", "dump_tasks", "loop_factory", "run"]

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
        loop = runner.get_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        return runner.run(main)


def dump_tasks(file: TextIO | None = None) -> None:
    """Write what every task of the running loop is waiting on (its name
    and stack) to ``file`` (stderr): what ``kill -USR1`` on a worker shows,
    the way a JVM thread dump shows a stuck server."""
    out = file or sys.stderr
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    print(f"--- {len(tasks)} task(s), pid {os.getpid()}", file=out)
    for task in tasks:
        print(f"task {task.get_name()}:", file=out)
        for where in _awaiting(task.get_coro()):
            print(f"    {where}", file=out)
    out.flush()


def _awaiting(awaitable: object, depth: int = 64) -> list[str]:
    """The chain of frames a suspended coroutine waits in, outermost first
    (``Task.get_stack`` shows only the outermost), ending with what it
    awaits when that is not a coroutine (a future, an event)."""
    chain: list[str] = []
    while awaitable is not None and len(chain) < depth:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            chain.append(f"awaiting {awaitable!r:.200}")
            break
        code = frame.f_code
        chain.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    return chain
