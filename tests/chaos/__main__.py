"""python -m tests.chaos [--minutes N] [--config sqlite,redis-postgres] [--seed S] [--db-faults]

The long form of the chaos suite: each configuration for N minutes of
faults under load, then its invariants; exit 1 on any violation."""

from __future__ import annotations

import argparse
import os
import sys

from tests.chaos._run import CONFIGS, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", default=",".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--db-faults",
        action="store_true",
        help="also fault the database's connections (known to leave orders unfinished)",
    )
    args = parser.parse_args()
    if args.db_faults:
        os.environ["CHAOS_DB_FAULTS"] = "1"
    ok = True
    for name in args.config.split(","):
        report = run(name, seconds=args.minutes * 60, seed=args.seed)
        print(report.text(), flush=True)
        ok = ok and report.ok
    sys.exit(0 if ok else 1)
