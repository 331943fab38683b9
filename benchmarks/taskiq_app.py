"""The Taskiq side of ``benchmarks/brokers.py``: one no-op task.

``python taskiq_app.py publish`` enqueues BENCH_PEER_COUNT tasks; the
worker is ``taskiq worker taskiq_app:broker --workers 1`` (the benchmark
starts it), which writes ``{"first": t, "last": t}`` (perf_counter of the
first call and of the last) to BENCH_PEER_OUT once it has run them all
(benchmarks/_peer.py). BENCH_PEER_URL is redis:// (a stream read by a consumer group, 256 per
read, acknowledged after the task) or amqp:// (a durable quorum queue,
prefetch 256): the configurations with Conveyor's guarantee (nothing lost
if the worker dies) and its batch size.
"""

from __future__ import annotations

import asyncio
import sys
import time

from taskiq import AsyncBroker

from _peer import COUNT, OUT, PREFETCH, QUEUE, URL, write_marks

broker: AsyncBroker
if URL.startswith("redis"):
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(
        URL, queue_name=QUEUE, consumer_group_name="bench", consumer_id="0", xread_count=PREFETCH
    )
else:
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.exchange import Exchange
    from taskiq_aio_pika.queue import Queue

    # every name carries the run's token, for the benchmark's clean-up
    broker = AioPikaBroker(
        URL,
        qos=PREFETCH,
        exchange=Exchange(name=QUEUE),
        task_queues=[Queue(name=QUEUE)],
        dead_letter_queue=Queue(name=f"{QUEUE}.dead_letter"),
        delay_queue=Queue(name=f"{QUEUE}.delay"),
    )

seen = 0
first = 0.0


@broker.task(task_name="conveyor_bench_noop")  # one name, however the module is imported
async def noop(i: int) -> None:
    global seen, first
    seen += 1
    if seen == 1:
        first = time.perf_counter()
    if seen == COUNT and OUT:
        write_marks({"first": first, "last": time.perf_counter()})


async def publish() -> None:
    await broker.startup()
    try:
        for i in range(COUNT):
            await noop.kiq(i)
    finally:
        await broker.shutdown()


if __name__ == "__main__" and sys.argv[1:] == ["publish"]:
    asyncio.run(publish())
