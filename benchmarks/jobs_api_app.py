"""The job API the HTTP benchmark serves: one trivial kind. Its App reads
CONVEYOR_*; the job store is Redis when BENCH_JOBS_REDIS_URL is set."""

from __future__ import annotations

import os

import pydantic

from conveyor import App
from conveyor.http import JobAPI, JobContext, Jobs, JobStore


class Numbers(pydantic.BaseModel):
    n: int = pydantic.Field(ge=0, le=1_000_000)


app = App("http-bench")
store: JobStore | None = None
if redis_url := os.environ.get("BENCH_JOBS_REDIS_URL"):
    from conveyor.http.redis_jobs import RedisJobStore

    store = RedisJobStore(redis_url)
jobs = Jobs(app, store=store)


@jobs.kind("square")
async def square(job: JobContext, body: Numbers) -> int:
    """Square a number."""
    return body.n * body.n


api = JobAPI(jobs, rate_limit=None, require_api_key=False)
