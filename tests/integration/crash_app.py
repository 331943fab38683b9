"""A worker process for the crash and shutdown tests.

    python crash_app.py BROKER_URL STORE_URL [--delay S] [--ack-delay S]
                        [--hold N --marker PATH] [--poison N] [--max-attempts K]
                        [--ready PATH]

runs an App until SIGTERM. Each ``work`` message is applied by inserting a row
(with the worker's pid) into ``effects`` and forwarded to ``applied``, whose
handler inserts a row into ``downstream``. Neither table has a unique key, so applying a message twice
shows up as a duplicate row.

``--delay`` slows every message down so the test can kill the process
mid-stream. On the generic path ``--ack-delay`` holds each acknowledgement
back, so a kill often lands between a delivery's commit and its ack, where only
the inbox prevents a second application. With ``--hold N`` the handler of
message N creates ``--marker`` and then works for another half second.
``--poison N`` makes message N kill its own worker with SIGKILL, every time.
``--ready PATH`` is created once the app has connected to its broker and store.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from conveyor import App, Context, RetryPolicy, Settings
from conveyor.brokers._protocol import Delivery
from conveyor.brokers.sqlite import SqliteBroker

TABLES = (
    "CREATE TABLE IF NOT EXISTS effects (msg_id TEXT NOT NULL, n INTEGER NOT NULL, pid INTEGER)",
    "CREATE TABLE IF NOT EXISTS downstream (msg_id TEXT NOT NULL, n INTEGER NOT NULL)",
)
SCHEMA = "".join(f"{t};\n" for t in TABLES)


class SlowAckBroker(SqliteBroker):
    """A SQLite broker that waits before every acknowledgement."""

    def __init__(self, url: str, *, ack_delay: float) -> None:
        super().__init__(url)
        self.ack_delay = ack_delay

    async def ack(self, deliveries: Sequence[Delivery]) -> int:
        await asyncio.sleep(self.ack_delay)
        return await super().ack(deliveries)


def build(
    broker_url: str,
    store_url: str,
    *,
    delay: float = 0.0,
    ack_delay: float = 0.0,
    hold: int | None = None,
    marker: Path | None = None,
    poison: int | None = None,
    max_attempts: int = 5,
) -> App:
    slow = ack_delay > 0 and broker_url != store_url
    app = App(
        "crash",
        broker=SlowAckBroker(broker_url, ack_delay=ack_delay) if slow else None,
        settings=Settings(
            broker_url=broker_url,
            store_url=store_url,
            lease=1.0,
            idle_poll=0.05,
            prefetch=32,
            grace_period=20.0,
        ),
    )

    @app.handler("work", group="apply", retry=RetryPolicy(max_attempts=max_attempts))
    async def apply(ctx: Context, body: dict[str, int]) -> None:
        n = body["n"]
        if n == poison:
            os.kill(os.getpid(), signal.SIGKILL)
        await ctx.execute(
            "INSERT INTO effects (msg_id, n, pid) VALUES (?, ?, ?)",
            (ctx.message.id, n, os.getpid()),
        )
        await ctx.publish("applied", {"n": n})
        if n == hold and marker is not None:
            await asyncio.to_thread(marker.touch)
            await asyncio.sleep(0.5)
        elif delay:
            await asyncio.sleep(delay)

    @app.handler("applied", group="record")
    async def record(ctx: Context, body: dict[str, int]) -> None:
        await ctx.execute(
            "INSERT INTO downstream (msg_id, n) VALUES (?, ?)", (ctx.message.id, body["n"])
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker_url")
    parser.add_argument("store_url")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--ack-delay", type=float, default=0.0)
    parser.add_argument("--hold", type=int)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--poison", type=int)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--ready", type=Path, help="file to create once connected")
    args = parser.parse_args()
    app = build(
        args.broker_url,
        args.store_url,
        delay=args.delay,
        ack_delay=args.ack_delay,
        hold=args.hold,
        marker=args.marker,
        poison=args.poison,
        max_attempts=args.max_attempts,
    )

    async def run() -> None:
        await app.connect()
        if args.ready is not None:
            args.ready.touch()
        await app.run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
