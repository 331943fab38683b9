"""The message journal keeps what a worker's handlers settled up to the
moment the worker stops: its last notes are written when it stops, not
only at the next periodic flush."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor import App, Context, Settings
from conveyor.runtime._journal import Journal


class _Counted(Journal):
    """A journal that says when its periodic flush has run."""

    def __init__(self, app: App) -> None:
        super().__init__(app, flush_every=3600)  # one flush at start, then none for an hour
        self.flushed = asyncio.Event()

    async def _periodic(self, app: App) -> None:
        await super()._periodic(app)
        self.flushed.set()


async def test_the_last_notes_are_written_when_the_worker_stops(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    app = App("journal", settings=Settings(broker_url=url, store_url=url, idle_poll=0.01))
    journal = _Counted(app)
    handled = asyncio.Event()

    @app.handler("j.in", group="g")
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        handled.set()

    async with app:
        worker = app.worker()
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(journal.flushed.wait(), 30)  # the start's flush is behind us
        message = await app.publish("j.in", {"n": 1})
        await asyncio.wait_for(handled.wait(), 30)
        worker.stop()
        await asyncio.wait_for(running, 30)
        rows = await app.store.read(
            "SELECT event FROM conveyor_journal WHERE msg_id = ? ORDER BY at", (message.id,)
        )
    assert ("applied",) in rows, rows
