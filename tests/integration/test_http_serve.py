"""`conveyor serve MODULE:ATTR` runs the job API under uvicorn; a
`conveyor worker` process runs its jobs. The server's limits on what a
client may make it hold (head size and header count, one deadline for a
request's head and body, idle connections, connections at once, requests
without a valid API key) are checked over raw sockets against a real
`conveyor serve` process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_until

CLI = [sys.executable, "-m", "conveyor"]
TARGET = "tests.integration.http_serve_app"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    db: str
    log: Path
    scheme: str = "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=20)

    def rss_kib(self) -> int:
        """The server process's resident memory (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def _env() -> dict[str, str]:
    env = {**os.environ, "CONVEYOR_IDLE_POLL": "0.02", "COLUMNS": "250"}
    for name in list(env):
        if name.startswith("CONVEYOR_HTTP_"):
            del env[name]  # the test's options only
    return env


@contextlib.contextmanager
def served(tmp_path: Path, *options: str, client: httpx.Client | None = None) -> Iterator[Served]:
    """`conveyor serve` on a free port of 127.0.0.1 with ``options``,
    answering /healthz (through ``client``: an HTTPS one for a TLS server);
    stopped (by its pid) after."""
    port = _free_port()
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    log_path = tmp_path / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*CLI, "serve", f"{TARGET}:api", "--port", str(port), "--broker", db, *options],
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Served(process, port, db, log_path, "https" if client else "http")
    try:

        def healthy() -> bool:
            try:
                get = client.get if client is not None else httpx.get
                return get(f"{server.base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, log_path.read_text()
                return False

        wait_until(healthy, timeout=30)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _assert_problem(answer: bytes, status: int) -> None:
    assert _status(answer) == status, answer[:500]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), head
    assert f'"status":{status}'.encode() in body, body


def test_serve_and_worker_processes_run_a_job(tmp_path: Path) -> None:
    """A job posted to `conveyor serve` is run by `conveyor worker` and its
    result read back over HTTP."""
    with served(tmp_path) as server:
        worker = subprocess.Popen(
            [*CLI, "worker", f"{TARGET}:app", "--broker", server.db],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            posted = httpx.post(f"{server.base}/jobs/square", json={"n": 9}, timeout=5)
            assert posted.status_code == 202
            url = server.base + posted.headers["location"]
            deadline = time.monotonic() + 30
            status: dict[str, object] = {}
            while time.monotonic() < deadline:
                status = httpx.get(url, timeout=5).json()
                if status["status"] == "SUCCEEDED":
                    break
                time.sleep(0.05)
            assert status["status"] == "SUCCEEDED"
            assert status["result"] == 81
            assert httpx.get(f"{server.base}/readyz", timeout=5).status_code == 200
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def test_serve_refuses_large_heads_and_many_headers(tmp_path: Path) -> None:
    """A head over --max-header-bytes (whole in one send, or 8 MB streamed)
    and more header fields than --max-headers are 431 problems; ten
    connections pushing 8 MB heads leave the server's memory about where
    it was."""
    with served(tmp_path, "--max-header-bytes", "8192", "--max-headers", "20") as server:
        with server.connect() as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n"
            )
            _assert_problem(_answer(sock), 431)
        many = b"".join(b"x-%d: a\r\n" % i for i in range(50))
        with server.connect() as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
            _assert_problem(_answer(sock), 431)
        few = b"".join(b"x-%d: a\r\n" % i for i in range(15))
        with server.connect() as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + few + b"\r\n"
            )
            assert _status(_answer(sock)) == 200  # within both limits

        before = server.rss_kib()
        chunk = b"a" * 65536
        held: list[socket.socket] = []
        refused = 0
        try:
            for _ in range(10):
                sock = server.connect()
                held.append(sock)
                try:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: ")
                    for _ in range(8 * 1024 * 1024 // len(chunk)):
                        sock.sendall(chunk)
                except OSError:
                    refused += 1  # the server answered and closed while we sent
                    continue
                answer = _answer(sock)
                assert answer == b"" or _status(answer) == 431, answer[:200]
                refused += 1
            grown = server.rss_kib() - before
        finally:
            for sock in held:
                sock.close()
        assert refused == 10
        assert grown < 32 * 1024, f"the server grew by {grown} KiB"
        assert httpx.get(f"{server.base}/healthz", timeout=5).status_code == 200


def test_serve_bounds_the_time_a_request_may_take_to_arrive(tmp_path: Path) -> None:
    """With --request-timeout 1: a connection that sends nothing, an
    unfinished head, an unfinished body and a body trickled byte by byte
    (each byte in time, the whole too slow) are answered 408 and
    disconnected; an idle kept-alive connection is closed after
    --keep-alive. Fifty such connections at once are all let go."""
    options = ("--request-timeout", "1", "--keep-alive", "1")
    with served(tmp_path, *options) as server:
        with server.connect() as silent:
            _assert_problem(_answer(silent), 408)
        with server.connect() as head:
            head.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            _assert_problem(_answer(head), 408)
        with server.connect() as body:
            body.sendall(
                b"POST /jobs/square HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b'content-length: 100\r\n\r\n{"n"'
            )
            _assert_problem(_answer(body), 408)

        with server.connect() as trickle:
            trickle.sendall(
                b"POST /jobs/square HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 2000\r\n\r\n"
            )
            trickle.settimeout(0.05)  # the client's pace: one byte per 50 ms at most
            answer, sent = b"", 0
            for _ in range(2000):
                try:
                    trickle.sendall(b" ")
                    sent += 1
                except OSError:
                    break
                try:
                    answer = trickle.recv(65536)
                    break
                except TimeoutError:
                    continue
            trickle.settimeout(20)
            answer += _answer(trickle)
            _assert_problem(answer, 408)
            assert sent < 2000

        with server.connect() as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = _answer(kept)  # the answer, then the close of the idle connection
            assert _status(answer) == 200
            assert answer.endswith(b'{"status":"ok"}')

        stalled = [server.connect() for _ in range(50)]
        try:
            for sock in stalled:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
            for sock in stalled:
                _assert_problem(_answer(sock), 408)
        finally:
            for sock in stalled:
                sock.close()
        assert httpx.get(f"{server.base}/healthz", timeout=5).status_code == 200


def test_serve_limits_connections_at_once(tmp_path: Path) -> None:
    """Past --max-connections open connections a request is refused with
    503 at once; once they close, requests pass again."""
    with served(tmp_path, "--max-connections", "3") as server:
        idle = [server.connect() for _ in range(3)]
        try:
            with server.connect() as extra:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                assert _status(_answer(extra)) == 503
        finally:
            for sock in idle:
                sock.close()

        def served_again() -> bool:
            return httpx.get(f"{server.base}/healthz", timeout=5).status_code == 200

        wait_until(served_again, timeout=20)


def test_serve_rate_limits_requests_without_a_valid_key(tmp_path: Path) -> None:
    """Once a key exists, requests with no key or a wrong one from one
    address get 401 up to --unauthenticated-limit, then 429 problems with
    Retry-After; a request with the right key still passes."""
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    created = subprocess.run(
        [*CLI, "keys", "create", "alice", "--broker", db],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    secret = created.stdout.strip().splitlines()[-1]
    with served(tmp_path, "--unauthenticated-limit", "5/min") as server:
        codes: list[int] = []
        for i in range(12):
            headers = {"Authorization": "Bearer cvk_guess"} if i % 2 else {}
            answer = httpx.post(f"{server.base}/jobs/square", json={"n": 1}, headers=headers)
            codes.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.headers["content-type"] == "application/problem+json"
                assert int(answer.headers["retry-after"]) >= 1
        assert codes == [401] * 5 + [429] * 7
        good = httpx.post(
            f"{server.base}/jobs/square",
            json={"n": 1},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert good.status_code == 202, good.text


def test_serve_refuses_an_invalid_limit_in_one_line(tmp_path: Path) -> None:
    """A limit that is no rate is one error line and exit 1, before serving."""
    result = subprocess.run(
        [*CLI, "serve", f"{TARGET}:api", "--unauthenticated-limit", "lots"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "http_unauthenticated_limit" in result.stderr + result.stdout


def test_serve_over_tls_with_client_certificates(tmp_path: Path) -> None:
    """--ssl-certfile/--ssl-keyfile serve HTTPS; with --ssl-ca-certs only a
    client presenting a certificate the CA signed gets an answer."""
    import ssl

    from tests.tls import certificates

    certs = certificates()
    trusted = ssl.create_default_context(cafile=str(certs.ca))
    trusted.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    options = (
        "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key),
        "--ssl-ca-certs", str(certs.ca),
    )  # fmt: skip
    with httpx.Client(verify=trusted) as client, served(tmp_path, *options, client=client) as s:
        assert client.get(f"{s.base}/healthz").status_code == 200
        no_certificate = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises(httpx.TransportError), httpx.Client(verify=no_certificate) as bare:
            bare.get(f"{s.base}/healthz")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{s.port}/healthz", timeout=5)


def test_serve_refuses_half_a_tls_setup_in_one_line(tmp_path: Path) -> None:
    from tests.tls import certificates

    certs = certificates()
    for options, needle in (
        (["--ssl-certfile", str(certs.server_cert)], "go together"),
        (["--ssl-certfile", str(tmp_path / "none.pem"), "--ssl-keyfile", "x"], "no such file"),
        (["--ssl-ca-certs", str(certs.ca)], "needs --ssl-certfile"),
    ):
        done = subprocess.run(
            [*CLI, "serve", f"{TARGET}:api", "--broker", f"sqlite:///{tmp_path}/x.db", *options],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert needle in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
