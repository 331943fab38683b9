"""The Dramatiq side of ``benchmarks/brokers.py``: one no-op actor.

Configured by environment variables (set by the benchmark): BENCH_DRAMATIQ_URL
(redis:// or amqp://), BENCH_DRAMATIQ_QUEUE, BENCH_DRAMATIQ_NAMESPACE (Redis
key prefix), BENCH_DRAMATIQ_COUNT and BENCH_DRAMATIQ_OUT. The worker writes
``{"first": t, "last": t}`` (perf_counter of the first call and of the
COUNT-th) to BENCH_DRAMATIQ_OUT once it has run COUNT messages.
"""

from __future__ import annotations

import json
import os
import threading
import time

import dramatiq

URL = os.environ["BENCH_DRAMATIQ_URL"]
QUEUE = os.environ["BENCH_DRAMATIQ_QUEUE"]
COUNT = int(os.environ.get("BENCH_DRAMATIQ_COUNT", "0"))
OUT = os.environ.get("BENCH_DRAMATIQ_OUT", "")

if URL.startswith("redis"):
    from dramatiq.brokers.redis import RedisBroker

    broker: dramatiq.Broker = RedisBroker(url=URL, namespace=os.environ["BENCH_DRAMATIQ_NAMESPACE"])
else:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=URL)
dramatiq.set_broker(broker)

_lock = threading.Lock()
_seen = 0
_first = 0.0


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(i: int) -> None:
    global _seen, _first
    with _lock:
        _seen += 1
        if _seen == 1:
            _first = time.perf_counter()
        if _seen == COUNT and OUT:
            with open(OUT + ".tmp", "w") as f:
                json.dump({"first": _first, "last": time.perf_counter()}, f)
            os.replace(OUT + ".tmp", OUT)
