"""One chaos run, bounded in time and count, with a seed.

Processes (each a real child process, restarted after every kill):

- ``orders`` x2: the order saga's orchestrator (``ORDERS_SERVICES=orders``);
- ``participants`` x2: inventory, payment and shipping;
- ``relay`` (when the store is not the broker's database): ``conveyor relay``;
- ``front``: the HTTP front (uvicorn), which the load generator calls with an
  ``Idempotency-Key`` per order, some keys submitted twice, retrying the same
  key through every refused connection.

Faults, one every 0.3-1.2 s, chosen by the seeded generator: ``kill -9`` of
one process of each kind (then restarted), ``SIGSTOP`` of a worker past its
lease (then ``SIGCONT``), and, on the server configurations, ``kill -9`` of
the private broker or database server and its restart (same port, same
data: Redis with ``appendfsync always``, PostgreSQL with its WAL).

Then the load stops, every process is brought back, the system is left to
become quiet, and the invariants are checked from the store (see
``check``). Every loop is bounded by count and by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from conveyor import App, Settings
from conveyor.examples.orders.demo import PRODUCTS
from conveyor.examples.orders.services import TERMINAL, check_invariants
from tests.proxy import Proxy
from tests.servers import PrivatePostgres, PrivateRabbitMQ, RedisServer, _free_port

__all__ = ["CONFIGS", "Report", "run"]

LEASE = 2.0


def _db_faults() -> bool:
    """Also blackhole, reset and delay the database's connections
    (``CHAOS_DB_FAULTS=1``, ``--db-faults``). Off by default: runs with them
    leave orders unfinished (docs/guarantees.md)."""
    return os.environ.get("CHAOS_DB_FAULTS") == "1"


MIN_FAULTS_GRACE = 180.0
"""How long past its deadline a run may go on to reach ``min_faults``."""
"""The workers' lease: a SIGSTOP of 2.5-4 s outlives it."""


class _Redis(RedisServer):
    """The run's Redis (tests.servers.RedisServer: every write fsynced)."""

    name = "redis"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.url = f"redis://127.0.0.1:{self.port}/0?namespace=chaos&retry_for=120"


class _Postgres(PrivatePostgres):
    """The run's PostgreSQL cluster (tests.servers.PrivatePostgres)."""

    name = "postgres"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.url = f"{self.url}?namespace=chaos&reconnect_for=120"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            super().stop()
        self.remove()


class _RabbitMQ(PrivateRabbitMQ):
    """The run's RabbitMQ node (tests.servers.PrivateRabbitMQ)."""

    name = "rabbitmq"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.url = f"{self.url}?namespace=chaos&connect_timeout=120"


@dataclass
class _Setup:
    broker_url: str
    store_url: str
    servers: list[_Redis | _Postgres | _RabbitMQ]
    relay: bool
    proxies: dict[str, Proxy] = field(default_factory=dict)
    """The servers the processes reach through a proxy, by name."""


def _through_proxy(setup: _Setup, server: _Redis | _Postgres | _RabbitMQ) -> None:
    """The processes reach ``server`` (the broker or the database) through a
    proxy, so the nemesis can blackhole, reset and delay that link."""
    proxy = Proxy(server.port)
    setup.proxies[server.name] = proxy
    old, new = f":{server.port}/", f":{proxy.port}/"
    setup.broker_url = setup.broker_url.replace(old, new, 1)
    setup.store_url = setup.store_url.replace(old, new, 1)


def _sqlite(workdir: Path) -> _Setup:
    url = f"sqlite:///{workdir / 'orders.db'}"
    return _Setup(url, url, [], relay=False)


def _redis_postgres(workdir: Path) -> _Setup:
    redis, postgres = _Redis(workdir), _Postgres(workdir)
    setup = _Setup(redis.url, postgres.url, [redis, postgres], relay=True)
    _through_proxy(setup, redis)
    if _db_faults():
        _through_proxy(setup, postgres)
    return setup


def _rabbitmq_postgres(workdir: Path) -> _Setup:
    rabbitmq, postgres = _RabbitMQ(workdir), _Postgres(workdir)
    setup = _Setup(rabbitmq.url, postgres.url, [rabbitmq, postgres], relay=True)
    _through_proxy(setup, rabbitmq)
    if _db_faults():
        _through_proxy(setup, postgres)
    return setup


CONFIGS = {
    "sqlite": _sqlite,
    "redis-postgres": _redis_postgres,
    "rabbitmq-postgres": _rabbitmq_postgres,
}


@dataclass
class _Proc:
    kind: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.stopped = False

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def last_words(self) -> str:
        """The last line the process wrote (why it exited, for the report)."""
        with self.log.open("rb") as f:
            f.seek(max(0, self.log.stat().st_size - 4096))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line]
        return " ".join(lines[-1].split())[:160] if lines else "(nothing)"

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(30)


@dataclass
class Report:
    config: str
    seed: int
    seconds: float
    faults: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    """Processes that exited on their own (a server they needed was down at
    their start) and were started again, by kind."""
    exit_reasons: Counter[str] = field(default_factory=Counter)
    """The last line each of those wrote, by kind and line."""
    submitted: int = 0
    duplicates: int = 0
    accepted: int = 0
    invariants: list[tuple[str, bool, str]] = field(default_factory=list)
    evidence: Path | None = None
    """Where a failed run's logs were kept (with every task's stack)."""

    @property
    def ok(self) -> bool:
        return bool(self.invariants) and all(held for _, held, _ in self.invariants)

    def text(self) -> str:
        lines = [
            f"chaos {self.config}: seed {self.seed}, {self.seconds:.0f} s of faults, "
            f"{self.submitted} orders submitted ({self.duplicates} submitted twice), "
            f"{self.accepted} accepted",
            "faults: " + (", ".join(f"{k} x{n}" for k, n in sorted(self.faults.items())) or "none"),
            "exited on their own and restarted: "
            + (", ".join(f"{k} x{n}" for k, n in sorted(self.exits.items())) or "none"),
            *(f"  x{n} {why}" for why, n in sorted(self.exit_reasons.items())),
        ]
        lines += [
            f"  [{'ok' if held else 'VIOLATED'}] {name}: {d}" for name, held, d in self.invariants
        ]
        if self.evidence is not None:
            lines.append(f"logs, with every process's task stacks: {self.evidence}")
        return "\n".join(lines)


def _processes(setup: _Setup, workdir: Path, front_port: int, stock: int) -> list[_Proc]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "ORDERS_"))}
    env = {
        **base,
        "CONVEYOR_BROKER_URL": setup.broker_url,
        "CONVEYOR_STORE_URL": setup.store_url,
        "CONVEYOR_LEASE": str(LEASE),
        "CONVEYOR_IDLE_POLL": "0.05",
        "CONVEYOR_GRACE_PERIOD": "5",
        "CONVEYOR_LOG_LEVEL": "WARNING",
        # Stock for about half the orders (some 20 a second over 8 SKUs):
        # sagas that deliver and sagas that compensate.
        "ORDERS_STOCK": str(stock),
    }
    worker = [sys.executable, "-m", "conveyor", "worker", "conveyor.examples.orders.run:app"]
    front = [sys.executable, "-m", "uvicorn", "--factory", "conveyor.examples.orders.run:front"]
    specs = [
        ("orders", worker, {"ORDERS_SERVICES": "orders"}),
        ("orders", worker, {"ORDERS_SERVICES": "orders"}),
        ("participants", worker, {"ORDERS_SERVICES": "inventory,payment,shipping"}),
        ("participants", worker, {"ORDERS_SERVICES": "inventory,payment,shipping"}),
        (
            "front",
            [*front, "--port", str(front_port), "--log-level", "warning"],
            {"ORDERS_SERVICES": ""},
        ),
    ]
    if setup.relay:
        specs.append(("relay", [sys.executable, "-m", "conveyor", "relay"], {}))
    return [
        _Proc(kind, argv, {**env, **extra}, workdir / f"{kind}-{i}.log")
        for i, (kind, argv, extra) in enumerate(specs)
    ]


async def _load(
    base: str, rng: random.Random, deadline: float, max_orders: int, report: Report
) -> dict[str, str]:
    """Submit orders until ``deadline`` (at most ``max_orders``); the id
    accepted per Idempotency-Key."""
    accepted: dict[str, str] = {}
    skus = sorted(PRODUCTS)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for i in range(max_orders):
            if time.monotonic() > deadline:
                break
            key = f"chaos-{report.seed}-{i}"
            body = {"sku": rng.choice(skus), "qty": rng.randint(1, 2)}
            times = 2 if rng.random() < 0.1 else 1
            report.submitted += 1
            report.duplicates += times - 1
            for _ in range(times):
                answer = await _post(client, key, body, deadline + 60)
                if answer is not None and accepted.setdefault(key, answer) != answer:
                    raise AssertionError(f"{key}: two orders ({accepted[key]}, {answer})")
            await asyncio.sleep(rng.uniform(0.0, 0.05))
    report.accepted = len(accepted)
    return accepted


async def _post(
    client: httpx.AsyncClient, key: str, body: dict[str, object], deadline: float
) -> str | None:
    """POST until answered (the same key each time: idempotent); the id, or
    None if the deadline passed first."""
    while time.monotonic() < deadline:
        try:
            response = await client.post("/orders", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            await asyncio.sleep(0.1)
            continue
        if response.status_code == 202:
            return str(response.json()["id"])
        if response.status_code >= 500 or response.status_code == 429:
            await asyncio.sleep(0.1)
            continue
        raise AssertionError(f"{key}: {response.status_code} {response.text[:300]}")
    return None


def _nemesis(
    procs: list[_Proc],
    servers: list[_Redis | _Postgres | _RabbitMQ],
    proxies: dict[str, Proxy],
    rng: random.Random,
    deadline: float,
    report: Report,
    stop: threading.Event,
    min_faults: int = 0,
) -> None:
    """Faults until ``deadline``, and on until ``min_faults`` were injected
    (a busy machine stretches each fault, a RabbitMQ restart above all), for
    at most the run's length again or ``MIN_FAULTS_GRACE`` seconds, whichever
    is more; until ``stop``, a supervisor's part too: a process that exited
    on its own is started again (a thread: kills block). Bounded: at most
    10,000 turns."""
    last = deadline + max(deadline - time.monotonic(), MIN_FAULTS_GRACE)
    kinds = ["kill-orders", "kill-participants", "kill-front", "sigstop-worker"]
    if any(p.kind == "relay" for p in procs):
        kinds.append("kill-relay")
    kinds += [f"restart-{s.name}" for s in servers]
    kinds += [f"{fault}-{name}" for name in proxies for fault in ("blackhole", "reset", "delay")]
    for _ in range(10_000):
        if stop.is_set():
            return
        time.sleep(rng.uniform(0.3, 1.2))
        for proc in procs:
            if not proc.alive():
                report.exits[proc.kind] += 1
                report.exit_reasons[f"{proc.kind}: {proc.last_words()}"] += 1
                proc.start()
        injected = sum(report.faults.values())
        if time.monotonic() > deadline and (injected >= min_faults or time.monotonic() > last):
            continue
        fault = rng.choice(kinds)
        report.faults[fault] += 1
        if fault.startswith("kill-"):
            victim = rng.choice([p for p in procs if p.kind == fault[5:]])
            victim.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            victim.start()
        elif fault == "sigstop-worker":
            victim = rng.choice([p for p in procs if p.kind in ("orders", "participants")])
            victim.signal(signal.SIGSTOP)
            time.sleep(LEASE + rng.uniform(0.5, 2.0))
            victim.signal(signal.SIGCONT)
        elif fault.startswith("restart-"):
            server = next(s for s in servers if fault == f"restart-{s.name}")
            server.kill()
            time.sleep(rng.uniform(0.2, 1.0))
            server.start()
        else:
            how, _, name = fault.partition("-")
            proxies[name].set(how)
            if how != "reset":
                time.sleep(rng.uniform(0.5, 3.0))
                proxies[name].set("pass")


async def _quiet(app: App, ids: set[str], deadline: float) -> None:
    """Until every accepted order is terminal, or the deadline."""
    while time.monotonic() < deadline:
        try:
            async with app.transaction() as s:
                rows = await s.fetchall("SELECT id, state FROM orders")
        except Exception:  # a server still coming back
            await asyncio.sleep(0.5)
            continue
        states = {str(r[0]): str(r[1]) for r in rows}
        if all(states.get(i) in TERMINAL for i in ids):
            return
        await asyncio.sleep(0.5)


async def check(app: App, accepted: dict[str, str]) -> list[tuple[str, bool, str]]:
    """The order system's invariants, then the chaos run's own."""
    results = await check_invariants(app)
    async with app.transaction() as s:
        stored = {str(r[0]) for r in await s.fetchall("SELECT id FROM orders")}
        outbox = await s.fetchone("SELECT COUNT(*) FROM conveyor_outbox")
        twice = await s.fetchone(
            "SELECT COUNT(*) FROM (SELECT grp, msg_id FROM conveyor_inbox "
            "GROUP BY grp, msg_id HAVING COUNT(*) > 1) t"
        )
        steps = await s.fetchone(
            "SELECT COUNT(*) FROM (SELECT saga_id, step FROM conveyor_saga_steps "
            "GROUP BY saga_id, step HAVING COUNT(*) > 1) t"
        )
        charges = await s.fetchone(
            "SELECT COUNT(*) FROM (SELECT order_id FROM payments WHERE kind = 'charge' "
            "AND status = 'OK' GROUP BY order_id HAVING COUNT(*) > 1) t"
        )
    ids = set(accepted.values())
    missing, extra = ids - stored, stored - ids
    results += [
        (
            "accepted orders == stored orders",
            not missing and not extra,
            f"{len(ids)} accepted, {len(stored)} stored"
            + (f"; missing {sorted(missing)[:5]}" if missing else "")
            + (f"; unexpected {sorted(extra)[:5]}" if extra else ""),
        ),
        (
            "one order per Idempotency-Key",
            len(ids) == len(accepted),
            f"{len(accepted)} keys, {len(ids)} orders",
        ),
        (
            "no order charged twice",
            int(charges[0]) == 0 if charges else False,
            f"{charges[0] if charges else '?'} orders",
        ),
        (
            "no (group, message) applied twice",
            twice is not None and int(twice[0]) == 0,
            f"{twice[0] if twice else '?'} pairs",
        ),
        (
            "no (saga, step) applied twice",
            steps is not None and int(steps[0]) == 0,
            f"{steps[0] if steps else '?'} pairs",
        ),
        (
            "outbox drained",
            outbox is not None and int(outbox[0]) == 0,
            f"{outbox[0] if outbox else '?'} rows left",
        ),
    ]
    if not all(held for _, held, _ in results):
        results.append(("where things stand (not an invariant)", True, await _where(app)))
    return results


async def _where(app: App) -> str:
    """What a failed run leaves to look at: the sagas of orders not
    terminal, by state and step, the queues still holding messages, and
    the dead letters by topic."""
    async with app.transaction() as s:
        sagas = await s.fetchall(
            "SELECT s.state, s.phase, s.step, COUNT(*) FROM orders o "
            "LEFT JOIN conveyor_sagas s ON s.id = o.id "
            "WHERE o.state NOT IN ('DELIVERED', 'CANCELLED') "
            "GROUP BY s.state, s.phase, s.step ORDER BY 4 DESC"
        )
        dead = await s.fetchall(
            "SELECT topic, COUNT(*) FROM conveyor_dead GROUP BY topic ORDER BY 2 DESC"
        )
    try:
        queues = [q for q in await app.broker.stats() if q.ready or q.in_flight or q.delayed]
    except Exception as exc:  # the broker may be the thing that broke
        queues_text = f"queues unknown ({type(exc).__name__}: {exc})"
    else:
        queues_text = "queues holding messages: " + (
            ", ".join(
                f"{q.topic}/{q.group} ready {q.ready} in flight {q.in_flight} delayed {q.delayed}"
                for q in queues
            )
            or "none"
        )
    return "; ".join(
        [
            "sagas of orders not terminal (state/phase/step: n): "
            + (", ".join(f"{r[0]}/{r[1]}/{r[2]}: {r[3]}" for r in sagas) or "none"),
            queues_text,
            "dead letters: " + (", ".join(f"{r[0]}: {r[1]}" for r in dead) or "none"),
        ]
    )


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="conveyor-chaos-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _keep_evidence(procs: list[_Proc], workdir: Path, seed: int) -> Path:
    """After a violation, before anything stops: every live process writes
    its tasks' stacks to its log (``kill -USR1``), and the logs are copied
    where the run's clean-up leaves them. Bounded: 5 s for the dumps."""
    sizes = {p.log: p.log.stat().st_size for p in procs}
    for proc in procs:
        proc.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(p.log.stat().st_size > sizes[p.log] for p in procs if p.alive()):
            break
        time.sleep(0.1)
    kept = Path(tempfile.gettempdir()) / f"conveyor-chaos-failed-{seed}"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir()
    for log in workdir.glob("*.log"):
        shutil.copy(log, kept / log.name)
    return kept


def run(
    config: str,
    *,
    seconds: float,
    seed: int | None = None,
    max_orders: int = 100_000,
    min_faults: int = 0,
) -> Report:
    """One run of ``seconds`` of faults under load on ``config``; the report
    (``report.ok``: every invariant held)."""
    seed = random.SystemRandom().randrange(1, 2**31) if seed is None else seed
    report = Report(config, seed, seconds)
    with _workdir() as workdir:
        setup = CONFIGS[config](workdir)
        for server in setup.servers:
            server.start()
        port = _free_port()
        procs = _processes(setup, workdir, port, stock=max(40, int(seconds * 1.2)))
        try:
            for proc in procs:
                proc.start()
            report.invariants = asyncio.run(
                _drive(setup, procs, port, seconds, seed, max_orders, min_faults, report)
            )
            if not report.ok:
                report.evidence = _keep_evidence(procs, workdir, seed)
        except BaseException:
            for log in sorted(workdir.glob("*.log")):
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise
        finally:
            for proc in procs:
                proc.signal(signal.SIGCONT)
                proc.signal(signal.SIGTERM)
            for proc in procs:
                if proc.popen is not None:
                    try:
                        proc.popen.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            for server in setup.servers:
                server.stop()
            for proxy in setup.proxies.values():
                proxy.close()
    return report


async def _drive(
    setup: _Setup,
    procs: list[_Proc],
    port: int,
    seconds: float,
    seed: int,
    max_orders: int,
    min_faults: int,
    report: Report,
) -> list[tuple[str, bool, str]]:
    rng = random.Random(seed)
    app = App(
        "chaos-check",
        settings=Settings(broker_url=setup.broker_url, store_url=setup.store_url),
    )
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(600):  # the front answers once it is connected
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"{base}/orders/none", timeout=2)).status_code == 404:
                    break
            await asyncio.sleep(0.1)
    deadline = time.monotonic() + seconds
    stop = threading.Event()
    nemesis = asyncio.create_task(
        asyncio.to_thread(
            _nemesis,
            procs,
            setup.servers,
            setup.proxies,
            random.Random(seed + 1),
            deadline,
            report,
            stop,
            min_faults,
        )
    )
    try:
        # The nemesis runs to the deadline even if the load ends first (the
        # orders still in flight meet its faults), and supervises until the
        # load has its last answer, and past it until ``min_faults``.
        accepted = await _load(base, rng, deadline, max_orders, report)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        for _ in range(10_000):
            enough = sum(report.faults.values()) >= min_faults
            if (
                enough
                or nemesis.done()
                or time.monotonic() > deadline + max(seconds, MIN_FAULTS_GRACE)
            ):
                break
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await nemesis
    for proc in procs:  # everything back up, nothing left stopped
        proc.signal(signal.SIGCONT)
        if not proc.alive():
            proc.start()
    async with app:
        await _quiet(app, set(accepted.values()), time.monotonic() + 180)
        return await check(app, accepted)
