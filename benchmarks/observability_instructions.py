"""Observability cost in instructions per message, repeatable on a busy machine.

.venv/bin/python benchmarks/observability_instructions.py [--baseline REV]
                                                          [--small N] [--large M]

Wall-clock rates on a shared 2-core machine move by several percent from
one run to the next, which is the size of the "off" target itself. This
counts instructions instead (``valgrind --tool=callgrind``, the same total
for the same inputs whatever else runs): a worker child drains N and then M
queued messages in each configuration, and (M - N) divides the difference,
so start-up and imports cancel out. Configurations: ``baseline`` (the build
before the observer seam, from a git worktree), ``off`` and ``metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from conveyor.cli._bench import OBSERVE_ENV, _publish

ROOT = Path(__file__).resolve().parent.parent
BEFORE_SEAM = "c512c0a"
_COLLECTED = re.compile(r"Collected : (\d+)")


def _instructions(workload: str, db: Path, n: int, env: dict[str, str], tmp: Path) -> int:
    out = tmp / f"{db.stem}.callgrind"
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "conveyor.cli._bench",
            workload,
            f"sqlite:///{db}",
            str(n),
            str(tmp / f"ready-{db.stem}"),
            "business",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    found = _COLLECTED.search(proc.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total for {db.name}")
    return int(found.group(1))


def main(baseline: str, small: int, large: int) -> None:
    console = Console()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="conveyor-instr-") as name:
        tmp = Path(name)
        tree = tmp / "baseline"
        git = ["git", "-C", str(ROOT)]
        subprocess.run(
            [*git, "worktree", "add", "--detach", str(tree), baseline],
            check=True,
            capture_output=True,
        )
        try:
            filled = {}
            for n in (small, large):
                filled[n] = tmp / f"filled-{n}.db"
                asyncio.run(_publish(f"sqlite:///{filled[n]}", n, batch=500))
            configs = {
                "baseline": {"PYTHONPATH": str(tree / "src"), OBSERVE_ENV: ""},
                "off": {OBSERVE_ENV: ""},
                "metrics": {OBSERVE_ENV: "metrics"},
            }
            jobs = {}
            with ThreadPoolExecutor(max_workers=2) as pool:
                for workload in ("noop", "uow"):
                    for config, env in configs.items():
                        for n in (small, large):
                            db = tmp / f"{workload}-{config}-{n}.db"
                            shutil.copy(filled[n], db)
                            jobs[(workload, config, n)] = pool.submit(
                                _instructions, workload, db, n, env, tmp
                            )
                with console.status("counting instructions under callgrind (minutes)"):
                    totals = {key: job.result() for key, job in jobs.items()}
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=True)
    table = Table(title=f"Instructions per message, embedded default ({large:,} - {small:,})")
    table.add_column("configuration")
    for workload in ("no-op consume", "unit of work"):
        table.add_column(workload, justify="right")
        table.add_column("cost", justify="right")
    per = {
        (w, c): (totals[(w, c, large)] - totals[(w, c, small)]) / (large - small)
        for w in ("noop", "uow")
        for c in configs
    }
    for config, reference in (("baseline", None), ("off", "baseline"), ("metrics", "off")):
        row = [config]
        for workload in ("noop", "uow"):
            value = per[(workload, config)]
            row.append(f"{value:,.0f}")
            row.append(
                "" if reference is None else f"{value / per[(workload, reference)] - 1:+.1%}"
            )
        table.add_row(*row)
    console.print(table)
    console.print("cost: off against the baseline build, metrics against off")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", default=BEFORE_SEAM)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--large", type=int, default=6_000)
    args = parser.parse_args()
    main(args.baseline, args.small, args.large)
