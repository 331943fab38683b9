"""A RabbitMQ connection reset during the AMQP handshake: aiormq cancels its
own tasks and a CancelledError comes out of aio_pika.connect (or, closed
before the server's first frame, a StopAsyncIteration). That is a
failed attempt (tried again by connect_within), not a cancellation of the
caller; a real cancellation still cancels. A failed attempt closes its
connection object at once."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aio_pika
import pytest

from conveyor.brokers.rabbitmq import RabbitMQBroker
from conveyor.errors import BrokerError


@pytest.mark.parametrize(
    "raised",
    [
        asyncio.CancelledError,  # as aiormq's close() does to its tasks
        StopAsyncIteration,  # aiormq's frame reader, closed before the first frame
    ],
)
def test_an_error_from_inside_the_handshake_is_a_failed_attempt(
    monkeypatch: pytest.MonkeyPatch, raised: type[BaseException]
) -> None:
    calls = 0

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise raised()

    monkeypatch.setattr("aio_pika.Connection.connect", connect)
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/?connect_timeout=0.5")

    async def main() -> None:
        with pytest.raises(BrokerError, match="connection closed during the handshake"):
            await broker.connect()

    asyncio.run(main())
    assert calls >= 2  # tried again, within connect_timeout


def test_cancelling_the_caller_still_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    started = asyncio.Event()

    async def connect(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr("aio_pika.Connection.connect", connect)
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/?connect_timeout=60")

    async def main() -> None:
        task = asyncio.create_task(broker.connect())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


async def test_a_failed_attempt_leaves_no_connection_to_the_garbage_collector() -> None:
    """aio_pika's Connection.__del__ schedules close() on whatever loop is
    current when the collector runs; with none, that coroutine is never
    awaited (a warning at some later, unrelated point)."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gc.disable()  # keep what the failed attempts left in reference cycles
    try:
        broker = RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{port}/?connect_timeout=1")
        with pytest.raises(BrokerError):
            await broker.connect()
        await broker.close()
        left = [
            o for o in gc.get_objects() if isinstance(o, aio_pika.Connection) and not o.is_closed
        ]
    finally:
        gc.enable()
        server.close()
    assert left == []
