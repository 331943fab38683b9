"""Programs the tests need that the machine may lack: found, or installed
from Debian's packages with apt-get (the test command runs as root)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["debian_binary"]

_INSTALL_LOCK = Path("/tmp/conveyor-apt-install.lock")


def _found(name: str) -> str | None:
    for where in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if where and os.access(where, os.X_OK):
            return where
    return None


def debian_binary(name: str, package: str) -> str:
    """The path of ``name``; installs Debian's ``package`` when it is missing.
    Fails, with apt-get's output, when that is impossible."""
    found = _found(name)
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    # Two test processes installing at once would trip over dpkg's lock.
    with _INSTALL_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _found(name)
        if found:
            return found
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            # The package lists may be missing or stale: refresh once, then retry.
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    found = _found(name)
    if found is None:
        raise RuntimeError(
            f"{name} is not installed and `{' '.join(install)}` failed "
            f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return found
