"""A job API for the observability test: ``conveyor serve
tests.e2e.metrics_jobs_app:api`` and ``conveyor worker
tests.e2e.metrics_jobs_app:app``, configured by the environment."""

from __future__ import annotations

import pydantic

from conveyor import App
from conveyor.http import JobAPI, JobContext, Jobs


class Number(pydantic.BaseModel):
    n: int = pydantic.Field(strict=True)


app = App("metrics-jobs")
jobs = Jobs(app)


@jobs.kind("double")
async def double(job: JobContext, body: Number) -> int:
    """Twice ``n``."""
    return 2 * body.n


api = JobAPI(jobs, require_api_key=False, rate_limit=None)
