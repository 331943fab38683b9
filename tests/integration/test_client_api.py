"""The client against the real job API and a real worker: submit, poll to
the result or the error, one job per idempotency key, and the job's webhook
delivered to a receiver on 127.0.0.1 that verifies it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydantic
import pytest
import uvicorn

from conveyor import App, PermanentError, RetryPolicy
from conveyor.client import AsyncClient, Client, JobFailed, JobNotFound, verify
from conveyor.http import JobAPI, JobContext, Jobs, Webhooks
from conveyor.testing import eventually, running
from tests.helpers import settings_for
from tests.webhook_receiver import Receiver


class Numbers(pydantic.BaseModel):
    n: int = pydantic.Field(ge=0, le=1_000)


class Square(pydantic.BaseModel):
    square: int


@dataclass
class Service:
    app: App
    api: JobAPI
    hooks: Webhooks


@contextlib.asynccontextmanager
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    """A job API with webhooks (127.0.0.1 allowed) on SQLite, connected."""
    app = App("client-api", settings=settings_for("bound", tmp_path))
    hooks = Webhooks(
        app, allow=["127.0.0.1/32:*"], retry=RetryPolicy(max_attempts=3, base_delay=0.01)
    )
    jobs = Jobs(app, webhooks=hooks)

    @jobs.kind("square")
    async def square(job: JobContext, body: Numbers) -> Square:
        """Square a number."""
        return Square(square=body.n * body.n)

    @jobs.kind("doomed")
    async def doomed(job: JobContext, body: Numbers) -> int:
        """Fail for good."""
        raise PermanentError(f"{body.n} cannot be done")

    api = JobAPI(jobs, rate_limit=None)
    try:
        async with api:
            yield Service(app, api, hooks)
    finally:
        await hooks.aclose()
        await app.close()


def asgi(api: JobAPI) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=api)


async def test_async_client_result_error_and_webhook(tmp_path: Path) -> None:
    """submit + result returns the typed result; the job's webhook reaches
    the callback URL signed with the endpoint's secret; a failing job raises
    JobFailed with the server's error; an unknown id is JobNotFound."""
    async with Receiver() as receiver, service(tmp_path) as svc:
        async with httpx.AsyncClient(transport=asgi(svc.api), base_url="http://api") as raw:
            registered = await raw.post("/webhooks", json={"url": receiver.url()})
        assert registered.status_code == 201
        secret = registered.json()["secret"]
        async with (
            running(svc.app),
            AsyncClient("http://api", transport=asgi(svc.api)) as client,
        ):
            handle = await client.submit("square", Numbers(n=12), callback_url=receiver.url())
            assert await handle.result(timeout=30, into=Square) == Square(square=144)
            await eventually(lambda: len(receiver.received) == 1, what="the job's webhook")
            doomed = await client.submit("doomed", {"n": 3})
            with pytest.raises(JobFailed, match="3 cannot be done") as failed:
                await doomed.result(timeout=30)
            assert failed.value.job_id == doomed.id
            with pytest.raises(JobNotFound):
                await client.job("square", "no-such-job").status()
        [delivery] = receiver.received
        verify(delivery.headers, delivery.body, secret)
        event = json.loads(delivery.body)
        assert event["type"] == "job.succeeded"
        assert event["data"]["id"] == handle.id
        assert event["data"]["result"] == {"square": 144}


async def test_a_job_whose_endpoint_went_away_still_finishes(tmp_path: Path) -> None:
    """An endpoint removed between submit and finish drops the callback, not
    the job: it still ends SUCCEEDED with its result."""
    async with Receiver() as receiver, service(tmp_path) as svc:
        async with httpx.AsyncClient(transport=asgi(svc.api), base_url="http://api") as raw:
            registered = await raw.post("/webhooks", json={"url": receiver.url()})
            assert registered.status_code == 201
            async with AsyncClient("http://api", transport=asgi(svc.api)) as client:
                handle = await client.submit("square", {"n": 4}, callback_url=receiver.url())
                gone = await raw.delete(f"/webhooks/{registered.json()['id']}")
                assert gone.status_code in (200, 204)
                async with running(svc.app):
                    assert await handle.result(timeout=30) == {"square": 16}
        assert receiver.received == []
        assert await svc.app.store.dead_letters() == []


async def test_same_key_gives_one_job(tmp_path: Path) -> None:
    """Two submits with one Idempotency-Key get the same job."""
    async with (
        service(tmp_path) as svc,
        AsyncClient("http://api", transport=asgi(svc.api)) as client,
    ):
        first = await client.submit("square", {"n": 5}, idempotency_key="k-1")
        again = await client.submit("square", {"n": 5}, idempotency_key="k-1")
        assert first.id == again.id
        async with running(svc.app):
            assert await again.result(timeout=30) == {"square": 25}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_sync_client_over_real_http(tmp_path: Path) -> None:
    """The synchronous client, over a real socket to uvicorn, submits and
    waits for the result."""
    async with service(tmp_path) as svc:
        port = _free_port()
        config = uvicorn.Config(
            svc.api, host="127.0.0.1", port=port, log_level="warning", ws="none", lifespan="off"
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        try:
            await eventually(lambda: server.started, what="uvicorn started")

            def use_client() -> object:
                with Client(f"http://127.0.0.1:{port}") as client:
                    return client.submit("square", {"n": 9}).result(timeout=30)

            async with running(svc.app):
                assert await asyncio.to_thread(use_client) == {"square": 81}
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, 10)
