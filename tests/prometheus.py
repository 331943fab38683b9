"""A real Prometheus server for the tests: Debian's package (installed when
missing), run from a directory of the test's own on a free port of
127.0.0.1, scraping the targets it is given every half second (each scrape may take as long)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.debian import debian_binary
from tests.nginx import free_port

__all__ = ["Prometheus", "promtool"]


def promtool() -> str:
    return debian_binary("promtool", "prometheus")


class Prometheus:
    """``with Prometheus(tmp, {"worker": ["127.0.0.1:9101"]}) as p: p.query(...)``."""

    def __init__(self, workdir: Path, jobs: dict[str, list[str]]) -> None:
        self.workdir = workdir
        self.jobs = jobs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        binary = debian_binary("prometheus", "prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "500ms", "scrape_timeout": "500ms"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in self.jobs.items()
            ],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config))
        with (self.workdir / "prometheus.log").open("wb") as log:
            self._process = self._start(binary, log)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "prometheus did not start: "
                    + (self.workdir / "prometheus.log").read_text()[-2000:]
                )
            time.sleep(0.1)

    def _start(self, binary: str, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query (``data.result``)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, or None when it has no result."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def targets_up(self) -> int:
        return len(self.query("up == 1"))
