"""The Taskiq side of ``benchmarks/brokers.py``: one no-op task.

``python taskiq_app.py publish`` enqueues BENCH_TASKIQ_COUNT tasks; the
worker is ``taskiq worker taskiq_app:broker --workers 1`` (the benchmark
starts it), which writes ``{"first": t, "last": t}`` (perf_counter of the
first call and of the last) to BENCH_TASKIQ_OUT once it has run them all.
BENCH_TASKIQ_URL is redis:// (a stream read by a consumer group, 256 per
read, acknowledged after the task) or amqp:// (a durable quorum queue,
prefetch 256): the configurations with Conveyor's guarantee (nothing lost
if the worker dies) and its batch size.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from taskiq import AsyncBroker

URL = os.environ["BENCH_TASKIQ_URL"]
QUEUE = os.environ["BENCH_TASKIQ_QUEUE"]
COUNT = int(os.environ.get("BENCH_TASKIQ_COUNT", "0"))
OUT = os.environ.get("BENCH_TASKIQ_OUT", "")
PREFETCH = 256

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
        _write_marks({"first": first, "last": time.perf_counter()})


def _write_marks(marks: dict[str, float]) -> None:
    """Once, after the last task: the run is over, blocking costs nothing."""
    Path(OUT + ".tmp").write_text(json.dumps(marks))
    os.replace(OUT + ".tmp", OUT)


async def publish() -> None:
    await broker.startup()
    try:
        for i in range(COUNT):
            await noop.kiq(i)
    finally:
        await broker.shutdown()


if __name__ == "__main__" and sys.argv[1:] == ["publish"]:
    asyncio.run(publish())
