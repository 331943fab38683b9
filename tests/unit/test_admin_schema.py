"""schemathesis over the admin API: no 5xx, responses match the schema."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conveyor import App, Settings
from conveyor.http import AdminAPI, Console
from conveyor.messages import Message


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    url = f"sqlite:///{tmp_path / 'schema.db'}"
    app = App("schema", settings=Settings(broker_url=url, store_url=url))
    admin = AdminAPI(Console(app))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_seed(app))
        loop.run_until_complete(admin.console.connect())
        with _quiet():
            schema = schemathesis.openapi.from_asgi("/openapi.json", admin)
        checks = [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
        tested = 0
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(
                max_examples=12,
                derandomize=True,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call()
                case.validate_response(response, checks=checks)

            with _quiet():
                given(operation.as_strategy())(run)()
            tested += 1
        assert tested >= 15
    finally:
        loop.run_until_complete(app.close())
        loop.close()
