"""What a handler's context gives: ids propagated to the messages it sends."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor import App, Context, Message, Settings
from conveyor.messages import CORRELATION_ID, TRACEPARENT, trace_id
from conveyor.testing import eventually


async def test_published_messages_carry_correlation_causation_and_trace(tmp_path: Path) -> None:
    """A message sent from a handler keeps the correlation id and the trace of the
    one it handles (a child traceparent: same trace, a span of its own), names it
    as its cause, and keeps the handler's own headers."""
    app = App("ctx", settings=Settings(broker_url=f"sqlite:///{tmp_path / 'c.db'}"))
    received: list[Message] = []

    @app.handler("first")
    async def first(ctx: Context, body: dict[str, int]) -> None:
        await ctx.publish("second", body, key="k", headers={"x-extra": "1"})

    @app.handler("second")
    async def second(ctx: Context, body: dict[str, int]) -> None:
        received.append(ctx.message)

    async with app:
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        origin = await app.publish(
            "first", {"n": 1}, headers={CORRELATION_ID: "order-42", TRACEPARENT: trace}
        )
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        await eventually(lambda: bool(received), what="second message handled")
        worker.stop()
        await task
    (message,) = received
    assert message.correlation_id == "order-42"
    assert message.causation_id == origin.id
    assert message.traceparent is not None
    assert message.traceparent != trace
    assert trace_id(message.traceparent) == trace_id(trace)
    assert message.headers["x-extra"] == "1"
    assert message.key == "k"
    assert message.id != origin.id
