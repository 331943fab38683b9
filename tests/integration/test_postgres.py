"""The PostgreSQL broker and store together: one transaction per unit of work,
``?`` placeholders, NOTIFY wake-ups and URL options."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from conveyor import App, ConfigError, Context, RetryPolicy, Settings
from conveyor._postgres import translate
from conveyor.brokers import broker_from_url
from conveyor.messages import Message
from conveyor.store import store_from_url
from conveyor.testing import eventually
from tests.postgres import drop_namespace_async
from tests.servers import POSTGRES_URL, PrivatePostgres, namespaced


@pytest.fixture
async def url() -> AsyncIterator[str]:
    """A fresh namespace, dropped after the test."""
    fresh = namespaced(POSTGRES_URL, prefix="it")
    yield fresh
    await drop_namespace_async(fresh)


async def _count(app: App, sql: str, params: tuple[object, ...] = ()) -> int:
    async with app.transaction() as s:
        row = await s.fetchone(sql, params)
    assert row is not None
    return int(row[0])


async def test_bound_unit_of_work_is_one_transaction(url: str) -> None:
    """A commit that fails leaves no inbox, business, outbox or queue row; the
    message comes back, and once the commit can succeed everything lands together."""
    app = App("uow", settings=Settings(broker_url=url, store_url=url, idle_poll=0.01))
    runs: list[int] = []

    @app.handler("pg.in", group="g", retry=RetryPolicy(max_attempts=50, base_delay=0))
    async def handle(ctx: Context, body: bytes) -> None:
        runs.append(ctx.message.attempt)
        await ctx.execute("INSERT INTO biz (id, slot) VALUES (?, ?)", (ctx.message.id, 1))
        await ctx.publish("pg.out", {"from": ctx.message.id})

    async with app:
        assert app.broker.bind(app.store) is not None, "same URL must bind"
        elsewhere = store_from_url(f"{url}x")  # another namespace of the same database
        await elsewhere.connect()
        try:
            assert app.broker.bind(elsewhere) is None, "bound to another namespace's store"
        finally:
            await elsewhere.close()
            await drop_namespace_async(f"{url}x")
        async with app.transaction() as s:
            # Checked at COMMIT only: the handler succeeds, the commit fails.
            await s.execute(
                "CREATE TABLE biz (id TEXT PRIMARY KEY, "
                "slot INTEGER UNIQUE DEFERRABLE INITIALLY DEFERRED)"
            )
            await s.execute("INSERT INTO biz (id, slot) VALUES ('blocker', 1)")
        await app.broker.declare("pg.out", "downstream")
        sent = await app.publish("pg.in", {"n": 1})
        worker = app.worker(grace_period=2.0)
        running = asyncio.create_task(worker.run())
        try:
            await eventually(lambda: len(runs) >= 2, timeout=20, what="the message came back")
            assert runs[:2] == [1, 2], f"attempts {runs}"
            assert await _count(app, "SELECT COUNT(*) FROM conveyor_inbox") == 0, "inbox kept"
            assert await _count(app, "SELECT COUNT(*) FROM biz WHERE id = ?", (sent.id,)) == 0
            assert await _count(app, "SELECT COUNT(*) FROM conveyor_outbox") == 0
            assert (
                await _count(app, "SELECT COUNT(*) FROM conveyor_queue WHERE topic = 'pg.out'") == 0
            ), "a message published by a rolled-back unit of work was queued"
            assert (
                await _count(
                    app, "SELECT COUNT(*) FROM conveyor_queue WHERE msg_id = ?", (sent.id,)
                )
                == 1
            ), "the message left its queue"

            async with app.transaction() as s:
                await s.execute("DELETE FROM biz WHERE id = 'blocker'")

            async def landed() -> bool:
                return (
                    await _count(
                        app, "SELECT COUNT(*) FROM conveyor_queue WHERE msg_id = ?", (sent.id,)
                    )
                    == 0
                )

            await eventually(landed, timeout=20, what="the unit of work committed")
        finally:
            worker.stop()
            await running
        assert (
            await _count(app, "SELECT COUNT(*) FROM conveyor_inbox WHERE msg_id = ?", (sent.id,))
            == 1
        )
        assert await _count(app, "SELECT COUNT(*) FROM biz WHERE id = ?", (sent.id,)) == 1
        assert (
            await _count(
                app,
                "SELECT COUNT(*) FROM conveyor_queue WHERE topic = 'pg.out' AND grp = ?",
                ("downstream",),
            )
            == 1
        ), "the published message did not commit with the business row"
        assert await _count(app, "SELECT COUNT(*) FROM conveyor_outbox") == 0, "no relay needed"


async def test_concurrent_duplicate_fails_the_batch_and_is_applied_once(url: str) -> None:
    """A copy of a message recorded in the inbox by another transaction while the
    batch runs makes the batch's inbox insert fail: the whole batch rolls back and
    comes back, the copy is skipped, the others are applied once."""
    app = App("dup", settings=Settings(broker_url=url, store_url=url, idle_poll=0.01))
    calls: list[tuple[int, int]] = []

    @app.handler("pg.in", group="g", retry=RetryPolicy(base_delay=0))
    async def handle(ctx: Context, body: dict[str, int]) -> None:
        calls.append((body["n"], ctx.attempt))
        await ctx.execute("INSERT INTO biz (id) VALUES (?)", (ctx.message.id,))
        if body["n"] == 0 and ctx.attempt == 1:
            # Another worker applies a copy of this message and commits first.
            async with app.store.transaction() as other:
                assert await app.store.inbox_add(other, "g", ctx.message.id)

    async with app:
        async with app.transaction() as s:
            await s.execute("CREATE TABLE biz (id TEXT NOT NULL)")
            sent = [await s.publish("pg.in", {"n": n}) for n in range(3)]
        worker = app.worker(grace_period=2.0)
        running = asyncio.create_task(worker.run())
        try:

            async def drained() -> bool:
                return await _count(app, "SELECT COUNT(*) FROM conveyor_queue") == 0

            await eventually(drained, timeout=20, what="the queue drained")
        finally:
            worker.stop()
            await running
        assert calls == [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2)], f"calls {calls}"
        for message, applied in zip(sent, (0, 1, 1), strict=True):
            assert (
                await _count(app, "SELECT COUNT(*) FROM biz WHERE id = ?", (message.id,)) == applied
            )
        assert await _count(app, "SELECT COUNT(*) FROM conveyor_inbox") == 3


def test_placeholders_outside_literals_only() -> None:
    """``?`` becomes ``$n`` in SQL, never inside literals, identifiers or comments."""
    sql = (
        "SELECT ?, 'a?b', 'it''s ?', E'\\'?', \"c?\", $$?$$, $t$ ? $t$ -- ?\n"
        "/* ? */ FROM x WHERE y = ?"
    )
    assert translate(sql) == (
        "SELECT $1, 'a?b', 'it''s ?', E'\\'?', \"c?\", $$?$$, $t$ ? $t$ -- ?\n"
        "/* ? */ FROM x WHERE y = $2"
    )
    assert translate("INSERT INTO t VALUES (?, ?, ?)") == "INSERT INTO t VALUES ($1, $2, $3)"


async def test_placeholders_in_a_real_transaction(url: str) -> None:
    """A statement mixing ``?`` parameters and literal question marks runs as written."""
    store = store_from_url(url)
    await store.connect()
    try:
        async with store.transaction() as tx:
            row = await tx.fetchone(
                "SELECT '?' AS a, ?::int AS b, 'why?' || ? AS c, $$?$$ AS d -- trailing ?\n",
                (5, "!"),
            )
            assert row == ("?", 5, "why?!", "?")
            await tx.execute("CREATE TABLE q (k TEXT PRIMARY KEY, v INTEGER)")
            assert await tx.executemany("INSERT INTO q VALUES (?, ?)", [("a?", 1), ("b", 2)]) == 2
            assert await tx.fetchall("SELECT k FROM q WHERE k LIKE '%?' ORDER BY k") == [("a?",)]
            assert await tx.execute("UPDATE q SET v = v + ? WHERE k <> '?'", (10,)) == 2
    finally:
        await store.close()


async def test_notify_wakes_an_idle_worker_within_milliseconds(url: str) -> None:
    """A worker idle on a 30 s poll handles a new message at once: NOTIFY, not polling."""
    app = App("wake", settings=Settings(broker_url=url, store_url=url, idle_poll=30.0))
    handled: list[float] = []

    @app.handler("pg.wake", group="g")
    async def handle(ctx: Context, body: bytes) -> None:
        handled.append(time.monotonic())

    producer = broker_from_url(url)
    async with app:
        await producer.connect()
        worker = app.worker(grace_period=2.0)
        running = asyncio.create_task(worker.run())
        try:
            # Let the worker find its queue empty and settle into wait().
            await asyncio.sleep(0.3)
            delays = []
            for n in range(3):
                started = time.monotonic()
                await producer.publish([Message.create("pg.wake", {"n": n})])
                await eventually(lambda n=n: len(handled) > n, timeout=10, what="handled")
                delays.append(handled[n] - started)
        finally:
            worker.stop()
            await running
            await producer.close()
    assert max(delays) < 0.5, f"wake-up took {delays}"


async def test_wait_hears_only_committed_publishes(url: str) -> None:
    """A publish in an open transaction does not wake ``wait``; its commit does."""
    app = App("commit", settings=Settings(broker_url=url, store_url=url))
    waiter = broker_from_url(url)
    async with app:
        await waiter.connect()
        try:
            await waiter.declare("pg.c", "g")
            await waiter.wait("pg.c", "g", 0.01)  # start listening
            woke = asyncio.Event()

            async def wait() -> None:
                await waiter.wait("pg.c", "g", 30.0)
                woke.set()

            task = asyncio.create_task(wait())
            async with app.transaction() as s:
                await s.publish("pg.c", {"n": 1})
                await asyncio.sleep(0.3)
                assert not woke.is_set(), "woken before the publishing transaction committed"
            started = time.monotonic()
            await asyncio.wait_for(task, 5.0)
            assert time.monotonic() - started < 1.0
        finally:
            await waiter.close()


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("bogus=1", "unknown option 'bogus' in PostgreSQL URL"),
        ("pool_max=1&pool_max=2", "given twice"),
        ("pool_max=zero", "pool_max"),
        ("namespace=has-dash", "namespace"),
        ("pool_min=5&pool_max=2", "pool_min"),
    ],
)
def test_bad_postgres_url_is_one_line_config_error(query: str, needle: str) -> None:
    """Unknown or malformed URL options are a one-line ConfigError naming them, before any I/O."""
    for build in (broker_from_url, store_from_url):
        with pytest.raises(ConfigError) as info:
            build(f"{POSTGRES_URL}?{query}")
        assert needle in str(info.value)
        assert "\n" not in str(info.value)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


async def test_reconnects_after_a_server_restart(private_postgres: PrivatePostgres) -> None:
    """Publishes and transactions during an outage wait (capped backoff) and go
    through once the server is back; nothing is lost or duplicated, and wait()
    hears NOTIFY again."""
    url = f"{private_postgres.url}?namespace=restart&reconnect_for=30"
    broker, store = broker_from_url(url), store_from_url(url)
    await broker.connect()
    await store.connect()
    try:
        await broker.declare("pg.r", "g")
        before = [Message.create("pg.r", {"n": n}) for n in range(5)]
        await broker.publish(before)
        private_postgres.stop()
        during = [Message.create("pg.r", {"n": n}) for n in range(5, 10)]
        publishing = asyncio.create_task(broker.publish(during))

        async def in_a_transaction() -> None:
            async with store.transaction() as tx:
                await store.outbox_add(tx, [Message.create("pg.other", {"n": 0})])

        storing = asyncio.create_task(in_a_transaction())
        await asyncio.sleep(0.5)
        assert not publishing.done(), "publish returned while the server was down"
        await asyncio.to_thread(private_postgres.start)
        await asyncio.wait_for(asyncio.gather(publishing, storing), 30)

        got = await broker.fetch("pg.r", "g", max_messages=100, lease=60)
        assert sorted(d.message.id for d in got) == sorted(m.id for m in [*before, *during])
        assert await broker.ack(got) == 10
        assert [m.topic for _, m in await store.outbox_claim(limit=10, lease=60)] == ["pg.other"]

        waiting = asyncio.create_task(broker.wait("pg.r", "g", 30.0))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await broker.publish([Message.create("pg.r", {"n": 10})])
        await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - started < 1.0, "wait() did not hear NOTIFY after the restart"
    finally:
        await broker.close()
        await store.close()


async def test_a_connection_killed_mid_transaction_is_a_store_error(url: str) -> None:
    """When the server ends the connection of an open transaction, the
    statement that finds out raises StoreError (not a driver error), and the
    next transaction works on a fresh connection."""
    import asyncpg

    from conveyor.errors import StoreError

    app = App("killed", settings=Settings(broker_url=url, store_url=url))

    async def killed_while_open() -> None:
        async with app.transaction() as s:
            row = await s.fetchone("SELECT pg_backend_pid()")
            assert row is not None
            killer = await asyncpg.connect(url.partition("?")[0])
            try:
                await killer.execute("SELECT pg_terminate_backend($1)", row[0])
            finally:
                await killer.close()
            await s.execute("SELECT 1")

    async with app:
        with pytest.raises(StoreError):
            await killed_while_open()
        assert await _count(app, "SELECT 1") == 1


async def test_a_statement_past_command_timeout_is_cancelled_and_a_store_error(url: str) -> None:
    """The total timeout on one statement: past it the server cancels the
    statement and the call fails in one line naming the limit; the
    connection is usable again (the next transaction works)."""
    from conveyor.errors import StoreError

    slow = f"{url}&command_timeout=0.5"
    app = App("slow", settings=Settings(broker_url=slow, store_url=slow))
    async with app:
        with pytest.raises(StoreError, match=r"no answer within command_timeout=0\.5s"):
            async with app.transaction() as s:
                await s.execute("SELECT pg_sleep(30)")
        assert await _count(app, "SELECT 1") == 1


async def test_apps_starting_together_on_a_fresh_namespace_all_start() -> None:
    """Eight apps with sagas, job records and tables of their own connect at
    once to a fresh namespace, five times: every one starts (concurrent
    CREATE TABLE IF NOT EXISTS would collide in PostgreSQL's catalog)."""
    from conveyor.http import Jobs
    from conveyor.sagas import Sagas

    for _ in range(5):
        url = namespaced(POSTGRES_URL, prefix="ddl")
        apps = []
        for i in range(8):
            app = App(f"ddl{i}", settings=Settings(broker_url=url, store_url=url))
            Sagas(app)
            Jobs(app)

            @app.on_connect
            async def tables(app: App) -> None:
                async with app.transaction() as s:
                    await s.execute("CREATE TABLE IF NOT EXISTS mine (k TEXT PRIMARY KEY)")

            apps.append(app)
        try:
            await asyncio.gather(*(a.connect() for a in apps))
        finally:
            for a in apps:
                await a.close()
            await drop_namespace_async(url)


async def test_uvloops_closed_transport_error_is_a_lost_connection(url: str) -> None:
    """On uvloop a statement on a connection already gone raises a
    RuntimeError ("... the handler is closed"), where asyncio's loop raises
    a ConnectionError: it is a StoreError caused by a lost connection (so
    operations that are safe to repeat retry it), not a crash."""
    from conveyor.errors import StoreError

    app = App("uvloop", settings=Settings(broker_url=url, store_url=url))

    async def gone(*args: object) -> None:
        raise RuntimeError(
            "unable to perform operation on <TCPTransport closed=True reading=False "
            "0x55bd8c02fc10>; the handler is closed"
        )

    async with app, app.store.transaction() as tx:
        with pytest.raises(StoreError, match="the connection was lost") as info:
            await tx._call(gone)  # type: ignore[attr-defined]
        assert isinstance(info.value.__cause__, ConnectionResetError)
