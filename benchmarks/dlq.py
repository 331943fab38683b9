"""Dead-letter tools at scale: peak memory and time of `conveyor dlq ...`.

.venv/bin/python -m benchmarks.dlq [--count 100000]

Fills a fresh SQLite file with COUNT dead letters, then runs, each as its own
process: `dlq list` (one page), `dlq list --json --limit 0` (every record,
streamed), `dlq replay --all` and `dlq purge --all -y`, printing each one's
wall time and peak RSS (from the kernel's accounting of the child). The
tools read the store 500 records at a time, so memory should not grow with
COUNT; run it with two counts to see.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from conveyor import App, Message, Settings


async def _fill(url: str, count: int) -> None:
    app = App("bench-dlq", settings=Settings(broker_url=url))
    async with app:
        await app.broker.declare("jobs", "workers")
        for start in range(0, count, 5000):
            async with app.store.transaction() as tx:
                for i in range(start, min(count, start + 5000)):
                    await app.store.dead_letter(
                        tx,
                        group="workers",
                        message=Message.create("jobs", {"i": i, "pad": "x" * 200}).with_attempt(5),
                        reason=f"gave up after 5 attempt(s): ProviderTimeout: call {i} timed out",
                        error_type="ProviderTimeout",
                        traceback="Traceback (most recent call last):\n  ...\n" * 5,
                    )


def _measure(args: list[str], cwd: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of `conveyor ARGS`."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"conveyor {' '.join(args)} exited {proc.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    count = parser.parse_args().count
    console = Console()
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="conveyor-dlq-") as tmp,
        Progress(console=console, transient=True) as progress,
    ):
        url = f"sqlite:///{Path(tmp) / 'q.db'}"
        task = progress.add_task(f"writing {count:,} dead letters", total=5)
        asyncio.run(_fill(url, count))
        progress.advance(task)
        for label, args in (
            ("dlq list (first page of 100)", ["dlq", "list"]),
            ("dlq list --json --limit 0 (all)", ["dlq", "list", "--json", "--limit", "0"]),
            ("dlq replay --all", ["dlq", "replay", "--all"]),
            ("dlq purge --all (after writing them again)", None),
        ):
            progress.update(task, description=label)
            if args is None:
                asyncio.run(_fill(url, count))
                args = ["dlq", "purge", "--all", "-y"]
            seconds, rss = _measure([*args, "--broker", url], tmp)
            rows.append((label, seconds, rss))
            progress.advance(task)
    table = Table(title=f"Dead-letter tools over {count:,} dead letters (SQLite)")
    table.add_column("command")
    table.add_column("time", justify="right")
    table.add_column("peak RSS", justify="right")
    for label, seconds, rss in rows:
        table.add_row(label, f"{seconds:.1f} s", f"{rss:.0f} MB")
    console.print(table)


if __name__ == "__main__":
    main()
