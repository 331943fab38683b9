"""The job API end to end with real workers, on every job store: SQLite
(the embedded default), PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor import Message, Settings
from conveyor.http.redis_jobs import RedisJobStore
from conveyor.runtime import Observer, Settlement
from conveyor.testing import FakeClock, eventually, running
from tests.helpers import settings_for
from tests.http_jobs import Built, build
from tests.namespaces import drop_all
from tests.servers import POSTGRES_URL, REDIS_URL, namespaced

STORES = ("sqlite", "postgres", "redis")


@contextlib.asynccontextmanager
async def built_on(store: str, tmp_path: Path, **options: Any) -> AsyncIterator[Built]:
    """A JobAPI with its App on ``store``, connected; everything dropped after."""
    urls: list[str] = []
    job_store = None
    if store == "postgres":
        url = namespaced(POSTGRES_URL)
        urls.append(url)
        settings = Settings(broker_url=url, store_url=url, idle_poll=0.01)
    else:
        settings = settings_for("bound", tmp_path)
    if store == "redis":
        url = namespaced(REDIS_URL)
        urls.append(url)
        job_store = RedisJobStore(url, clock=options.get("clock"))
    b = build(settings, store=job_store, **options)
    try:
        # A bound on the whole test: a stuck await fails with its traceback.
        async with asyncio.timeout(120), b.api:
            yield b
    finally:
        await b.app.close()
        await b.jobs.store.close()
        await drop_all(urls)


async def wait_status(client: httpx.AsyncClient, url: str, status: str) -> dict[str, Any]:
    """Poll ``url`` until the job has ``status``; its body."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal seen
        seen = (await client.get(url)).json()
        return seen.get("status") == status

    await eventually(reached, timeout=20, what=f"job status {status}")
    return seen


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_job_succeeds_with_its_result(store: str, tmp_path: Path) -> None:
    """POST answers 202 with Location and Retry-After; a worker runs the job;
    GET shows PENDING (with Retry-After), then SUCCEEDED with the result."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        posted = await client.post("/jobs/square", json={"n": 12})
        assert posted.status_code == 202
        body = posted.json()
        url = f"/jobs/square/{body['id']}"
        assert body == {"id": body["id"], "kind": "square", "status": "PENDING", "status_url": url}
        assert posted.headers["location"] == url
        assert posted.headers["retry-after"] == "1"
        pending = await client.get(url)
        assert pending.status_code == 200
        assert pending.json()["status"] == "PENDING"
        assert pending.headers["retry-after"] == "1"
        async with running(b.app):
            done = await wait_status(client, url, "SUCCEEDED")
        assert done["result"] == {"square": 144}
        assert done["progress"] == 1.0
        assert done["error"] is None
        assert done["finished_at"] is not None
        final = await client.get(url)
        assert "retry-after" not in final.headers


async def test_a_jobs_messages_carry_its_id_as_correlation_id(store: str, tmp_path: Path) -> None:
    """The message a POST enqueues has the job id as its correlation id, so
    the console's search and the job's log lines find it by the job id."""

    class Settled(Observer):
        def __init__(self) -> None:
            self.messages: list[Message] = []

        def settled(self, events: Sequence[Settlement]) -> None:
            self.messages += [e.message for e in events]

    async with built_on(store, tmp_path) as b, b.client() as client:
        seen = Settled()
        b.app.observe(seen)
        body = (await client.post("/jobs/square", json={"n": 3})).json()
        async with running(b.app):
            await wait_status(client, body["status_url"], "SUCCEEDED")
        jobs = [m for m in seen.messages if m.type == "conveyor.job"]
        assert jobs
        assert {m.correlation_id for m in jobs} == {body["id"]}


async def test_progress_is_visible_and_delete_cancels(store: str, tmp_path: Path) -> None:
    """While the handler runs GET shows RUNNING with its progress and note;
    DELETE cancels it, the handler sees cancelled() and its result is not
    recorded; a second DELETE answers the cancelled record again."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        posted = await client.post("/jobs/slow", json={"n": 3})
        url = posted.headers["location"]
        async with running(b.app):
            await eventually(b.controls.started.is_set, timeout=20, what="job started")
            status = (await client.get(url)).json()
            assert status["status"] == "RUNNING"
            assert status["progress"] == 0.5
            assert status["note"] == "halfway"
            cancelled = await client.delete(url)
            assert cancelled.status_code == 202
            assert cancelled.json()["status"] == "CANCELLED"
            await eventually(b.controls.saw_cancel.is_set, timeout=20, what="handler saw cancel")
        final = (await client.get(url)).json()
        assert final["status"] == "CANCELLED"
        assert final["result"] is None
        again = await client.delete(url)
        assert again.status_code == 202
        assert again.json()["status"] == "CANCELLED"


async def test_fails_after_retries_and_on_permanent_error(store: str, tmp_path: Path) -> None:
    """A job whose handler keeps failing is FAILED after its retry policy's
    attempts (3); one raising PermanentError is FAILED after one attempt."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        flaky = (await client.post("/jobs/flaky", json={"n": 1})).json()
        doomed = (await client.post("/jobs/doomed", json={"n": 1})).json()
        async with running(b.app):
            failed = await wait_status(client, flaky["status_url"], "FAILED")
            permanent = await wait_status(client, doomed["status_url"], "FAILED")
        assert failed["error"] == "RuntimeError: attempt 3 failed"
        assert b.controls.attempts[flaky["id"]] == 3
        assert permanent["error"] == "PermanentError: cannot be done"
        assert b.controls.attempts[doomed["id"]] == 1


async def test_a_result_that_is_no_json_text_fails_the_job(store: str, tmp_path: Path) -> None:
    """A result holding a lone surrogate makes the job FAILED, saying why,
    and its status reads stay 200 JSON; non-ASCII results come back as they
    went in."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        lone = (await client.post("/jobs/char", json={"codepoint": 0xD800})).headers["location"]
        accent = (await client.post("/jobs/char", json={"codepoint": 0xE9})).headers["location"]
        async with running(b.app):
            failed = await wait_status(client, lone, "FAILED")
            done = await wait_status(client, accent, "SUCCEEDED")
        assert "not storable JSON" in failed["error"]
        assert "surrogate" in failed["error"]
        assert failed["result"] is None
        again = await client.get(lone)
        assert again.status_code == 200
        assert again.headers["content-type"] == "application/json"
        assert done["result"] == {"char": "\u00e9"}


async def test_delete_of_a_finished_job_is_409(store: str, tmp_path: Path) -> None:
    """DELETE on a job that already succeeded answers 409 and leaves it so."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        url = (await client.post("/jobs/square", json={"n": 2})).headers["location"]
        async with running(b.app):
            await wait_status(client, url, "SUCCEEDED")
        refused = await client.delete(url)
        assert refused.status_code == 409
        assert refused.headers["content-type"] == "application/problem+json"
        assert (await client.get(url)).json()["status"] == "SUCCEEDED"


@pytest.mark.parametrize("moment", ["before_finish", "before_commit"])
async def test_delete_answers_the_state_the_job_ends_in(
    store: str, moment: str, tmp_path: Path
) -> None:
    """DELETE while a handler is recording its result: before the handler's
    finish, the cancel wins (202 CANCELLED, and the job ends CANCELLED);
    after it, before the commit, the cancel loses (409 naming SUCCEEDED, and
    the job ends SUCCEEDED). Never CANCELLED for a job that then succeeds."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        job_store = b.jobs.store
        finish = job_store.finish
        reached, go = asyncio.Event(), asyncio.Event()

        async def gated(session: Any, job_id: str, **options: Any) -> Any:
            if moment == "before_finish":
                reached.set()
                await go.wait()
                return await finish(session, job_id, **options)
            done = await finish(session, job_id, **options)
            reached.set()
            await go.wait()
            return done

        job_store.finish = gated  # type: ignore[method-assign]
        url = (await client.post("/jobs/square", json={"n": 3})).headers["location"]
        async with running(b.app):
            await reached.wait()
            answer = await client.delete(url)
            go.set()
            await eventually(lambda: _settled(b), timeout=20, what="the job's message handled")
        final = (await client.get(url)).json()
        if moment == "before_finish":
            assert answer.status_code == 202, answer.text
            assert answer.json()["status"] == "CANCELLED"
            assert final["status"] == "CANCELLED"
            assert final["result"] is None
        else:
            assert answer.status_code == 409, answer.text
            assert "SUCCEEDED" in answer.json()["detail"]
            assert final["status"] == "SUCCEEDED"
            assert final["result"] == {"square": 9}


async def test_cancel_before_it_runs(store: str, tmp_path: Path) -> None:
    """A job cancelled while PENDING never runs its handler and stays CANCELLED."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        url = (await client.post("/jobs/slow", json={"n": 2})).headers["location"]
        assert (await client.delete(url)).json()["status"] == "CANCELLED"
        async with running(b.app):
            await eventually(lambda: _settled(b), timeout=20, what="the job's message handled")
        assert not b.controls.started.is_set()
        assert (await client.get(url)).json()["status"] == "CANCELLED"


async def _settled(b: Built) -> bool:
    stats = await b.app.broker.stats()
    return all(s.ready + s.in_flight + s.delayed == 0 for s in stats) and not await _outbox(b)


async def _outbox(b: Built) -> int:
    store = b.jobs.store
    if isinstance(store, RedisJobStore):
        return int(await store.client.zcard(f"conveyor:{{{store.namespace}}}:jobs-outbox"))
    return 0


async def test_results_expire_after_their_ttl(store: str, tmp_path: Path) -> None:
    """A finished job answers until its kind's TTL (180 s) has passed since it
    finished, then 404; pruning removes the record."""
    clock = FakeClock()
    async with built_on(store, tmp_path, clock=clock) as b, b.client() as client:
        url = (await client.post("/jobs/square", json={"n": 5})).headers["location"]
        async with running(b.app):
            await wait_status(client, url, "SUCCEEDED")
        clock.advance(179)
        assert (await client.get(url)).status_code == 200
        clock.advance(2)
        gone = await client.get(url)
        assert gone.status_code == 404
        assert gone.json()["status"] == 404
        await b.jobs.store.prune()
        assert await b.jobs.store.get(url.rsplit("/", 1)[1]) is None


async def test_idempotency_key_replays_and_conflicts(store: str, tmp_path: Path) -> None:
    """Same key and body: the original response, byte for byte, and one job;
    same key, other body: 422; original still being created (and not
    waited for): 409."""
    async with built_on(store, tmp_path, idempotency_wait=0) as b, b.client() as client:
        headers = {"Idempotency-Key": "order-1"}
        first = await client.post("/jobs/square", json={"n": 4, "label": "x"}, headers=headers)
        again = await client.post(
            "/jobs/square",
            content=b'{"label": "x",  "n": 4}',
            headers={**headers, "content-type": "application/json"},
        )
        assert first.status_code == again.status_code == 202
        assert again.content == first.content
        assert again.headers["location"] == first.headers["location"]
        other = await client.post("/jobs/square", json={"n": 5}, headers=headers)
        assert other.status_code == 422
        assert "different request body" in other.json()["detail"]
        claim = await b.jobs.store.begin_idempotent(
            "", "order-2", "fingerprint-of-another-request", lease=30, keep=3600
        )
        assert claim is None
        busy = await client.post(
            "/jobs/square", json={"n": 6}, headers={"Idempotency-Key": "order-2"}
        )
        assert busy.status_code == 422  # another body: the fingerprint differs
        from conveyor.http._jobs import fingerprint

        await b.jobs.store.release_idempotent("", "order-2")
        body = b'{"n":6}'
        await b.jobs.store.begin_idempotent(
            "", "order-2", fingerprint("square", body), lease=30, keep=3600
        )
        in_flight = await client.post(
            "/jobs/square",
            content=body,
            headers={"Idempotency-Key": "order-2", "content-type": "application/json"},
        )
        assert in_flight.status_code == 409
        assert in_flight.headers["content-type"] == "application/problem+json"


async def test_racing_posts_with_one_idempotency_key_get_one_job(
    store: str, tmp_path: Path
) -> None:
    """A POST with the Idempotency-Key and body of one still creating its job
    waits for it and answers the same 202 and id; one job exists."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        job_store = b.jobs.store
        accept, begin = job_store.accept, job_store.begin_idempotent
        creating, saw_claim, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        accepted: list[str] = []

        async def gated_accept(record: Any, **options: Any) -> None:
            accepted.append(record.id)
            creating.set()
            await go.wait()
            await accept(record, **options)

        async def watched_begin(*args: Any, **options: Any) -> Any:
            seen = await begin(*args, **options)
            if seen is not None and seen.response is None:
                saw_claim.set()
            return seen

        job_store.accept = gated_accept  # type: ignore[method-assign]
        job_store.begin_idempotent = watched_begin  # type: ignore[method-assign]
        headers = {"Idempotency-Key": "race-1"}
        first = asyncio.create_task(client.post("/jobs/square", json={"n": 8}, headers=headers))
        await creating.wait()
        second = asyncio.create_task(client.post("/jobs/square", json={"n": 8}, headers=headers))
        await saw_claim.wait()
        go.set()
        one, two = await first, await second
        assert one.status_code == 202, one.text
        assert two.status_code == 202, two.text
        assert two.content == one.content
        assert two.headers["location"] == one.headers["location"]
        assert accepted == [one.json()["id"]]
        async with running(b.app):
            await wait_status(client, one.headers["location"], "SUCCEEDED")


async def test_idempotency_lease_frees_a_crashed_request(store: str, tmp_path: Path) -> None:
    """A key whose original request died while creating (its lease ran out)
    is taken over by the next request with the same key and body."""
    clock = FakeClock()
    async with (
        built_on(store, tmp_path, clock=clock, idempotency_wait=0) as b,
        b.client() as client,
    ):
        from conveyor.http._jobs import fingerprint

        body = b'{"n":7}'
        await b.jobs.store.begin_idempotent(
            "", "k", fingerprint("square", body), lease=30, keep=3600
        )
        headers = {"Idempotency-Key": "k", "content-type": "application/json"}
        assert (await client.post("/jobs/square", content=body, headers=headers)).status_code == 409
        clock.advance(31)
        taken = await client.post("/jobs/square", content=body, headers=headers)
        assert taken.status_code == 202
        replay = await client.post("/jobs/square", content=body, headers=headers)
        assert replay.content == taken.content


async def test_ids_and_keys_no_store_can_hold_are_4xx(store: str, tmp_path: Path) -> None:
    """A NUL (or another control character) in a job id is 404, in an
    Idempotency-Key 422: problem bodies, never a store error (PostgreSQL
    text holds no NUL) and never a URL of the store."""
    async with built_on(store, tmp_path) as b, b.client() as client:
        for method in ("GET", "DELETE"):
            for job_id in ("a%00b", "%00", "a%0Ab"):
                answer = await client.request(method, f"/jobs/square/{job_id}")
                assert answer.status_code == 404, answer.text
                assert answer.headers["content-type"] == "application/problem+json"
        keyed = await client.post(
            "/jobs/square", json={"n": 1}, headers={"Idempotency-Key": "a\x00b"}
        )
        assert keyed.status_code == 422, keyed.text
        assert keyed.json()["errors"][0]["loc"] == ["header", "idempotency-key"]


async def test_a_failing_store_is_a_503_that_names_no_url(tmp_path: Path) -> None:
    """A job store that fails answers 503 + Retry-After naming the error's
    kind, not the store's URL, host or password (the log has the redacted
    details)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    b = build(settings_for("bound", tmp_path), store=RedisJobStore(url))
    try:
        async with b.client() as client:
            failed = await client.post("/jobs/square", json={"n": 1})
        assert failed.status_code == 503
        assert failed.headers["content-type"] == "application/problem+json"
        assert "retry-after" in failed.headers
        assert "StoreError" in failed.json()["detail"]
        for secret in ("s3cret", "127.0.0.1", str(port), "redis://"):
            assert secret not in failed.text
    finally:
        await b.app.close()
        await b.jobs.store.close()


async def test_readyz_is_503_when_the_job_store_is_down(tmp_path: Path) -> None:
    """A Redis job store on a closed port makes /readyz 503 (with Retry-After)
    naming the job store but not its URL, while /healthz stays 200."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    b = build(settings_for("bound", tmp_path), store=RedisJobStore(url))
    try:
        async with b.client() as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.headers["content-type"] == "application/problem+json"
            assert "retry-after" in ready.headers
            assert "the job store" in ready.json()["detail"]
            for secret in ("s3cret", "127.0.0.1", str(port), "redis://"):
                assert secret not in ready.text
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await b.app.close()
        await b.jobs.store.close()


async def test_rate_limit_is_shared_through_redis(tmp_path: Path) -> None:
    """Two API instances (replicas) sharing a Redis limit grant 3 requests in
    all per key, then 429 with Retry-After and RateLimit headers."""
    redis_url = namespaced(REDIS_URL)
    first = build(
        settings_for("bound", tmp_path / "a"), rate_limit="3/min", rate_burst=3, redis_url=redis_url
    )
    second = build(
        settings_for("bound", tmp_path / "b"), rate_limit="3/min", rate_burst=3, redis_url=redis_url
    )
    try:
        async with first.client() as one, second.client() as two:
            codes = [
                (await one.post("/jobs/square", json={"n": 1})).status_code,
                (await two.post("/jobs/square", json={"n": 1})).status_code,
                (await one.get("/jobs/square/x")).status_code,
            ]
            assert codes == [202, 202, 404]
            limited = await two.post("/jobs/square", json={"n": 1})
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert limited.headers["ratelimit-policy"] == '"default";q=3;w=60'
            assert limited.headers["ratelimit"].startswith('"default";r=0;t=')
            assert limited.json()["status"] == 429
    finally:
        for b in (first, second):
            await b.app.close()
