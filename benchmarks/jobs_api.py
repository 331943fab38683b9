"""HTTP job API benchmark: accept throughput and latency of one replica.

Starts ``conveyor serve benchmarks.jobs_api_app:api`` (uvicorn, one process) on
127.0.0.1 and drives it with a bounded load generator of plain asyncio
sockets (HTTP/1.1 keep-alive; a Python client would otherwise be the
bottleneck). Per set-up it prints:

- accepted jobs/s of ``POST /jobs/square`` (202), closed loop, ``--connections``
  concurrent connections, ``--requests`` requests;
- p50/p99 latency of that POST and of ``GET /jobs/square/{id}``;
- p50/p99 latency of POST at a fixed open-loop rate (``--rate``, default 1,000/s).

Set-ups: the embedded default (SQLite file) and PostgreSQL + Redis job store
(needs the servers of ./scripts/services). No worker runs: it measures the
accept path. Run: ``python -m benchmarks.jobs_api [--setups sqlite,postgres]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def server(env: dict[str, str], workdir: Path) -> Iterator[int]:
    port = _free_port()
    log = (workdir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor",
            "serve",
            "benchmarks.jobs_api_app:api",
            "--port",
            str(port),
        ],
        env={**os.environ, **env, "CONVEYOR_LOG_LEVEL": "WARNING"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "server did not start: " + (workdir / "serve.log").read_text()
                    ) from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        self.writer.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def closed_loop(
    port: int, connections: int, requests: int, make: object
) -> tuple[float, list[float], list[bytes]]:
    """``requests`` requests over ``connections`` connections as fast as they
    are answered; returns (requests/s, latencies, bodies)."""
    assert callable(make)
    conns = [await Connection.open(port) for _ in range(connections)]
    latencies: list[float] = []
    bodies: list[bytes] = []
    counter = iter(range(requests))

    async def run(conn: Connection) -> None:
        for i in counter:
            method, path, body, expect = make(i)
            start = time.perf_counter()
            status, payload = await conn.request(method, path, body)
            latencies.append(time.perf_counter() - start)
            if status != expect:
                raise RuntimeError(f"{method} {path}: {status} {payload[:200]!r}")
            bodies.append(payload)

    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in conns))
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return requests / elapsed, latencies, bodies


async def open_loop(port: int, rate: float, seconds: float, connections: int) -> list[float]:
    """POSTs sent on a fixed schedule of ``rate`` per second (latency counts
    from the scheduled send time, so queueing shows)."""
    total = int(rate * seconds)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Connection.open(port))
    latencies: list[float] = []
    body = json.dumps({"n": 7}).encode()
    start = time.perf_counter()

    async def one(at: float) -> None:
        conn = await pool.get()
        try:
            status, _ = await conn.request("POST", "/jobs/square", body)
            if status != 202:
                raise RuntimeError(f"POST answered {status}")
            latencies.append(time.perf_counter() - at)
        finally:
            pool.put_nowait(conn)

    tasks = []
    for i in range(total):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    return latencies


async def measure(port: int, args: argparse.Namespace) -> dict[str, float]:
    body = json.dumps({"n": 7}).encode()
    # Warm up (imports, prepared statements, caches).
    await closed_loop(port, 4, 200, lambda i: ("POST", "/jobs/square", body, 202))
    rate, post_lat, bodies = await closed_loop(
        port, args.connections, args.requests, lambda i: ("POST", "/jobs/square", body, 202)
    )
    ids = [json.loads(b)["id"] for b in bodies]
    _, get_lat, _ = await closed_loop(
        port,
        args.connections,
        min(args.requests, len(ids)),
        lambda i: ("GET", f"/jobs/square/{ids[i]}", b"", 200),
    )
    fixed = await open_loop(port, args.rate, args.seconds, args.connections * 2)
    return {
        "accepted_per_s": rate,
        "post_p50_ms": _pct(post_lat, 0.5),
        "post_p99_ms": _pct(post_lat, 0.99),
        "get_p50_ms": _pct(get_lat, 0.5),
        "get_p99_ms": _pct(get_lat, 0.99),
        "fixed_rate": args.rate,
        "fixed_p50_ms": _pct(fixed, 0.5),
        "fixed_p99_ms": _pct(fixed, 0.99),
        "fixed_mean_ms": statistics.fmean(fixed) * 1000,
    }


def setups(names: list[str], workdir: Path) -> Iterator[tuple[str, dict[str, str], list[str]]]:
    """(label, environment, namespaced URLs to drop afterwards)."""
    for name in names:
        if name == "sqlite":
            url = f"sqlite:///{workdir / 'bench.db'}"
            yield "SQLite (embedded default)", {"CONVEYOR_BROKER_URL": url}, []
        elif name == "postgres":
            ns = f"bench{uuid.uuid4().hex[:10]}"
            pg = f"{POSTGRES_URL}?namespace={ns}"
            redis = f"{REDIS_URL}?namespace={ns}"
            env = {"CONVEYOR_BROKER_URL": pg, "BENCH_JOBS_REDIS_URL": redis}
            yield "PostgreSQL + Redis job store", env, [pg, redis]
        else:
            raise SystemExit(f"unknown set-up {name!r}: choose sqlite, postgres")


async def _drop(urls: list[str]) -> None:
    if not urls:
        return
    from tests.namespaces import drop_all

    await drop_all(urls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default="sqlite,postgres")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not 100 <= args.requests <= 1_000_000 or not 1 <= args.connections <= 512:
        raise SystemExit("--requests must be 100..1e6 and --connections 1..512")
    rows = []
    with tempfile.TemporaryDirectory(prefix="conveyor-http-bench-") as tmp:
        for label, env, urls in setups(args.setups.split(","), Path(tmp)):
            try:
                with server(env, Path(tmp)) as port:
                    rows.append((label, asyncio.run(measure(port, args))))
            finally:
                asyncio.run(_drop(urls))
    print(
        f"\nHTTP job API, one uvicorn replica, {args.connections} connections, "
        f"{args.requests} requests; fixed rate {args.rate:g}/s for {args.seconds:g}s"
    )
    print(
        f"{'set-up':32} {'accepted/s':>10} {'POST p50':>9} {'POST p99':>9} "
        f"{'GET p50':>8} {'GET p99':>8} {'@rate p50':>10} {'@rate p99':>10}"
    )
    for label, r in rows:
        print(
            f"{label:32} {r['accepted_per_s']:10.0f} {r['post_p50_ms']:8.2f}ms "
            f"{r['post_p99_ms']:8.2f}ms {r['get_p50_ms']:7.2f}ms {r['get_p99_ms']:7.2f}ms "
            f"{r['fixed_p50_ms']:9.2f}ms {r['fixed_p99_ms']:9.2f}ms"
        )
    print("targets: >= 2,000 accepted/s; p99 <= 25 ms at 1,000 req/s")


if __name__ == "__main__":
    main()
