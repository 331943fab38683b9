"""Job kinds and an API builder shared by the HTTP API tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
import pydantic

from conveyor import App, PermanentError, RetryPolicy, Settings
from conveyor._time import Clock
from conveyor.http import JobAPI, JobContext, Jobs, JobStore


class Numbers(pydantic.BaseModel):
    """Input of the test kinds."""

    n: int = pydantic.Field(ge=0, le=1_000_000, strict=True)
    label: str = pydantic.Field(default="", max_length=50)


class Square(pydantic.BaseModel):
    square: int


class Codepoint(pydantic.BaseModel):
    """Input of the ``char`` kind."""

    codepoint: int = pydantic.Field(ge=0, le=0x10FFFF, strict=True)


@dataclass
class Controls:
    """Lets a test hold the ``slow`` kind mid-run and count attempts."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    attempts: dict[str, int] = field(default_factory=dict)
    saw_cancel: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Built:
    app: App
    jobs: Jobs
    api: JobAPI
    controls: Controls

    def client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.api),
            base_url="http://testserver",
            headers=headers,
        )


def build(
    settings: Settings,
    *,
    store: JobStore | None = None,
    clock: Clock | None = None,
    webhooks: Any = None,
    **options: Any,
) -> Built:
    """An App with five kinds (square, slow, flaky, doomed, char) and its JobAPI;
    ``clock`` drives the job records, the limiter and shedding (the App and
    its broker keep real time)."""
    app = App("http-test", settings=settings)
    jobs = Jobs(app, store=store, clock=clock, webhooks=webhooks)
    controls = Controls()

    @jobs.kind("square", ttl=180)
    async def square(job: JobContext, body: Numbers) -> Square:
        """Square a number."""
        return Square(square=body.n * body.n)

    @jobs.kind("slow", ttl=60)
    async def slow(job: JobContext, body: Numbers) -> dict[str, int]:
        """Report progress, then wait until released or cancelled."""
        await job.progress(0.5, "halfway")
        controls.started.set()
        for _ in range(2000):
            if controls.release.is_set():
                break
            if await job.cancelled():
                controls.saw_cancel.set()
                break
            await asyncio.sleep(0.005)
        return {"n": body.n}

    @jobs.kind("flaky", retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.01))
    async def flaky(job: JobContext, body: Numbers) -> int:
        """Fail every attempt with a retryable error."""
        controls.attempts[job.id] = controls.attempts.get(job.id, 0) + 1
        raise RuntimeError(f"attempt {job.attempt} failed")

    @jobs.kind("doomed")
    async def doomed(job: JobContext, body: Numbers) -> int:
        """Fail at once with a permanent error."""
        controls.attempts[job.id] = controls.attempts.get(job.id, 0) + 1
        raise PermanentError("cannot be done")

    @jobs.kind("char")
    async def char(job: JobContext, body: Codepoint) -> dict[str, str]:
        """The character of a code point (a lone surrogate for 0xD800)."""
        return {"char": chr(body.codepoint)}

    options.setdefault("rate_limit", None)
    api = JobAPI(jobs, **options)
    return Built(app=app, jobs=jobs, api=api, controls=controls)
