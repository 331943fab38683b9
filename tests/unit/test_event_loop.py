"""The event loop a worker runs on, as ``event_loop`` /
``CONVEYOR_EVENT_LOOP`` says: asyncio's (the default), uvloop, or uvloop
when installed (``auto``)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from conveyor import Settings
from conveyor._loop import loop_factory, run
from conveyor.errors import ConfigError
from conveyor.settings import load_settings


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_it_is_installed() -> None:
    assert importlib.util.find_spec("uvloop") is not None  # the http extra brings it
    assert run(_loop_module()).startswith("uvloop")
    assert run(_loop_module(), "uvloop").startswith("uvloop")


def test_asyncio_never_uses_uvloop() -> None:
    assert loop_factory("asyncio") is None
    assert run(_loop_module(), "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    assert loop_factory("auto") is None
    assert run(_loop_module()).startswith("asyncio")
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        run(_loop_module(), "uvloop")


def test_the_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().event_loop == "asyncio"
    monkeypatch.setenv("CONVEYOR_EVENT_LOOP", "tokio")
    with pytest.raises(ConfigError, match="invalid setting event_loop"):
        load_settings()


def test_sigusr1_writes_every_task_and_where_it_waits(capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import signal

    seen: list[str] = []

    async def waits_deep_inside() -> None:
        await asyncio.Event().wait()

    async def outer() -> None:
        await waits_deep_inside()

    async def main() -> None:
        stuck = asyncio.create_task(outer(), name="the-stuck-one")
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(2000):  # until the handler ran, at most ~2 s
            seen.append(capsys.readouterr().err)
            if "the-stuck-one" in "".join(seen):
                break
            await asyncio.sleep(0.001)
        stuck.cancel()

    run(main())
    text = "".join(seen)
    assert "task the-stuck-one" in text
    # the whole chain, down to the frame it waits in and what that awaits
    assert "in outer" in text
    assert "in waits_deep_inside" in text
    assert "in wait" in text
    assert "awaiting <" in text
