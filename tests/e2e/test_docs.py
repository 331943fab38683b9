"""Docs are code: every Python block of the README and of every page under
docs/ and the examples runs, in order, against the embedded default or the
test servers (see tests/docs_runner.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_runner import blocks
from tests.nginx import nginx_binary

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "src" / "conveyor" / "examples").glob("*/README.md"),
    ]
)
WITH_CODE = [p for p in PAGES if blocks(p.read_text())]


def test_every_page_is_found() -> None:
    """The pages checked are every Markdown page of the repository."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(ROOT / name for name in listed) == PAGES


@pytest.mark.parametrize("page", WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page: Path, tmp_path: Path) -> None:
    """Every Python block of the page runs without an error, in order."""
    if "sum_of_primes up" in page.read_text():
        nginx_binary()  # installed with apt-get when missing, as for the e2e test
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "tests.docs_runner", str(page)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
