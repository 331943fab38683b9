"""schemathesis over the admin API: no 5xx, responses match the schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor import App, Settings
from conveyor.http import AdminAPI, Console
from conveyor.messages import Message
from tests.schema_fuzz import fuzz_every_operation


async def _seed(app: App) -> None:
    await app.connect()
    async with app.store.transaction() as tx:
        for n in range(5):
            await app.store.dead_letter(
                tx,
                group="g",
                message=Message.create("t", {"n": n}),
                reason="boom",
                error_type="ValueError",
                traceback='Traceback:\n  File "x.py", line 1, in f\nValueError: boom\n',
            )


def test_schemathesis_finds_no_server_error_in_the_admin_api(tmp_path: Path) -> None:
    """Generated requests against every admin route: no 5xx, and every
    response conforms to its documented codes, content types and schemas."""
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    app = App("schema", settings=Settings(broker_url=url, store_url=url))
    admin = AdminAPI(Console(app))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_seed(app))
        loop.run_until_complete(admin.console.connect())
        tested = fuzz_every_operation(admin, max_examples=12)
        assert tested >= 15
    finally:
        loop.run_until_complete(app.close())
        loop.close()
