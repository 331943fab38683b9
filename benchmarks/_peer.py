"""What the peer apps of ``benchmarks/brokers.py`` (faststream_app,
taskiq_app) share: their settings, from the variables the benchmark sets
(BENCH_PEER_URL, BENCH_PEER_QUEUE, BENCH_PEER_COUNT, BENCH_PEER_OUT), and
how a worker reports that it has handled them all: ``{"first": t, "last":
t}`` (perf_counter of the first call and of the last) written to
BENCH_PEER_OUT."""

from __future__ import annotations

import json
import os
from pathlib import Path

URL = os.environ["BENCH_PEER_URL"]
QUEUE = os.environ["BENCH_PEER_QUEUE"]
COUNT = int(os.environ.get("BENCH_PEER_COUNT", "0"))
OUT = os.environ.get("BENCH_PEER_OUT", "")
PREFETCH = 256
"""Messages read ahead: Conveyor's own ceiling, for the same batch size."""


def write_marks(marks: dict[str, float]) -> None:
    """Once, after the last message: the run is over, blocking costs nothing."""
    Path(OUT + ".tmp").write_text(json.dumps(marks))
    os.replace(OUT + ".tmp", OUT)
