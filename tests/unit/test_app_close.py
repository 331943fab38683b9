"""App.close bounds each part's close: a broker whose close never returns
(a server that stopped answering) does not keep a stopping process alive,
and the store is closed all the same."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor import App, Settings
from conveyor.brokers import broker_from_url
from conveyor.runtime import _app
from conveyor.store import store_from_url


async def test_a_close_that_never_returns_is_abandoned_and_the_store_still_closed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(_app, "CLOSE_TIMEOUT", 0.05)
    broker, store = broker_from_url("memory://"), store_from_url(f"sqlite:///{tmp_path}/s.db")
    closed: list[str] = []

    async def hangs() -> None:
        await asyncio.Event().wait()  # never set: a close handshake never answered

    async def store_close() -> None:
        closed.append("store")

    monkeypatch.setattr(broker, "close", hangs)
    monkeypatch.setattr(store, "close", store_close)
    app = App("close", settings=Settings(), broker=broker, store=store)
    await asyncio.wait_for(app.close(), 10)
    assert closed == ["store"]
    assert "closing the broker took longer than 0.05s" in caplog.text
