"""`conveyor serve MODULE:ATTR` runs the job API under uvicorn; a
`conveyor worker` process runs its jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_serve_and_worker_processes_run_a_job(tmp_path: Path) -> None:
    """A job posted to `conveyor serve` is run by `conveyor worker` and its
    result read back over HTTP."""
    port = _free_port()
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = {**os.environ, "CONVEYOR_IDLE_POLL": "0.02", "COLUMNS": "250"}
    cli = [sys.executable, "-m", "conveyor"]
    target = "tests.integration.http_serve_app"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [*cli, "serve", f"{target}:api", "--port", str(port), "--broker", db],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [*cli, "worker", f"{target}:app", "--broker", db],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                return False

        wait_until(healthy, timeout=30)
        posted = httpx.post(f"{base}/jobs/square", json={"n": 9}, timeout=5)
        assert posted.status_code == 202
        url = base + posted.headers["location"]
        deadline = time.monotonic() + 30
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            status = httpx.get(url, timeout=5).json()
            if status["status"] == "SUCCEEDED":
                break
            time.sleep(0.05)
        assert status["status"] == "SUCCEEDED"
        assert status["result"] == 81
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    finally:
        for proc in (server, worker):
            proc.terminate()
        for proc in (server, worker):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
