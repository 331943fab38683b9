"""The order system as worker processes for the saga crash test.

    conveyor worker tests.e2e.saga_crash_app:app

reads ``SAGA_CRASH_URL`` (broker and store), ``SAGA_CRASH_SERVICES``
(comma-separated) and ``SAGA_CRASH_SEED``. The orchestrator ("orders") waits
up to 5 ms before each message so that a SIGKILL lands inside its work as
often as between messages.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable

from conveyor import Context, RetryPolicy, Settings
from conveyor.examples.orders import Faults, create_app

URL = os.environ["SAGA_CRASH_URL"]
SERVICES = tuple(os.environ.get("SAGA_CRASH_SERVICES", "orders").split(","))
SEED = int(os.environ.get("SAGA_CRASH_SEED", "0"))
FAULTS = Faults(
    error_rate=0.05, latency=0.002, decline_rate=0.1, ship_failure_rate=0.1, duplicate_rate=0.05
)
PAYMENT_TIMEOUT = 3.0

app = create_app(
    settings=Settings(broker_url=URL, store_url=URL, idle_poll=0.05, grace_period=2.0),
    faults=FAULTS,
    services=SERVICES,
    seed=SEED,
    retry=RetryPolicy(max_attempts=50, base_delay=0.01, max_delay=0.2),
    payment_timeout=PAYMENT_TIMEOUT,
)
_rng = random.Random(SEED)


@app.use
async def jitter(ctx: Context, call_next: Callable[[], Awaitable[None]]) -> None:
    if ctx.group.startswith("saga."):
        await asyncio.sleep(_rng.uniform(0.0, 0.005))
    await call_next()
