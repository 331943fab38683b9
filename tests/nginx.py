"""nginx for the tests: found (or installed with apt-get), run from a
directory of the test's own on a free port of 127.0.0.1, stopped cleanly.

nginx is not a long-running server of the machine, so ``scripts/services``
does not start it: ``nginx_binary()`` installs the Debian package the first
time a test needs it (the test command runs as root). The launcher never
touches the system's nginx service or ``/etc/nginx``: it runs
``nginx -p DIR -c nginx.conf -e error.log`` in the foreground, so the pid
file, logs and temporary files stay in ``DIR`` and relative paths in the
configuration resolve against ``DIR``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.debian import debian_binary

__all__ = ["Nginx", "free_port", "nginx_binary", "round_robin_config"]


def nginx_binary() -> str:
    """The path of the nginx binary; installs the Debian package ``nginx``
    when it is missing."""
    return debian_binary("nginx", "nginx")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def round_robin_config(*, port: int, upstreams: Sequence[str]) -> str:
    """A minimal configuration: ``127.0.0.1:port`` proxies every request to
    ``upstreams`` (``host:port``) in turn, with no affinity."""
    servers = "\n".join(f"        server {u};" for u in upstreams)
    return f"""\
worker_processes 1;
pid nginx.pid;
error_log error.log notice;
events {{ worker_connections 256; }}
http {{
    access_log access.log;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    upstream backends {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
        }}
    }}
}}
"""


class Nginx:
    """nginx serving ``config`` on ``127.0.0.1:port`` from ``workdir``.

    ``config`` must listen on ``port`` and use paths relative to the prefix
    (``workdir``) for its pid file, logs and ``tmp/`` temporary paths, as
    ``round_robin_config`` does; ``daemon off`` is forced so the process is
    this launcher's child. ``stop()`` (idempotent) quits gracefully, then
    kills after ``grace`` seconds. Use as a context manager.
    """

    def __init__(
        self,
        workdir: Path,
        config: str,
        *,
        port: int,
        binary: str | None = None,
        grace: float = 10.0,
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.binary = binary or nginx_binary()
        self.grace = grace
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        directives = "daemon off;"
        if os.geteuid() == 0:
            # Workers would otherwise switch to `nobody`, which cannot write
            # temporary files under a test's private directory.
            directives += f" user {pwd.getpwuid(os.geteuid()).pw_name};"
        prefix = f"{self.workdir}/"
        return [self.binary, "-p", prefix, "-c", "nginx.conf", "-e", "error.log",
                "-g", directives, *extra]  # fmt: skip

    def start(self, *, timeout: float = 20.0) -> None:
        """Write the configuration, check it (``nginx -t``) and start nginx;
        return once the port answers."""
        if self.process is not None and self.process.poll() is None:
            return
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.workdir / "nginx.conf").write_text(self.config)
        check = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused its configuration: {check.stderr.strip()}")
        with (self.workdir / "nginx.out").open("ab") as out:
            self.process = subprocess.Popen(
                self._command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not listen on {self.port} within {timeout:g}s")
            time.sleep(0.02)

    def log(self) -> str:
        """The tail of nginx's error log (for failure messages)."""
        path = self.workdir / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        # SIGQUIT: finish the requests in flight, then exit.
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(self.grace)
        except subprocess.TimeoutExpired:
            # The whole group: a killed master would leave its workers serving.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
