"""One busy handler must not starve the others or the shutdown signal."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor import App, Context, Settings
from conveyor.testing import eventually


async def test_busy_handler_does_not_starve_another_or_stop(tmp_path: Path) -> None:
    """With a large backlog on one topic, a message on another topic is handled
    before the backlog drains, and stop() takes effect mid-backlog."""
    app = App("fair", settings=Settings(broker_url=f"sqlite:///{tmp_path / 'f.db'}", prefetch=50))
    seen: list[str] = []
    backlog_done = 0

    @app.handler("bulk")
    async def bulk(ctx: Context, body: dict[str, int]) -> None:
        nonlocal backlog_done
        backlog_done += 1

    @app.handler("urgent")
    async def urgent(ctx: Context, body: dict[str, int]) -> None:
        seen.append(f"urgent after {backlog_done}")

    async with app:
        async with app.transaction() as s:
            for i in range(5000):
                await s.publish("bulk", {"i": i})
            await s.publish("urgent", {"i": 0})
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        await eventually(lambda: bool(seen), what="urgent message handled")
        worker.stop()
        await asyncio.wait_for(task, 10)
    handled_before = int(seen[0].split()[-1])
    assert handled_before < 5000, seen
    assert backlog_done < 5000, "stop() only took effect after the whole backlog"
