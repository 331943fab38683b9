"""Observability cost; ``conveyor bench observability`` with a baseline build.

.venv/bin/python benchmarks/observability.py [--messages N] [--rounds R]
                                             [--baseline REV] [--output results.json]

Checks out ``--baseline`` (default: the last commit before the observer seam)
into a temporary git worktree and measures its worker beside this build's,
with observability off, metrics on, and metrics + tracing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from rich.console import Console

from conveyor.cli._bench_observability import run_observability_bench

ROOT = Path(__file__).resolve().parent.parent
# The commit before "One seam for every message's life".
BEFORE_SEAM = "c512c0a"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BEFORE_SEAM)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conveyor-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), args.baseline], check=True)
        try:
            results = run_observability_bench(
                Console(), messages=args.messages, rounds=args.rounds, baseline_src=tree / "src"
            )
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=True)
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2))
