"""`conveyor keys create --scope` and `conveyor dashboard`, as subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from tests.helpers import wait_until


def _conveyor(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_keys_are_created_with_scopes(tmp_path: Path) -> None:
    """--scope is stored and listed; an unknown scope is one error line, exit 1."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    made = _conveyor(
        "keys", "create", "ops", "--scope", "admin:write", "--store", url, cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().startswith("cvk_")
    assert _conveyor("keys", "create", "client", "--store", url, cwd=tmp_path).returncode == 0
    listed = _conveyor("keys", "list", "--json", "--store", url, cwd=tmp_path)
    scopes = {k["name"]: k["scopes"] for k in map(json.loads, listed.stdout.splitlines())}
    assert scopes == {"client": ["jobs"], "ops": ["admin:write"]}
    bad = _conveyor("keys", "create", "x", "--scope", "root", "--store", url, cwd=tmp_path)
    assert bad.returncode == 1
    assert "unknown API key scope 'root'" in bad.stderr


def test_dashboard_serves_the_console_of_an_app(tmp_path: Path) -> None:
    """`conveyor dashboard MODULE:APP --port P` serves the pages and the admin API."""
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    (tmp_path / "shop.py").write_text(
        textwrap.dedent(
            """
            from conveyor import App

            app = App("shop")

            @app.handler("orders")
            async def take(ctx, body: dict) -> None:
                pass
            """
        )
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor",
            "dashboard",
            "shop:app",
            "--port",
            str(port),
            "--broker",
            url,
            "--store",
            url,
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/console/", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
                return False

        wait_until(answers, timeout=30)
        page = httpx.get(f"http://127.0.0.1:{port}/console/", timeout=5)
        assert "orders" in page.text
        queues = httpx.get(f"http://127.0.0.1:{port}/admin/queues", timeout=5).json()
        assert [(q["topic"], q["group"]) for q in queues] == [("orders", "take")]
        assert (
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5, follow_redirects=True).url.path
            == "/console/"
        )
        wrong = _conveyor("dashboard", "shop:nothing", cwd=tmp_path)
        assert wrong.returncode == 1
        assert "is not an App, Console or Dashboard" in wrong.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
