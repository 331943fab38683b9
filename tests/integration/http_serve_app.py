"""A job API for `conveyor serve` in a subprocess: its App reads CONVEYOR_*,
its job store is Redis when TEST_JOBS_REDIS_URL is set."""

from __future__ import annotations

import os

import pydantic

from conveyor import App
from conveyor.http import JobAPI, JobContext, Jobs, JobStore


class Numbers(pydantic.BaseModel):
    n: int = pydantic.Field(ge=0, le=1_000_000, strict=True)


app = App("http-serve")
_redis = os.environ.get("TEST_JOBS_REDIS_URL")
store: JobStore | None = None
if _redis:
    from conveyor.http.redis_jobs import RedisJobStore

    store = RedisJobStore(_redis)
jobs = Jobs(app, store=store)


@jobs.kind("square")
async def square(job: JobContext, body: Numbers) -> int:
    """Square a number."""
    return body.n * body.n


api = JobAPI(jobs, rate_limit=None, retry_after=1)
