"""Embedded default benchmark; same as ``conveyor bench``.

.venv/bin/python benchmarks/embedded.py [--messages N] [--output results.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from conveyor.cli._bench import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    run_bench(Console(), messages=args.messages, output=args.output)
