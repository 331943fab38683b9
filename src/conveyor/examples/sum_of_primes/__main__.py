"""``python -m conveyor.examples.sum_of_primes COMMAND``:

- ``up``: check Redis, start three replicas, a worker and nginx in front of
  them (config, logs and pid file in a temporary directory), print the URL,
  run until Ctrl-C (or, with ``--demo N``, submit N requests, print the
  results and stop); then stop everything and delete the run's Redis keys.
- ``demo --url URL``: submit N random requests to a running service through
  the polling client and print each sum.
- ``replica`` / ``worker``: one process of the stack (started by ``up``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

try:
    from conveyor.examples.sum_of_primes.balancer import nginx_conf, start_nginx
    from conveyor.examples.sum_of_primes.service import ServiceConfig, create_asgi, run_worker
    from conveyor.examples.sum_of_primes.stack import (
        Stack,
        drop_namespace,
        free_port,
        redis_answers,
    )
except ModuleNotFoundError as exc:
    raise SystemExit(
        f"error: the sum-of-primes example needs pip install 'conveyor[http,redis]' ({exc})"
    ) from None

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _config(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(
        redis_url=args.redis,
        namespace=args.namespace,
        store_url=args.store,
        ttl=args.ttl,
        rate_limit=args.rate_limit,
    )


def _service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", default=DEFAULT_REDIS, help="Redis URL (broker and job store)")
    parser.add_argument("--namespace", required=True, help="prefix of this run's Redis keys")
    parser.add_argument("--store", required=True, help="the runtime's SQL store URL")
    parser.add_argument("--ttl", type=float, default=180.0, help="seconds answers are kept")
    parser.add_argument(
        "--rate-limit",
        default=None,
        help='requests per second, all callers together, e.g. "1000/s"',
    )


def replica(args: argparse.Namespace) -> None:
    import uvicorn

    app = create_asgi(_config(args), replica=args.name)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def worker(args: argparse.Namespace) -> None:
    asyncio.run(run_worker(_config(args)))


def _nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        raise SystemExit("nginx is not installed: run `apt-get install -y nginx` (as root)")
    return found


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nginx did not start on port {port}")
        time.sleep(0.05)


def _stop_nginx(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGQUIT)  # finish requests in flight, then exit
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def up(args: argparse.Namespace) -> None:
    if not redis_answers(args.redis):
        raise SystemExit(f"Redis does not answer at {args.redis}: start redis-server first")
    binary = _nginx()
    workdir = Path(tempfile.mkdtemp(prefix="sum-of-primes-"))
    namespace = f"sop{uuid.uuid4().hex[:10]}"
    config = ServiceConfig(
        redis_url=args.redis,
        namespace=namespace,
        store_url=f"sqlite:///{workdir / 'store.db'}",
        rate_limit=args.rate_limit,
    )
    stack = Stack(config, workdir, replicas=args.replicas, workers=args.workers)
    nginx: subprocess.Popen[bytes] | None = None

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the run like Ctrl-C: through `finally`

    signal.signal(signal.SIGTERM, terminate)
    try:
        stack.start()
        port = args.port or free_port()
        nginx = start_nginx(binary, workdir, nginx_conf(port=port, upstreams=stack.upstreams))
        _wait_port(port, nginx, 20)
        url = f"http://127.0.0.1:{port}"
        print(f"sum of primes at {url} (replicas {', '.join(stack.upstreams)}; files in {workdir})")
        print(
            f"""  curl -si -X POST {url}/sumPrime -H 'content-type: application/json' -d '{{"a": 1, "b": 100}}'"""
        )
        print(f"  curl -s {url}/sumPrime/<requestId>")
        if args.demo:
            asyncio.run(demo_run(url, args.demo, seed=args.seed))
            return
        print("Ctrl-C stops everything")
        deadline = time.monotonic() + (args.duration or math.inf)
        while time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        if nginx is not None:
            _stop_nginx(nginx)
        stack.stop()
        drop_namespace(args.redis, namespace)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


async def demo_run(url: str, count: int, *, seed: int | None = None) -> None:
    """Submit ``count`` random ranges at once, then print every answer."""
    from conveyor.examples.sum_of_primes.client import SumPrimeClient

    rng = random.Random(seed)
    ranges = []
    for _ in range(count):
        a = rng.randint(1, 10**9)
        ranges.append((a, a + rng.randint(0, 100_000)))
    started = time.perf_counter()
    async with SumPrimeClient(url) as client:
        sums = await client.sum_many(ranges, timeout=60)
    elapsed = time.perf_counter() - started
    for (a, b), total in zip(ranges, sums, strict=True):
        print(f"  sum of primes in [{a}, {b}] = {total}")
    print(f"{count} answers in {elapsed:.2f}s")


def demo(args: argparse.Namespace) -> None:
    asyncio.run(demo_run(args.url, args.count, seed=args.seed))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conveyor.examples.sum_of_primes")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("up", help="run replicas, a worker and nginx")
    p.add_argument("--redis", default=DEFAULT_REDIS)
    p.add_argument("--port", type=int, default=8080, help="nginx's port (0: any free port)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--rate-limit",
        default="1000/s",
        help="requests per second for all callers, shared through Redis",
    )
    p.add_argument("--demo", type=int, default=0, metavar="N", help="submit N requests, then stop")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    p.set_defaults(func=up)

    p = commands.add_parser("demo", help="submit random requests to a running service")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("-n", "--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=demo)

    p = commands.add_parser("replica", help="one HTTP replica (started by `up`)")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    _service_options(p)
    p.set_defaults(func=replica)

    p = commands.add_parser("worker", help="one worker (started by `up`)")
    _service_options(p)
    p.set_defaults(func=worker)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
