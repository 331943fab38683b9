"""Server brokers benchmark; same as ``conveyor bench brokers``.

.venv/bin/python benchmarks/brokers.py [--messages N] [--brokers redis,rabbitmq,...]
                                       [--output results.json]

Per broker, in one run on this machine: a hand-written batched client (the
ceiling), Conveyor publishing and consuming with a no-op handler, Dramatiq,
FastStream and Taskiq on Redis and RabbitMQ, and on PostgreSQL the full unit of work against a raw
asyncpg loop. Every server-side name carries this run's token and is deleted
at the end; Kafka (Tansu, in memory) is started for the run and stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from conveyor.cli._bench import _consume, _publish
from conveyor.testing._kafka import KafkaServer, start_kafka

__all__ = ["BROKERS", "run_broker_bench"]

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")

BROKERS = ("redis", "rabbitmq", "postgres", "nats", "kafka")
DRAMATIQ = ("redis", "rabbitmq")
BATCH = 500
PAYLOAD = json.dumps({"i": 0, "amount": 1234}).encode()
# Every loop below stops after this long even if a server stops answering.
STEP_TIMEOUT = 180.0
DRAMATIQ_THREADS = 8  # Dramatiq's default per process
HERE = Path(__file__).resolve().parent

Results = dict[str, Any]
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` that gives up after ``STEP_TIMEOUT``."""
    return asyncio.run(asyncio.wait_for(coro, STEP_TIMEOUT))


def _deadline() -> float:
    return time.monotonic() + STEP_TIMEOUT


def _check(deadline: float, what: str, done: int, total: int) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"{what}: {done} of {total} after {STEP_TIMEOUT:g}s")


# -- raw clients: batched produce, then consume + ack of the pre-filled queue ---
# Consume rates run from the first message received to the last acknowledged.


async def raw_redis(url: str, n: int, name: str) -> tuple[float, float]:
    """Pipelined XADD, then XREADGROUP COUNT 500 + XACK."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        await client.xgroup_create(name, "g", id="0", mkstream=True)
        fields: dict[Any, Any] = {"payload": PAYLOAD}
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(BATCH, n - i)):
                pipe.xadd(name, fields)
            await pipe.execute()
        produce = n / (time.perf_counter() - start)
        got, first, deadline = 0, 0.0, _deadline()
        while got < n:
            _check(deadline, "redis consume", got, n)
            reply = await client.xreadgroup("g", "c", {name: ">"}, count=BATCH, block=1000)
            if not reply:
                continue
            first = first or time.perf_counter()
            ids = [mid for mid, _ in reply[0][1]]
            await client.xack(name, "g", *ids)
            got += len(ids)
        return produce, (n - 1) / (time.perf_counter() - first)
    finally:
        await client.delete(name)
        await client.aclose()


async def raw_rabbitmq(url: str, n: int, name: str) -> tuple[float, float]:
    """Publisher confirms (500 in flight), quorum queue, persistent messages;
    consumer with prefetch 500 acknowledging every 250 with ``multiple=True``."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        exchange = channel.default_exchange
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=name,
                    )
                    for _ in range(min(BATCH, n - i))
                )
            )
        produce = n / (time.perf_counter() - start)
        await channel.set_qos(prefetch_count=BATCH)
        got, first = 0, 0.0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got, first
            first = first or time.perf_counter()
            got += 1
            if got % (BATCH // 2) == 0 or got == n:
                await message.ack(multiple=True)
            if got >= n:
                done.set()

        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), STEP_TIMEOUT)
        elapsed = time.perf_counter() - first
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return produce, (n - 1) / elapsed
    finally:
        await conn.close()


async def raw_postgres(url: str, n: int, schema: str) -> tuple[float, float]:
    """500 rows per INSERT, then ``DELETE ... WHERE id IN (SELECT ... FOR
    UPDATE SKIP LOCKED LIMIT 500) RETURNING``, one transaction per batch."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        table = f"{schema}.q"
        await conn.execute(
            f"CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)"
        )
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            await conn.execute(
                f"INSERT INTO {table} (payload) SELECT unnest($1::bytea[])",
                [PAYLOAD] * min(BATCH, n - i),
            )
        produce = n / (time.perf_counter() - start)
        claim = (
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id "
            f"FOR UPDATE SKIP LOCKED LIMIT {BATCH}) RETURNING id, payload"
        )
        got, deadline = 0, _deadline()
        start = time.perf_counter()
        while got < n:
            _check(deadline, "postgres consume", got, n)
            got += len(await conn.fetch(claim))
        return produce, n / (time.perf_counter() - start)
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def raw_nats(url: str, n: int, name: str) -> tuple[float, float]:
    """JetStream file stream: 500 publishes in flight (each acknowledged by the
    server), then a pull consumer fetching 500 at a time and acking each."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = f"{name}.in"
    try:
        await js.add_stream(name=name, subjects=[subject])
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            await asyncio.gather(*(js.publish(subject, PAYLOAD) for _ in range(min(BATCH, n - i))))
        produce = n / (time.perf_counter() - start)
        sub = await js.pull_subscribe(subject, durable="g", stream=name)
        got, first, deadline = 0, 0.0, _deadline()
        while got < n:
            _check(deadline, "nats consume", got, n)
            try:
                batch = await sub.fetch(BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            first = first or time.perf_counter()
            for msg in batch:
                await msg.ack()
            got += len(batch)
        await nc.flush()
        return produce, (n - 1) / (time.perf_counter() - first)
    finally:
        try:
            await js.delete_stream(name)
        finally:
            await nc.close()


async def raw_kafka(url: str, n: int, topic: str) -> tuple[float, float]:
    """aiokafka producer (acks=all, 500 sends in flight), then a consumer in a
    group reading 500 at a time and committing after each batch."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = url.removeprefix("kafka://").split("?")[0]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            futures = [await producer.send(topic, PAYLOAD) for _ in range(min(BATCH, n - i))]
            await asyncio.gather(*futures)
        produce = n / (time.perf_counter() - start)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="g",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=BATCH,
    )
    await consumer.start()
    try:
        got, first, deadline = 0, 0.0, _deadline()
        while got < n:
            _check(deadline, "kafka consume", got, n)
            batches = await consumer.getmany(timeout_ms=1000, max_records=BATCH)
            count = sum(len(records) for records in batches.values())
            if not count:
                continue
            first = first or time.perf_counter()
            await consumer.commit()
            got += count
        return produce, (n - 1) / (time.perf_counter() - first)
    finally:
        await consumer.stop()


RAW: dict[str, Callable[[str, int, str], Any]] = {
    "redis": raw_redis,
    "rabbitmq": raw_rabbitmq,
    "postgres": raw_postgres,
    "nats": raw_nats,
    "kafka": raw_kafka,
}

RAW_WHAT = {
    "redis": "redis-py: pipelined XADD; XREADGROUP COUNT 500 + XACK",
    "rabbitmq": "aio-pika: confirms, quorum queue; prefetch 500, ack multiple",
    "postgres": "asyncpg: INSERT 500 rows; DELETE .. SKIP LOCKED LIMIT 500",
    "nats": "nats-py JetStream: publish; pull fetch 500 + ack",
    "kafka": "aiokafka: acks=all producer; getmany 500 + commit",
}


# -- the raw PostgreSQL unit of work: one transaction per message --------------


async def raw_postgres_uow(url: str, n: int, schema: str) -> float:
    """Per message, one transaction: claim the oldest row (FOR UPDATE SKIP
    LOCKED), insert the inbox row, a business row and an outbox row, delete
    the claimed row."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"""
            CREATE TABLE {schema}.q (id BIGSERIAL PRIMARY KEY, msg_id TEXT NOT NULL,
                topic TEXT NOT NULL, payload BYTEA NOT NULL);
            CREATE INDEX ON {schema}.q (topic, id);
            CREATE TABLE {schema}.inbox (grp TEXT, msg_id TEXT, PRIMARY KEY (grp, msg_id));
            CREATE TABLE {schema}.business (id BIGSERIAL PRIMARY KEY, msg_id TEXT, amount BIGINT);
            """
        )
        await conn.execute(
            f"INSERT INTO {schema}.q (msg_id, topic, payload) "
            "SELECT unnest($1::text[]), 'in', unnest($2::bytea[])",
            [uuid.uuid4().hex for _ in range(n)],
            [PAYLOAD] * n,
        )
        claim = (
            f"SELECT id, msg_id, payload FROM {schema}.q WHERE topic = 'in' "
            "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
        deadline = _deadline()
        start = time.perf_counter()
        for done in range(n):
            _check(deadline, "raw unit of work", done, n)
            async with conn.transaction():
                row = await conn.fetchrow(claim)
                assert row is not None
                body = json.loads(row["payload"])
                await conn.execute(f"INSERT INTO {schema}.inbox VALUES ('g', $1)", row["msg_id"])
                await conn.execute(
                    f"INSERT INTO {schema}.business (msg_id, amount) VALUES ($1, $2)",
                    row["msg_id"],
                    body["amount"],
                )
                await conn.execute(
                    f"INSERT INTO {schema}.q (msg_id, topic, payload) VALUES ($1, 'out', $2)",
                    uuid.uuid4().hex,
                    row["payload"],
                )
                await conn.execute(f"DELETE FROM {schema}.q WHERE id = $1", row["id"])
        return n / (time.perf_counter() - start)
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


# -- Dramatiq --------------------------------------------------------------------


def _peer_rate(
    what: str, preload: list[str], worker: list[str], env: dict[str, str], out: str, n: int
) -> float:
    """Run ``preload`` (enqueues ``n`` messages), then ``worker`` until it
    writes ``{"first": t, "last": t}`` to ``out``; the rate from the first
    call to the last."""
    subprocess.run(preload, env=env, check=True, timeout=STEP_TIMEOUT, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(
        worker,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = _deadline()
        while not os.path.exists(out):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode}")
            _check(deadline, what, 0, n)
            time.sleep(0.05)
        marks = json.loads(Path(out).read_text())
        return (n - 1) / (marks["last"] - marks["first"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def dramatiq_rate(url: str, n: int, token: str, workdir: str) -> float:
    """Enqueue ``n`` messages for a no-op actor, then run ``dramatiq`` (one
    process, default threads) until it has run them all."""
    queue = f"{token}_dramatiq"
    out = os.path.join(workdir, f"dramatiq-{uuid.uuid4().hex}.json")
    env = {
        **os.environ,
        "BENCH_DRAMATIQ_URL": url,
        "BENCH_DRAMATIQ_QUEUE": queue,
        "BENCH_DRAMATIQ_NAMESPACE": f"dramatiq-{token}",
        "BENCH_DRAMATIQ_COUNT": str(n),
        "BENCH_DRAMATIQ_OUT": out,
    }
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import dramatiq_app as a\n"
        "for i in range(int(sys.argv[2])): a.noop.send(i)\n"
        "a.broker.close()"
    )
    preload = [sys.executable, "-c", code, str(HERE), str(n)]
    worker = [sys.executable, "-m", "dramatiq", "dramatiq_app", "--path", str(HERE)]
    worker += ["--processes", "1", "--threads", str(DRAMATIQ_THREADS), "--queues", queue]
    return _peer_rate("dramatiq", preload, worker, env, out, n)


def _peer_env(name: str, url: str, n: int, token: str, workdir: str) -> tuple[str, dict[str, str]]:
    """Where a peer app reports, and the variables it reads (benchmarks/_peer.py)."""
    out = os.path.join(workdir, f"{name}-{uuid.uuid4().hex}.json")
    here = [str(HERE), os.environ.get("PYTHONPATH", "")]
    return out, {
        **os.environ,
        "BENCH_PEER_URL": url,
        "BENCH_PEER_QUEUE": f"{token}_{name}",
        "BENCH_PEER_COUNT": str(n),
        "BENCH_PEER_OUT": out,
        "PYTHONPATH": os.pathsep.join(filter(None, here)),
    }


def faststream_rate(url: str, n: int, token: str, workdir: str) -> float:
    """Enqueue ``n`` messages, then run a FastStream no-op subscriber (one
    process, prefetch 256, acknowledged after the handler) until it has
    handled them all (benchmarks/faststream_app.py)."""
    out, env = _peer_env("faststream", url, n, token, workdir)
    app = str(HERE / "faststream_app.py")
    preload, worker = [sys.executable, app, "publish"], [sys.executable, app, "consume"]
    return _peer_rate("faststream", preload, worker, env, out, n)


def taskiq_rate(url: str, n: int, token: str, workdir: str) -> float:
    """Enqueue ``n`` tasks, then run ``taskiq worker`` (one process, up to
    256 tasks at once, prefetch 256) until it has run them all
    (benchmarks/taskiq_app.py)."""
    out, env = _peer_env("taskiq", url, n, token, workdir)
    preload = [sys.executable, str(HERE / "taskiq_app.py"), "publish"]
    worker = [sys.executable, "-m", "taskiq", "worker", "taskiq_app:broker", "--workers", "1"]
    worker += ["--max-async-tasks", "256", "--max-prefetch", "256"]
    return _peer_rate("taskiq", preload, worker, env, out, n)


PEERS: dict[str, tuple[str, Callable[[str, int, str, str], float]]] = {
    "dramatiq": (f"Dramatiq (1 process, {DRAMATIQ_THREADS} threads)", dramatiq_rate),
    "faststream": ("FastStream (1 process, prefetch 256)", faststream_rate),
    "taskiq": ("Taskiq (1 process, 256 tasks at once)", taskiq_rate),
}
"""Peer frameworks run on Redis and RabbitMQ: label and measurement."""


# -- clean-up: everything whose name carries this run's token ----------------------


async def _cleanup_redis(token: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"*{token}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.unlink(*keys[i : i + 500])
    finally:
        await client.aclose()


def _rabbitmqctl(what: str) -> list[str]:
    try:
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "--no-table-headers", what, "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


async def _cleanup_rabbitmq(token: str, names: set[str]) -> None:
    import aio_pika

    queues = {q for q in _rabbitmqctl("list_queues") if token in q.lower()}
    queues |= {q for q in names if q not in queues}
    exchanges = [e for e in _rabbitmqctl("list_exchanges") if token in e.lower()]
    conn = await aio_pika.connect(AMQP_URL)
    try:
        # a failed delete closes its channel: one channel each
        for name in queues:
            channel = await conn.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
        for name in exchanges:
            channel = await conn.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(name)
    finally:
        await conn.close()


async def _cleanup_nats(token: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            config = info.config
            names = [config.name or "", *(config.subjects or [])]
            if any(token in name.lower() for name in names):
                await js.delete_stream(config.name or "")
    finally:
        await nc.close()


async def _cleanup_postgres(token: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        pattern = f"%{token}%"
        for (schema,) in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", pattern
        ):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for schema, table in await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_name LIKE $1",
            pattern,
        ):
            await conn.execute(f'DROP TABLE IF EXISTS "{schema}"."{table}" CASCADE')
    finally:
        await conn.close()


# -- the run -----------------------------------------------------------------------


def _module_exists(broker: str) -> bool:
    return importlib.util.find_spec(f"conveyor.brokers.{broker}") is not None


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


def run_broker_bench(
    console: Console,
    *,
    messages: int,
    brokers: list[str] | None = None,
    output: Path | None = None,
) -> Results:
    """Run every measurement for ``brokers`` (default: all), print the table,
    optionally write JSON to ``output``; returns the figures."""
    chosen = list(brokers or BROKERS)
    unknown = sorted(set(chosen) - set(BROKERS))
    if unknown:
        raise ValueError(
            f"unknown broker(s) {', '.join(unknown)}; choose from {', '.join(BROKERS)}"
        )
    token = f"bench{uuid.uuid4().hex[:10]}"
    n_uow = max(1000, messages // 4)
    n_single = max(1000, messages // 10)
    results: Results = {"messages": messages, "uow_messages": n_uow, "token": token}
    errors: dict[str, str] = {}
    rabbit_names: set[str] = set()
    kafka: KafkaServer | None = None
    serial = iter(range(1_000_000))

    def fresh(base: str) -> str:
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}namespace={token}n{next(serial)}"

    def server_url(broker: str) -> str:
        nonlocal kafka
        if broker == "kafka":
            if kafka is None:
                kafka = start_kafka()
            return kafka.url
        return {
            "redis": REDIS_URL,
            "rabbitmq": AMQP_URL,
            "postgres": POSTGRES_URL,
            "nats": NATS_URL,
        }[broker]

    steps: list[tuple[str, Callable[[], None]]] = []
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        # asyncio.run turns Ctrl-C into a cancellation, which a driver may
        # swallow or report as its own error: remember it, stop the run
        nonlocal interrupted
        interrupted = True
        signal.default_int_handler(signum, frame)

    def measure(key: str, label: str, run: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                run()
            except Exception as exc:
                if interrupted:
                    raise KeyboardInterrupt from exc
                errors[key] = _one_line(exc)

        steps.append((label, guarded))

    with tempfile.TemporaryDirectory(prefix="conveyor-bench-brokers-") as tmp:
        for broker in chosen:

            def raw(broker: str = broker) -> None:
                name = f"{token}_raw_{broker}"
                rabbit_names.add(name)
                produce, consume = _run(RAW[broker](server_url(broker), messages, name))
                results[f"{broker}.raw_produce"] = produce
                results[f"{broker}.raw_consume"] = consume

            measure(f"{broker}.raw", f"{broker}: raw client", raw)

            if not _module_exists(broker):
                missing = "not available (conveyor.brokers module missing)"
                errors[f"{broker}.conveyor"] = errors[f"{broker}.conveyor_single"] = missing
            else:

                def single(broker: str = broker) -> None:
                    url = fresh(server_url(broker))
                    store = url if broker == "postgres" else f"sqlite:///{tmp}/{broker}-s.db"
                    results[f"{broker}.conveyor_publish_single"] = _run(
                        _publish(url, n_single, batch=1, store_url=store)
                    )

                def consume(broker: str = broker) -> None:
                    url = fresh(server_url(broker))
                    store = url if broker == "postgres" else f"sqlite:///{tmp}/{broker}-c.db"
                    out = _consume(
                        "noop", url, messages, tmp, store_url=store, timeout=STEP_TIMEOUT
                    )
                    results[f"{broker}.conveyor_publish_batched"] = out["publish_rate"]
                    results[f"{broker}.conveyor_consume"] = out["steady_rate"]
                    results[f"{broker}.conveyor_rss_mb"] = out["rss_mb"]

                measure(f"{broker}.conveyor_single", f"{broker}: Conveyor publish", single)
                measure(f"{broker}.conveyor", f"{broker}: Conveyor consume", consume)

            if broker in DRAMATIQ:
                for name, (_, measure_peer) in PEERS.items():
                    if importlib.util.find_spec(name) is None:
                        errors[f"{broker}.{name}"] = f"not available ({name} not installed)"
                        continue

                    def peer(
                        broker: str = broker,
                        name: str = name,
                        measure_peer: Callable[[str, int, str, str], float] = measure_peer,
                    ) -> None:
                        results[f"{broker}.{name}_consume"] = measure_peer(
                            server_url(broker), messages, token, tmp
                        )
                        rabbit_names.add(f"{token}_{name}")

                    measure(f"{broker}.{name}", f"{broker}: {name}", peer)

        if "postgres" in chosen:

            def raw_uow() -> None:
                results["postgres.raw_uow"] = _run(
                    raw_postgres_uow(POSTGRES_URL, n_uow, f"{token}_rawuow")
                )

            measure("postgres.raw_uow", "postgres: raw unit-of-work loop", raw_uow)
            if _module_exists("postgres") and importlib.util.find_spec("conveyor.store.postgres"):

                def uow() -> None:
                    url = fresh(POSTGRES_URL)
                    out = _consume(
                        "uow",
                        url,
                        n_uow,
                        tmp,
                        store_url=url,
                        table=f"business_{token}",
                        timeout=STEP_TIMEOUT,
                    )
                    results["postgres.conveyor_uow"] = out["rate"]

                measure("postgres.uow", "postgres: Conveyor unit of work", uow)
            else:
                errors["postgres.uow"] = "not available (conveyor postgres broker/store missing)"

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            with Progress(console=console, transient=True) as progress:
                bar = progress.add_task("benchmarking", total=len(steps))
                for label, step in steps:
                    progress.update(bar, description=label)
                    step()
                    progress.advance(bar)
        finally:
            # also after Ctrl-C: leave nothing behind on the shared servers
            with console.status("deleting what this run created"):
                _cleanup(chosen, token, rabbit_names, errors)
            if kafka is not None:
                kafka.stop()
            signal.signal(signal.SIGINT, previous)

    _ratios(results)
    results["errors"] = errors
    _print(console, results, chosen)
    if output is not None:
        output.write_text(json.dumps(results, indent=2))
    return results


def _cleanup(chosen: list[str], token: str, rabbit_names: set[str], errors: dict[str, str]) -> None:
    cleaners = {
        "redis": lambda: _cleanup_redis(token),
        "rabbitmq": lambda: _cleanup_rabbitmq(token, rabbit_names),
        "nats": lambda: _cleanup_nats(token),
        "postgres": lambda: _cleanup_postgres(token),
    }
    for broker in chosen:
        if broker in cleaners:
            try:
                _run(cleaners[broker]())
            except Exception as exc:
                errors[f"{broker}.cleanup"] = _one_line(exc)


def _ratios(r: Results) -> None:
    for broker in BROKERS:
        conveyor = r.get(f"{broker}.conveyor_consume")
        raw = r.get(f"{broker}.raw_consume")
        if conveyor and raw:
            r[f"{broker}.conveyor_vs_raw"] = conveyor / raw
        for name in PEERS:
            peer = r.get(f"{broker}.{name}_consume")
            if conveyor and peer:
                r[f"{broker}.conveyor_vs_{name}"] = conveyor / peer
        peers = [r[f"{broker}.{name}_consume"] for name in PEERS if f"{broker}.{name}_consume" in r]
        if conveyor and peers:
            r[f"{broker}.conveyor_vs_best_peer"] = conveyor / max(peers)
    if r.get("postgres.conveyor_uow") and r.get("postgres.raw_uow"):
        r["postgres.uow_vs_raw_uow"] = r["postgres.conveyor_uow"] / r["postgres.raw_uow"]


def _percent(ratio: float | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio:.1%}" if ratio < 0.1 else f"{ratio:.0%}"


def _print(console: Console, r: Results, chosen: list[str]) -> None:
    errors: dict[str, str] = r["errors"]
    table = Table(
        title=f"Server brokers, {r['messages']:,} messages "
        f"(unit of work: {r['uow_messages']:,}), {os.cpu_count()} CPUs"
    )
    table.add_column("broker")
    table.add_column("measurement")
    table.add_column("result", justify="right")
    table.add_column("target", justify="right")

    def rate(key: str, error_key: str) -> str:
        if key in r:
            return f"{r[key]:,.0f} msg/s"
        error = errors.get(error_key, "not measured")
        return "[yellow]not available[/]" if error.startswith("not available") else "[red]failed[/]"

    def target(key: str, floor: float, text: str) -> str:
        if key not in r:
            return f"{text} [yellow]n/a[/]"
        return f"{text} " + ("[green]ok[/]" if r[key] >= floor else "[red]MISS[/]")

    for broker in chosen:
        raw_err, conv_err = f"{broker}.raw", f"{broker}.conveyor"
        rows = [
            ("raw client produce (batched)", rate(f"{broker}.raw_produce", raw_err), ""),
            ("raw client consume + ack (batched)", rate(f"{broker}.raw_consume", raw_err), ""),
            (
                "Conveyor publish (one call each)",
                rate(f"{broker}.conveyor_publish_single", f"{broker}.conveyor_single"),
                "",
            ),
            (
                "Conveyor publish (500 per batch)",
                rate(f"{broker}.conveyor_publish_batched", conv_err),
                "",
            ),
            ("Conveyor consume, no-op handler", rate(f"{broker}.conveyor_consume", conv_err), ""),
        ]
        key = f"{broker}.conveyor_vs_raw"
        rows.append(
            (
                "  / raw client consume",
                _percent(r.get(key)),
                target(key, 0.5, ">= 50%"),
            )
        )
        if broker in DRAMATIQ:
            for name, (label, _) in PEERS.items():
                key = f"{broker}.conveyor_vs_{name}"
                rows += [
                    (f"{label} consume", rate(f"{broker}.{name}_consume", f"{broker}.{name}"), ""),
                    (f"  Conveyor / {label.split()[0]}", f"{r[key]:.1f}x" if key in r else "", ""),
                ]
            key = f"{broker}.conveyor_vs_best_peer"
            rows.append(
                (
                    "  Conveyor / the best peer",
                    f"{r[key]:.1f}x" if key in r else "",
                    target(key, 3.0, ">= 3x"),
                )
            )
        if broker == "postgres":
            key = "postgres.uow_vs_raw_uow"
            rows += [
                (
                    "raw asyncpg unit-of-work loop",
                    rate("postgres.raw_uow", "postgres.raw_uow"),
                    "",
                ),
                (
                    "Conveyor full unit of work",
                    rate("postgres.conveyor_uow", "postgres.uow"),
                    "",
                ),
                (
                    "  / raw unit-of-work loop",
                    _percent(r.get(key)),
                    target(key, 0.5, ">= 50%"),
                ),
            ]
        for i, (what, result, goal) in enumerate(rows):
            # The benchmark's own figures and styles: markup is safe here.
            table.add_row(
                broker if i == 0 else "", what, Text.from_markup(result), Text.from_markup(goal)
            )
        table.add_section()
    console.print(table)
    for key, text in errors.items():
        twin = key.removesuffix("_single")
        if twin == key or errors.get(twin) != text:
            console.print(Text.assemble((key, "yellow"), f": {text}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--brokers", default=",".join(BROKERS), help=f"comma-separated, from {','.join(BROKERS)}"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    try:
        run_broker_bench(
            Console(),
            messages=args.messages,
            brokers=[b.strip() for b in args.brokers.split(",") if b.strip()],
            output=args.output,
        )
    except KeyboardInterrupt:
        sys.exit(130)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
