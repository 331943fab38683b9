"""What a new user types first: the README's demo command on a fresh clone,
and ``pip install`` of a built wheel followed by ``conveyor demo``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """The environment of a new shell: no CONVEYOR_* settings, no virtualenv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT))
    )
    return env


def _fresh_clone(into: Path) -> Path:
    """A clone of this repository holding the working tree as it is now
    (uncommitted edits included, ignored files such as .venv left out)."""
    clone = into / "conveyor"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        name = raw.decode()
        source, target = ROOT / name, clone / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        elif target.exists():
            target.unlink()  # deleted in the working tree, not yet committed
    assert not (clone / ".venv").exists()
    return clone


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )


def test_readme_demo_command_works_on_a_fresh_clone(tmp_path: Path) -> None:
    """`./scripts/demo`, exactly as the README says, on a fresh clone with no
    .venv: it sets everything up and the demo's invariants hold."""
    clone = _fresh_clone(tmp_path)
    readme = (clone / "README.md").read_text()
    assert "./scripts/demo" in readme
    done = _run(["./scripts/demo", "--orders", "60"], cwd=clone)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all invariants hold" in done.stdout
    assert (clone / ".venv" / "bin" / "conveyor").exists()


def test_wheel_installs_and_runs_the_demo_from_an_empty_folder(tmp_path: Path) -> None:
    """A wheel built from the checkout, installed without extras into a new
    venv, runs `conveyor demo` in an empty folder; the examples come with it
    as conveyor.examples, and `bench brokers` says in one line what it needs."""
    clone = _fresh_clone(tmp_path)
    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), "."],
        cwd=clone,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("conveyor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"conveyor", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}
    # Files the code reads at run time: the Redis broker's scripts, the console's assets.
    for needed in (
        "conveyor/brokers/redis_lua/fetch.lua",
        "conveyor/http/console_static/console.js",
    ):
        assert needed in names, f"{needed} is missing from the wheel"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = _run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    conveyor = str(venv / "bin" / "conveyor")

    demo = _run([conveyor, "demo", "--orders", "60"], cwd=empty)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "all invariants hold" in demo.stdout
    assert list(empty.iterdir()) == [], "the demo left files in the current folder"

    python = str(venv / "bin" / "python")
    primes = [python, "-m", "conveyor.examples.sum_of_primes", "--help"]
    without = _run(primes, cwd=empty)
    assert without.returncode == 1
    assert "pip install 'conveyor[http,redis]'" in without.stderr
    assert "Traceback" not in without.stderr
    extras = _run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{wheel}[http,redis]"], cwd=tmp_path
    )
    assert extras.returncode == 0, extras.stderr[-3000:]
    with_extras = _run(primes, cwd=empty)
    assert with_extras.returncode == 0, with_extras.stderr[-3000:]
    assert "replica" in with_extras.stdout

    bench = _run([conveyor, "bench", "brokers"], cwd=empty)
    assert bench.returncode == 1
    [line] = bench.stderr.strip().splitlines()
    assert "source checkout" in line
    assert "Traceback" not in bench.stderr
