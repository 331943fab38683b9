"""Conveyor's pytest plugin, loaded by pytest when Conveyor is installed.

Fixtures:

- ``conveyor_settings``: ``Settings`` on a fresh embedded SQLite file in the
  test's ``tmp_path`` (broker and store in one file, a short idle poll), for
  ``App(settings=conveyor_settings)``.
- ``conveyor_clock``: a ``FakeClock`` to hand to ``App(clock=...)``, so
  backoff, breaker cool-downs and saga timeouts pass at ``advance()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.settings import Settings
from conveyor.testing._clock import FakeClock

__all__ = ["conveyor_clock", "conveyor_settings"]


@pytest.fixture
def conveyor_settings(tmp_path: Path) -> Settings:
    """Settings for one test: an embedded SQLite file of its own."""
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    return Settings(broker_url=url, store_url=url, idle_poll=0.01, grace_period=5.0)


@pytest.fixture
def conveyor_clock() -> FakeClock:
    """A clock that moves only on ``advance(seconds)``."""
    return FakeClock()
