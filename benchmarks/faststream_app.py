"""The FastStream side of ``benchmarks/brokers.py``: one no-op subscriber.

``python faststream_app.py publish`` enqueues BENCH_PEER_COUNT messages;
``python faststream_app.py consume`` runs the subscriber until it has
handled them all and writes ``{"first": t, "last": t}`` (perf_counter of the
first call and of the last) to BENCH_PEER_OUT (benchmarks/_peer.py).
BENCH_PEER_URL is redis:// (a
stream read by a consumer group, acknowledged after the handler, 256 entries
per read) or amqp:// (a durable queue, prefetch 256, acknowledged after the
handler): the configurations with Conveyor's guarantee (nothing lost if the
worker dies) and its batch size.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from _peer import COUNT, PREFETCH, QUEUE, URL, write_marks

broker: Any
if URL.startswith("redis"):
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(URL, log_level=30)
    subscriber = broker.subscriber(
        stream=StreamSub(QUEUE, group="bench", consumer="c1", max_records=PREFETCH)
    )
    target: dict[str, Any] = {"stream": QUEUE}
else:
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(URL, log_level=30)
    queue = RabbitQueue(QUEUE, durable=True)
    subscriber = broker.subscriber(queue, channel=Channel(prefetch_count=PREFETCH))
    target = {"queue": QUEUE}

done = asyncio.Event()
seen = 0
marks: dict[str, float] = {}


@subscriber
async def noop(body: int) -> None:
    global seen
    seen += 1
    if seen == 1:
        marks["first"] = time.perf_counter()
    if seen == COUNT:
        marks["last"] = time.perf_counter()
        done.set()


async def publish() -> None:
    await broker.connect()
    if URL.startswith("redis"):  # the group first, so it reads from the start
        await broker._connection.xgroup_create(QUEUE, "bench", id="0", mkstream=True)
    else:
        await broker.declare_queue(queue)
    try:
        for i in range(COUNT):
            await broker.publish(i, **target)
    finally:
        await broker.stop()


async def consume() -> None:
    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), 600)
    finally:
        await broker.stop()


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        asyncio.run(publish())
    else:
        asyncio.run(consume())
        write_marks(marks)
