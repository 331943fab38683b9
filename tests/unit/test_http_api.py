"""The job API's HTTP edge on the embedded default (SQLite): validation,
limits, keys, rate limits, shedding, problem bodies, callbacks, schema."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from conveyor.http import ApiKeys, create_api_key
from conveyor.runtime import Session
from conveyor.testing import FakeClock, eventually, running
from tests.helpers import settings_for
from tests.http_jobs import Built, build

PROBLEM = "application/problem+json"


@contextlib.asynccontextmanager
async def built(tmp_path: Path, **options: Any) -> AsyncIterator[Built]:
    b = build(settings_for("bound", tmp_path), **options)
    try:
        # A bound on the whole test: a stuck await fails with its traceback.
        async with asyncio.timeout(120), b.api:
            yield b
    finally:
        await b.app.close()
        await b.jobs.store.close()


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["type"] == "about:blank"
    return body


async def test_bad_body_is_422_listing_the_fields(tmp_path: Path) -> None:
    """A body that fails the kind's model is a 422 problem naming each field."""
    async with built(tmp_path) as b, b.client() as client:
        bad = await client.post("/jobs/square", json={"n": -1, "label": "x" * 60})
        body = assert_problem(bad, 422)
        assert {tuple(e["loc"]) for e in body["errors"]} == {("body", "n"), ("body", "label")}
        assert all(e["msg"] for e in body["errors"])
        for n in (True, "3", 3.0):  # a strict int: JSON true is no 1
            assert_problem(await client.post("/jobs/square", json={"n": n}), 422)
        not_json = await client.post(
            "/jobs/square", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert_problem(not_json, 422)


async def test_unknown_kind_id_and_method_are_problems(tmp_path: Path) -> None:
    """Unknown kind or id: 404 problem; a wrong method: 405 problem whose
    Allow lists every method of the path."""
    async with built(tmp_path) as b, b.client() as client:
        assert_problem(await client.post("/jobs/nope", json={"n": 1}), 404)
        assert_problem(await client.get("/jobs/square/01-unknown"), 404)
        assert_problem(await client.delete("/jobs/square/01-unknown"), 404)
        wrong = await client.put("/jobs/square", json={"n": 1})
        assert_problem(wrong, 405)
        assert wrong.headers["allow"] == "POST"
        # GET and DELETE of one path are two routes: Allow lists both.
        replaced = await client.put("/jobs/square/01-unknown", json={"n": 1})
        assert_problem(replaced, 405)
        assert replaced.headers["allow"] == "DELETE, GET"


async def test_a_job_of_one_kind_is_not_found_under_another(tmp_path: Path) -> None:
    """GET /jobs/{kind}/{id} is 404 when the id belongs to another kind."""
    async with built(tmp_path) as b, b.client() as client:
        job = (await client.post("/jobs/square", json={"n": 1})).json()
        assert_problem(await client.get(f"/jobs/slow/{job['id']}"), 404)


async def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    """Over ``max_body``: 413 from Content-Length at once, and from the real
    streamed body when no length is announced."""
    async with built(tmp_path, max_body=64) as b, b.client() as client:
        big = {"n": 1, "label": "x" * 40, "pad": "y" * 100}
        assert_problem(await client.post("/jobs/square", json=big), 413)

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"n": 1, "label": "'
            for _ in range(10):
                yield b"x" * 10
            yield b'"}'

        streamed = await client.post(
            "/jobs/square", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in streamed.request.headers
        assert_problem(streamed, 413)
        assert (await client.post("/jobs/square", json={"n": 1})).status_code == 202


async def test_hostile_bodies_are_4xx_problems(tmp_path: Path) -> None:
    """Deep nesting and lone surrogates, also in fields the model ignores,
    are 422 problems naming the reason (400 when too deep to parse at all);
    a body within max_body whose job payload is over max_payload is 413."""
    async with built(tmp_path) as b, b.client() as client:
        json_type = {"content-type": "application/json"}
        deep = b'{"n": 1, "x": ' + b"[" * 300 + b"]" * 300 + b"}"
        body = assert_problem(
            await client.post("/jobs/square", content=deep, headers=json_type), 422
        )
        assert "deeper than 64 levels" in body["detail"]
        assert body["errors"] == [{"loc": ["body"], "msg": body["errors"][0]["msg"]}]
        deepest = b'{"n": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        assert_problem(await client.post("/jobs/square", content=deepest, headers=json_type), 400)
        lone = b'{"n": 1, "x": "\\ud800"}'
        body = assert_problem(
            await client.post("/jobs/square", content=lone, headers=json_type), 422
        )
        assert "surrogate" in body["detail"]
        pair = b'{"n": 1, "x": "\\ud83d\\ude00"}'  # a valid pair: one emoji
        assert (
            await client.post("/jobs/square", content=pair, headers=json_type)
        ).status_code == 202
        nested = {"n": 1, "x": [[[[{"y": [1]}]]]]}
        assert (await client.post("/jobs/square", json=nested)).status_code == 202


async def test_an_unexpected_error_is_a_500_problem(tmp_path: Path) -> None:
    """A bug (an exception no handler expects) answers a 500 problem body
    that tells nothing of it, not a text/plain page."""
    async with built(tmp_path) as b:

        async def broken(job_id: str) -> None:
            raise RuntimeError("secret internals at postgresql://u:pw@db/x")

        b.jobs.store.get = broken  # type: ignore[assignment]
        transport = httpx.ASGITransport(app=b.api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.get("/jobs/square/01-some-id")
        body = assert_problem(answer, 500)
        assert "secret" not in answer.text
        assert "postgresql" not in body["detail"]


async def test_a_body_over_the_message_limit_is_413(tmp_path: Path) -> None:
    """A body under max_body whose job message would be over the App's
    max_payload is 413 (the client must not retry it), not 503."""
    b = build(settings_for("bound", tmp_path, max_payload=1024), max_body=64 * 1024)
    try:
        async with b.api, b.client() as client:
            big = {"n": 1, "pad": "\u00e9" * 1000}
            refused = await client.post("/jobs/square", json=big)
            body = assert_problem(refused, 413)
            assert "1024-byte limit" in body["detail"]
            assert "retry-after" not in refused.headers
            keyed = await client.post("/jobs/square", json=big, headers={"Idempotency-Key": "k"})
            assert_problem(keyed, 413)
            small = await client.post(
                "/jobs/square", json={"n": 1}, headers={"Idempotency-Key": "k"}
            )
            assert small.status_code == 202, small.text
    finally:
        await b.app.close()
        await b.jobs.store.close()


async def test_api_keys_are_required_once_one_exists(tmp_path: Path) -> None:
    """With no key stored, requests pass; once a key exists, a missing or
    unknown key is 401, and Bearer or X-API-Key both work."""
    async with built(tmp_path) as b, b.client() as client:
        assert (await client.post("/jobs/square", json={"n": 1})).status_code == 202
        secret = await create_api_key(b.app, "alice")
        assert secret.startswith("cvk_")
        assert len(secret) > 40
        missing = await client.post("/jobs/square", json={"n": 1})
        assert_problem(missing, 401)
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.post(
            "/jobs/square", json={"n": 1}, headers={"Authorization": "Bearer cvk_wrong"}
        )
        assert_problem(wrong, 401)
        bearer = await client.post(
            "/jobs/square", json={"n": 1}, headers={"Authorization": f"Bearer {secret}"}
        )
        assert bearer.status_code == 202
        header = await client.get(bearer.headers["location"], headers={"X-API-Key": secret})
        assert header.status_code == 200


async def test_requests_without_a_valid_key_are_rate_limited_per_address(
    tmp_path: Path,
) -> None:
    """Requests with no key or an unknown one share one budget per client
    address (the App's http_unauthenticated_limit setting by default): 401
    within it, then 429 + Retry-After; valid keys are not charged, another
    address has its own budget, and time restores it."""
    clock = FakeClock()
    settings = settings_for("bound", tmp_path, http_unauthenticated_limit="3/min")
    b = build(settings, clock=clock)
    try:
        async with b.api:
            secret = await create_api_key(b.app, "alice")

            def client(address: str, **headers: str) -> httpx.AsyncClient:
                transport = httpx.ASGITransport(app=b.api, client=(address, 1234))
                return httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers)

            async with (
                client("10.0.0.1") as stranger,
                client("10.0.0.1", authorization=f"Bearer {secret}") as alice,
                client("10.0.0.2") as neighbour,
            ):
                codes = []
                for i in range(5):
                    headers = {"X-API-Key": "cvk_guess"} if i % 2 else {}
                    codes.append(
                        (await stranger.get("/jobs/square/x", headers=headers)).status_code
                    )
                    assert (await alice.post("/jobs/square", json={"n": 1})).status_code == 202
                assert codes == [401, 401, 401, 429, 429]
                limited = await stranger.get("/jobs/square/x")
                assert_problem(limited, 429)
                assert limited.headers["retry-after"] == "20"
                assert (await neighbour.get("/jobs/square/x")).status_code == 401
                clock.advance(20)
                assert (await stranger.get("/jobs/square/x")).status_code == 401
    finally:
        await b.app.close()
        await b.jobs.store.close()


async def test_keys_are_stored_hashed_and_scope_jobs(tmp_path: Path) -> None:
    """Only a SHA-256 of a key is stored; a job is invisible to another key,
    and an Idempotency-Key is scoped per API key."""
    async with built(tmp_path) as b, b.client() as client:
        keys = ApiKeys(b.app)
        alice, bob = await keys.create("alice"), await keys.create("bob")
        async with b.app.store.transaction() as tx:
            rows = await tx.fetchall("SELECT name, key_hash FROM conveyor_api_keys")
        assert all(alice not in row and bob not in row for row in rows)
        assert {len(row[1]) for row in rows} == {64}
        as_alice = {"Authorization": f"Bearer {alice}", "Idempotency-Key": "same"}
        as_bob = {"Authorization": f"Bearer {bob}", "Idempotency-Key": "same"}
        a = await client.post("/jobs/square", json={"n": 1}, headers=as_alice)
        bb = await client.post("/jobs/square", json={"n": 2}, headers=as_bob)
        assert a.status_code == bb.status_code == 202
        assert a.json()["id"] != bb.json()["id"]
        assert_problem(await client.get(a.headers["location"], headers=as_bob), 404)
        assert (await client.get(a.headers["location"], headers=as_alice)).status_code == 200


async def test_rate_limit_per_key_answers_429(tmp_path: Path) -> None:
    """Past the per-key limit: 429 with Retry-After, RateLimit-Policy and
    RateLimit; another key has its own budget; time restores it."""
    clock = FakeClock()
    async with built(tmp_path, rate_limit="2/min", rate_burst=2, clock=clock) as b:
        keys = ApiKeys(b.app)
        alice, bob = await keys.create("alice"), await keys.create("bob")
        async with (
            b.client(authorization=f"Bearer {alice}") as a,
            b.client(authorization=f"Bearer {bob}") as other,
        ):
            assert (await a.post("/jobs/square", json={"n": 1})).status_code == 202
            assert (await a.post("/jobs/square", json={"n": 1})).status_code == 202
            limited = await a.post("/jobs/square", json={"n": 1})
            assert_problem(limited, 429)
            assert limited.headers["retry-after"] == "30"
            assert limited.headers["ratelimit-policy"] == '"default";q=2;w=60'
            assert limited.headers["ratelimit"] == '"default";r=0;t=30'
            assert (await other.post("/jobs/square", json={"n": 1})).status_code == 202
            clock.advance(30)
            assert (await a.post("/jobs/square", json={"n": 1})).status_code == 202


async def test_backlog_over_the_threshold_sheds_with_503(tmp_path: Path) -> None:
    """While the kind's queue holds more than ``shed_above`` messages POST is
    a 503 with Retry-After; once drained it is accepted again."""
    clock = FakeClock()
    async with built(tmp_path, shed_above=1, clock=clock) as b, b.client() as client:
        for _ in range(2):
            assert (await client.post("/jobs/square", json={"n": 1})).status_code == 202
        clock.advance(2)  # the measured depth is cached for a second
        shed = await client.post("/jobs/square", json={"n": 1})
        assert_problem(shed, 503)
        assert shed.headers["retry-after"] == "1"
        assert (await client.post("/jobs/slow", json={"n": 1})).status_code == 202
        async with running(b.app):

            async def drained() -> bool:
                stats = await b.app.broker.stats()
                return not any(s.ready for s in stats if s.topic == "conveyor.jobs.square")

            await eventually(drained, timeout=20, what="square queue drained")
            b.controls.release.set()
        clock.advance(2)
        assert (await client.post("/jobs/square", json={"n": 1})).status_code == 202


async def test_health_and_readiness(tmp_path: Path) -> None:
    """/healthz and /readyz answer 200 when broker and stores answer."""
    async with built(tmp_path) as b, b.client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}


@dataclass
class FakeEndpoint:
    id: str
    owner: str
    url: str
    secret: str
    enabled: bool = True


@dataclass
class FakeWebhooks:
    """Records ``enqueue`` calls and the transaction each came in."""

    urls: set[str] = field(default_factory=set)
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def create_tables(self, session: Session) -> None:
        return None

    async def endpoint_for(self, session: Session, *, owner: str, url: str) -> FakeEndpoint | None:
        return FakeEndpoint("e1", owner, url, "whsec_x") if url in self.urls else None

    async def enqueue(
        self,
        session: Session,
        *,
        owner: str,
        url: str,
        event_type: str,
        data: Mapping[str, object],
    ) -> str:
        row = await session.fetchone("SELECT status FROM conveyor_jobs WHERE id = ?", (data["id"],))
        self.calls.append(
            {"owner": owner, "url": url, "type": event_type, "data": data, "row": row}
        )
        return "wh1"


async def test_callback_url_must_be_registered_and_is_called_on_finish(tmp_path: Path) -> None:
    """An unregistered Callback-Url is 422; a registered one gets a
    ``job.succeeded`` enqueue in the transaction that records the final state."""
    hooks = FakeWebhooks(urls={"https://example.com/hook"})
    async with built(tmp_path, webhooks=hooks) as b, b.client() as client:
        refused = await client.post(
            "/jobs/square", json={"n": 3}, headers={"Callback-Url": "https://other.example/x"}
        )
        assert "Callback-Url" in assert_problem(refused, 422)["detail"]
        ok = await client.post(
            "/jobs/square", json={"n": 3}, headers={"Callback-Url": "https://example.com/hook"}
        )
        assert ok.status_code == 202
        async with running(b.app):
            await eventually(lambda: bool(hooks.calls), timeout=20, what="webhook enqueued")
        [call] = hooks.calls
        assert call["type"] == "job.succeeded"
        assert call["url"] == "https://example.com/hook"
        assert call["data"]["result"] == {"square": 9}
        assert call["row"] == ("SUCCEEDED",)  # same transaction as the final state


def test_openapi_schema_documents_every_kind_and_problem() -> None:
    """/openapi.json has a route per kind with its body model, and every
    error response is an application/problem+json Problem."""
    import asyncio
    import tempfile

    async def fetch() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            b = build(settings_for("bound", Path(tmp)))
            try:
                async with b.client() as client:
                    response = await client.get("/openapi.json")
                    assert response.status_code == 200
                    schema: dict[str, Any] = response.json()
                    return schema
            finally:
                await b.app.close()
                await b.jobs.store.close()

    schema = asyncio.run(fetch())
    post = schema["paths"]["/jobs/square"]["post"]
    body_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref.endswith("/Numbers")
    for path in schema["paths"].values():
        for operation in path.values():
            for code, response in operation["responses"].items():
                if int(code) >= 400:
                    assert list(response["content"]) == [PROBLEM]


def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path: Path) -> None:
    """Generated requests against /openapi.json: no 5xx, and every response
    conforms to the documented status codes, content types and schemas."""
    import asyncio

    from tests.schema_fuzz import fuzz_every_operation

    b = build(settings_for("bound", tmp_path))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(b.api.connect())
        tested = fuzz_every_operation(b.api, max_examples=15)
        assert tested >= 9
    finally:
        loop.run_until_complete(b.app.close())
        loop.run_until_complete(b.jobs.store.close())
        loop.close()
