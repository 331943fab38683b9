"""The processes of one run: HTTP replicas and workers on 127.0.0.1, each a
``python -m conveyor.examples.sum_of_primes replica|worker`` subprocess with its log
in the run directory. Used by ``python -m conveyor.examples.sum_of_primes up`` and
by the end-to-end test, which kills a replica in the middle of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from conveyor.examples.sum_of_primes.service import ServiceConfig, prepare

__all__ = ["Stack", "drop_namespace", "free_port", "redis_answers"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_answers(redis_url: str) -> bool:
    """Whether Redis at ``redis_url`` answers PING."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def drop_namespace(redis_url: str, namespace: str) -> int:
    """Delete every key of ``namespace`` (broker streams, job records, the
    outbox) from Redis; returns how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"conveyor:{{{namespace}}}:*", count=500))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


def _config_args(config: ServiceConfig) -> list[str]:
    args = ["--redis", config.redis_url, "--namespace", config.namespace]
    args += ["--store", config.store_url, "--ttl", repr(config.ttl)]
    if config.rate_limit is not None:
        args += ["--rate-limit", config.rate_limit]
    return args


def _end(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@dataclass
class Stack:
    """``replicas`` HTTP replicas (named r1, r2, ...) and ``workers`` worker
    processes of ``config``, logging into ``workdir``. ``start()`` returns
    once every replica answers ``/readyz``; ``stop()`` (idempotent) sends
    SIGTERM and kills what is still running after ``grace`` seconds
    (``replica_grace`` for replicas: they hold no state, and their request
    handling ends within a second)."""

    config: ServiceConfig
    workdir: Path
    replicas: int = 3
    workers: int = 1
    grace: float = 10.0
    replica_grace: float = 3.0
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def upstreams(self) -> list[str]:
        """``127.0.0.1:port`` of every replica, for the load balancer."""
        return [f"127.0.0.1:{port}" for port in self.ports.values()]

    def _spawn(self, name: str, args: list[str]) -> None:
        command = [sys.executable, "-m", "conveyor.examples.sum_of_primes", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def start(self, *, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(prepare(self.config))
        for i in range(1, self.workers + 1):
            self._spawn(f"worker{i}", ["worker", *_config_args(self.config)])
        for i in range(1, self.replicas + 1):
            name, port = f"r{i}", free_port()
            self.ports[name] = port
            args = ["replica", "--name", name, "--port", str(port)]
            self._spawn(name, [*args, *_config_args(self.config)])
        deadline = time.monotonic() + timeout
        for name, port in self.ports.items():
            self._wait_ready(name, port, deadline)

    def _wait_ready(self, name: str, port: int, deadline: float) -> None:
        with httpx.Client(timeout=2.0) as client:
            while True:
                process = self.processes[name]
                if process.poll() is not None:
                    raise RuntimeError(
                        f"replica {name} exited with {process.returncode}: {self.log(name)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {name} not ready in time: {self.log(name)}")
                time.sleep(0.05)

    def log(self, name: str) -> str:
        """The tail of a process's log (for error messages)."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to one process (``r2``, ``worker1``) and reap it if it ends."""
        process = self.processes[name]
        process.send_signal(sig)
        if sig == signal.SIGKILL:
            process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for name, process in self.processes.items():
            _end(process, self.replica_grace if name in self.ports else self.grace)
