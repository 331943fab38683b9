"""Webhook deliveries from a real worker to a real HTTP receiver on
127.0.0.1: signed and verifiable, retried on 5xx, endpoint disabled on 410,
redirects not followed, failures dead-lettered and replayable, the
connection pinned to the checked address, secrets rotated; on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import App, RetryPolicy, Settings
from conveyor.client import WebhookVerificationError, verify
from conveyor.errors import UnknownEndpoint, UnsafeTarget, WebhookError
from conveyor.http import DeliveryAttempt, Endpoint, Webhooks
from conveyor.http._webhooks import GROUP
from conveyor.runtime._admin import replay_dead_letters
from conveyor.store._protocol import DeadLetterFilter
from conveyor.testing import FakeClock, eventually, running
from tests.helpers import PATHS, settings_for
from tests.postgres import drop_namespace_async
from tests.servers import POSTGRES_URL, namespaced
from tests.webhook_receiver import Receiver

QUICK = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)
OWNER = "key-1"


@contextlib.asynccontextmanager
async def webhook_app(settings: Settings, **options: Any) -> AsyncIterator[tuple[App, Webhooks]]:
    """An App with ``Webhooks`` (127.0.0.1 allowed) and its tables created."""
    app = App("hooks", settings=settings)
    options.setdefault("allow", ["127.0.0.1/32:*"])
    options.setdefault("retry", QUICK)
    hooks = Webhooks(app, **options)
    try:
        async with app.transaction() as s:
            await hooks.create_tables(s)
        yield app, hooks
    finally:
        await hooks.aclose()
        await app.close()


async def register(app: App, hooks: Webhooks, url: str) -> Endpoint:
    checked = await hooks.check(url)
    async with app.transaction() as s:
        return await hooks.register(s, owner=OWNER, url=checked)


async def enqueue(app: App, hooks: Webhooks, url: str, *, job: str = "j1") -> str:
    async with app.transaction() as s:
        return await hooks.enqueue(
            s,
            owner=OWNER,
            url=url,
            event_type="job.succeeded",
            data={"id": job, "status": "SUCCEEDED", "result": 42},
        )


async def attempts(app: App, hooks: Webhooks, webhook_id: str) -> list[DeliveryAttempt]:
    """The attempts of one webhook, oldest first."""
    async with app.transaction() as s:
        found = await hooks.deliveries(s, owner=OWNER, webhook_id=webhook_id)
    return sorted(found, key=lambda a: (a.at, a.attempt))


async def settled(app: App, hooks: Webhooks, webhook_id: str, outcome: str) -> None:
    async def done() -> bool:
        return any(a.outcome == outcome for a in await attempts(app, hooks, webhook_id))

    await eventually(done, what=f"an attempt of {webhook_id} with outcome {outcome}")


@pytest.mark.parametrize("path", PATHS)
async def test_delivery_is_signed_and_verifies(tmp_path: Path, path: str) -> None:
    """A queued event reaches the receiver once, as the Standard Webhooks
    payload, with headers that verify against the endpoint's secret."""
    async with Receiver() as receiver, webhook_app(settings_for(path, tmp_path)) as (app, hooks):
        endpoint = await register(app, hooks, receiver.url())
        async with running(app):
            webhook_id = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, webhook_id, "delivered")
        [request] = receiver.received
        assert request.method == "POST"
        assert request.path == "/hook"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["webhook-id"] == webhook_id
        assert int(request.headers["webhook-timestamp"]) == pytest.approx(time.time(), abs=30)
        verify(request.headers, request.body, endpoint.secret)
        with pytest.raises(WebhookVerificationError):
            verify(request.headers, request.body + b" ", endpoint.secret)
        event = json.loads(request.body)
        assert event["type"] == "job.succeeded"
        assert event["data"] == {"id": "j1", "status": "SUCCEEDED", "result": 42}
        assert event["timestamp"].endswith("Z")
        [attempt] = await attempts(app, hooks, webhook_id)
        assert (attempt.outcome, attempt.status_code, attempt.attempt) == ("delivered", 200, 1)


async def test_server_error_is_retried_until_delivered(tmp_path: Path) -> None:
    """500 then 200: the same webhook (id and body) is sent twice, each
    signed; both attempts are recorded."""
    async with (
        Receiver((500, {})) as receiver,
        webhook_app(settings_for("bound", tmp_path)) as (app, hooks),
    ):
        endpoint = await register(app, hooks, receiver.url())
        async with running(app):
            webhook_id = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, webhook_id, "delivered")
        first, second = receiver.received
        assert first.body == second.body
        assert first.headers["webhook-id"] == second.headers["webhook-id"] == webhook_id
        for request in (first, second):
            verify(request.headers, request.body, endpoint.secret)
        retried, delivered = await attempts(app, hooks, webhook_id)
        assert (retried.outcome, retried.status_code, retried.attempt) == ("retrying", 500, 1)
        assert retried.next_at is not None
        assert retried.next_at >= retried.at
        assert (delivered.outcome, delivered.attempt) == ("delivered", 2)


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    """A 503 with Retry-After: 1 delays the next attempt by at least a second."""
    async with (
        Receiver((503, {"retry-after": "1"})) as receiver,
        webhook_app(settings_for("bound", tmp_path)) as (app, hooks),
    ):
        await register(app, hooks, receiver.url())
        async with running(app):
            webhook_id = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, webhook_id, "delivered")
        retried, _ = await attempts(app, hooks, webhook_id)
        assert retried.status_code == 503
        assert retried.next_at is not None
        assert retried.next_at - retried.at >= 1.0
        first, second = receiver.received
        assert second.at - first.at >= 0.9


async def test_a_retry_after_that_is_no_number_is_ignored(tmp_path: Path) -> None:
    """A 503 with Retry-After: \u00b2 (a digit, not an ASCII one) is an ordinary
    retry on the policy's backoff: recorded, then delivered, no dead letter."""
    async with (
        Receiver((503, {"retry-after": "\u00b2"})) as receiver,
        webhook_app(settings_for("bound", tmp_path)) as (app, hooks),
    ):
        await register(app, hooks, receiver.url())
        async with running(app):
            webhook_id = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, webhook_id, "delivered")
        retried, delivered = await attempts(app, hooks, webhook_id)
        assert (retried.outcome, retried.status_code, retried.attempt) == ("retrying", 503, 1)
        assert (delivered.outcome, delivered.attempt) == ("delivered", 2)
        assert len(receiver.received) == 2


async def test_exhausted_retries_are_dead_lettered(tmp_path: Path) -> None:
    """A receiver that keeps failing gets max_attempts tries, then the
    delivery is recorded as failed and dead-lettered with the reason."""
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)
    async with (
        Receiver() as receiver,
        webhook_app(settings_for("bound", tmp_path), retry=policy) as (app, hooks),
    ):
        receiver.default = (502, {})
        await register(app, hooks, receiver.url())
        async with running(app):
            webhook_id = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, webhook_id, "failed")
        assert len(receiver.received) == 3
        outcomes = [(a.attempt, a.outcome) for a in await attempts(app, hooks, webhook_id)]
        assert outcomes == [(1, "retrying"), (2, "retrying"), (3, "failed")]
        [dead] = await app.store.dead_letters(DeadLetterFilter(group=GROUP))
        assert "gave up after 3 attempt(s)" in dead.reason
        assert webhook_id in dead.reason


async def test_gone_disables_the_endpoint(tmp_path: Path) -> None:
    """410 Gone disables the endpoint: the next queued event to it is dropped
    unsent, and no new event can be queued for it."""
    async with (
        Receiver((410, {})) as receiver,
        webhook_app(settings_for("bound", tmp_path)) as (app, hooks),
    ):
        await register(app, hooks, receiver.url())
        first = await enqueue(app, hooks, receiver.url(), job="j1")
        second = await enqueue(app, hooks, receiver.url(), job="j2")
        async with running(app):
            await settled(app, hooks, second, "dropped")
        assert len(receiver.received) == 1
        assert [a.outcome for a in await attempts(app, hooks, first)] == ["gone"]
        async with app.transaction() as s:
            [endpoint] = await hooks.endpoints(s, owner=OWNER)
        assert not endpoint.enabled
        assert "410" in endpoint.disabled_reason
        with pytest.raises(UnknownEndpoint, match="disabled"):
            await enqueue(app, hooks, receiver.url())
        assert (await register(app, hooks, receiver.url())).enabled, "re-registering enables"


async def test_redirect_is_not_followed(tmp_path: Path) -> None:
    """A 302 is a failure: the Location is never requested and the delivery
    is dead-lettered with a reason that says so."""
    async with Receiver() as receiver, webhook_app(settings_for("bound", tmp_path)) as (app, hooks):
        receiver.answers = [(302, {"location": receiver.url("/elsewhere")})]
        await register(app, hooks, receiver.url())
        async with running(app):
            webhook_id = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, webhook_id, "failed")
        assert [r.path for r in receiver.received] == ["/hook"]
        [attempt] = await attempts(app, hooks, webhook_id)
        assert attempt.status_code == 302
        assert "not followed" in attempt.error
        [dead] = await app.store.dead_letters(DeadLetterFilter(group=GROUP))
        assert "not followed" in dead.reason


async def test_client_error_is_permanent_and_replay_delivers_again(tmp_path: Path) -> None:
    """A 400 is not retried; the dead letter, replayed, starts a new schedule
    and delivers the same webhook (same id, same body)."""
    async with (
        Receiver((400, {})) as receiver,
        webhook_app(settings_for("bound", tmp_path)) as (app, hooks),
    ):
        await register(app, hooks, receiver.url())
        async with running(app):
            webhook_id = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, webhook_id, "failed")
            assert len(receiver.received) == 1
            assert await replay_dead_letters(app, DeadLetterFilter(group=GROUP)) == 1
            await settled(app, hooks, webhook_id, "delivered")
        first, second = receiver.received
        assert first.body == second.body
        assert second.headers["webhook-id"] == webhook_id
        outcomes = [
            (a.attempt, a.outcome, a.status_code) for a in await attempts(app, hooks, webhook_id)
        ]
        assert outcomes == [(1, "failed", 400), (1, "delivered", 200)]


async def test_connection_is_pinned_to_the_checked_address(tmp_path: Path) -> None:
    """The host name is resolved once, by the guard; the connection goes to
    that address (the receiver on 127.0.0.1) with the name in Host."""
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if host == "hooks.example.test" else []

    async with (
        Receiver() as receiver,
        webhook_app(settings_for("bound", tmp_path), resolver=resolver) as (app, hooks),
    ):
        url = receiver.url(host="hooks.example.test")
        endpoint = await register(app, hooks, url)
        async with running(app):
            webhook_id = await enqueue(app, hooks, url)
            await settled(app, hooks, webhook_id, "delivered")
        [request] = receiver.received
        assert request.headers["host"] == f"hooks.example.test:{receiver.port}"
        verify(request.headers, request.body, endpoint.secret)
        assert lookups == ["hooks.example.test", "hooks.example.test"], "registration + delivery"


async def test_registration_applies_the_ssrf_guard(tmp_path: Path) -> None:
    """Without an allow-list, loopback, private and metadata targets are
    refused at registration; a name that does not resolve is a WebhookError."""

    async def resolver(host: str, port: int) -> list[str]:
        table = {"internal.example": ["10.0.0.5"], "public.example": ["93.184.216.34"]}
        if host not in table:
            raise OSError("no such host")
        return table[host]

    async with webhook_app(settings_for("bound", tmp_path), allow=(), resolver=resolver) as (
        app,
        hooks,
    ):
        for url in (
            "http://127.0.0.1:8080/hook",
            "http://169.254.169.254/latest",
            "https://internal.example/hook",
            "http://[::1]/hook",
        ):
            with pytest.raises(UnsafeTarget):
                await register(app, hooks, url)
        with pytest.raises(WebhookError, match="cannot resolve"):
            await register(app, hooks, "https://nowhere.example/hook")
        endpoint = await register(app, hooks, "https://PUBLIC.example/hook")
        assert endpoint.url == "https://public.example/hook"
        assert (await register(app, hooks, "https://public.example/hook")).id == endpoint.id
        async with app.transaction() as s:
            assert await hooks.endpoint_for(s, owner=OWNER, url="https://public.example/hook")
            assert await hooks.endpoint_for(s, owner="someone-else", url=endpoint.url) is None
            assert not await hooks.remove(s, owner="someone-else", endpoint_id=endpoint.id)
            assert await hooks.remove(s, owner=OWNER, endpoint_id=endpoint.id)
            assert await hooks.endpoints(s, owner=OWNER) == []


async def test_rotation_signs_with_both_secrets_during_the_grace_period(tmp_path: Path) -> None:
    """After a rotation a delivery verifies with the old and the new secret;
    once the grace period is over only the new secret signs."""
    clock = FakeClock(start=time.time())
    async with (
        Receiver() as receiver,
        webhook_app(settings_for("bound", tmp_path), clock=clock, rotation_grace=3600) as (
            app,
            hooks,
        ),
    ):
        old = await register(app, hooks, receiver.url())
        async with app.transaction() as s:
            new = await hooks.rotate(s, owner=OWNER, endpoint_id=old.id)
            with pytest.raises(UnknownEndpoint):
                await hooks.rotate(s, owner="someone-else", endpoint_id=old.id)
        assert new.id == old.id
        assert new.secret != old.secret
        async with running(app):
            during = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, during, "delivered")
            clock.advance(3601)
            after = await enqueue(app, hooks, receiver.url())
            await settled(app, hooks, after, "delivered")
        first, second = receiver.received
        assert len(first.headers["webhook-signature"].split()) == 2
        verify(first.headers, first.body, old.secret, now=clock.time() - 3601)
        verify(first.headers, first.body, new.secret, now=clock.time() - 3601)
        assert len(second.headers["webhook-signature"].split()) == 1
        verify(second.headers, second.body, new.secret, now=clock.time())
        with pytest.raises(WebhookVerificationError):
            verify(second.headers, second.body, old.secret, now=clock.time())


async def test_postgres_store_end_to_end() -> None:
    """The same tables and SQL work on PostgreSQL: register, rotate, queue,
    deliver, record."""
    url = namespaced(POSTGRES_URL, prefix="wh")
    settings = Settings(broker_url=url, store_url=url, idle_poll=0.01)
    try:
        async with (
            Receiver((500, {})) as receiver,
            webhook_app(settings) as (app, hooks),
        ):
            endpoint = await register(app, hooks, receiver.url())
            async with app.transaction() as s:
                await hooks.create_tables(s)  # idempotent
                rotated = await hooks.rotate(s, owner=OWNER, endpoint_id=endpoint.id)
            async with running(app):
                webhook_id = await enqueue(app, hooks, receiver.url())
                await settled(app, hooks, webhook_id, "delivered")
            for request in receiver.received:
                verify(request.headers, request.body, endpoint.secret)
                verify(request.headers, request.body, rotated.secret)
            outcomes = [(a.outcome, a.status_code) for a in await attempts(app, hooks, webhook_id)]
            assert outcomes == [("retrying", 500), ("delivered", 200)]
    finally:
        await drop_namespace_async(url)


class Trickler:
    """A receiver that starts its answer at once, then sends the rest of its
    headers one byte every 0.2 s for 30 s (a slow-loris receiver)."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.finished = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Trickler:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            self.arrived.set()
            writer.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
            for _ in range(150):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)
            writer.write(b"\r\ncontent-length: 0\r\n\r\n")
            self.finished.set()
        writer.close()


@pytest.mark.parametrize("path", ["bound", "split"])
async def test_a_trickling_receiver_neither_holds_the_store_nor_outlasts_the_timeout(
    path: str, tmp_path: Path
) -> None:
    """While a receiver trickles its answer a byte at a time, other writers
    commit at once (no delivery runs inside a transaction), and the attempt
    ends at the endpoint's timeout in total, recorded as a retry, long before
    the receiver would have finished."""
    async with (
        Trickler() as receiver,
        webhook_app(settings_for(path, tmp_path), timeout=1.0) as (app, hooks),
    ):
        url = f"http://127.0.0.1:{receiver.port}/hook"
        await register(app, hooks, url)
        await enqueue(app, hooks, url)
        async with running(app):
            await asyncio.wait_for(receiver.arrived.wait(), 20)
            async with asyncio.timeout(5):  # waits for the POST if one holds the lock
                async with app.transaction() as s:
                    await s.execute("CREATE TABLE meanwhile (x INTEGER)")

            async def recorded() -> bool:
                async with app.transaction() as s:
                    attempts = await hooks.deliveries(s, owner=OWNER)
                return bool(attempts)

            await eventually(recorded, timeout=20, what="the attempt recorded")
            async with app.transaction() as s:
                [first, *_] = reversed(await hooks.deliveries(s, owner=OWNER))
        assert not receiver.finished.is_set()
        assert first.outcome == "retrying"
        assert "no complete answer within 1s" in first.error


async def test_checking_a_url_is_bounded_and_registering_makes_no_network_call(
    tmp_path: Path,
) -> None:
    """check() gives up on a resolver that never answers after the timeout;
    register() inside a transaction never resolves anything."""
    calls: list[str] = []
    never = asyncio.Event()

    async def stuck(host: str, port: int) -> list[str]:
        calls.append(host)
        await never.wait()
        return []

    async with webhook_app(settings_for("bound", tmp_path), resolver=stuck, timeout=0.2) as (
        app,
        hooks,
    ):
        with pytest.raises(WebhookError, match=r"did not resolve within 0\.2s"):
            await hooks.check("https://slow.example/hook")
        calls.clear()
        async with app.transaction() as s:
            endpoint = await hooks.register(s, owner=OWNER, url="https://slow.example/hook")
        assert calls == []
        assert endpoint.url == "https://slow.example/hook"
        with pytest.raises(UnsafeTarget):
            async with app.transaction() as s:
                await hooks.register(s, owner=OWNER, url="http://10.0.0.1/hook")
