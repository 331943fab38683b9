"""python -m tests.chaos [--minutes N] [--config sqlite,redis-postgres] [--seed S]

The long form of the chaos suite: each configuration for N minutes of
faults under load, then its invariants; exit 1 on any violation."""

from __future__ import annotations

import argparse
import sys

from tests.chaos._run import CONFIGS, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", default=",".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    ok = True
    for name in args.config.split(","):
        report = run(name, seconds=args.minutes * 60, seed=args.seed)
        print(report.text(), flush=True)
        ok = ok and report.ok
    sys.exit(0 if ok else 1)
