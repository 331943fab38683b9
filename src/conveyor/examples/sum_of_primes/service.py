"""The service: the ``sum_of_primes`` job kind, its worker, and the
``/sumPrime`` routes mapped onto Conveyor's job API.

- ``create_jobs(config)``: an ``App`` on the Redis broker with the job kind
  registered; the job records live in Redis (``RedisJobStore``) and expire
  ``config.ttl`` seconds (3 minutes) after they finish.
- ``create_asgi(config, replica=...)``: one HTTP replica. ``JobAPI`` does the
  work (validation, 422 problem bodies, Idempotency-Key, relaying accepted
  jobs to the broker, pruning); ``SumPrimeAPI`` in front of it only renames:
  ``POST /sumPrime`` is ``POST /jobs/sum_of_primes`` and
  ``GET /sumPrime/{requestId}`` is ``GET /jobs/sum_of_primes/{id}``, with the
  bodies reshaped to ``{requestId, status, payload}``. Every response names
  the replica that served it in ``X-Replica``.
- ``run_worker(config)``: a worker process that computes the sums.

Nothing lives in a replica's memory, so nginx may send each request to any
replica (round robin, no affinity) and a replica may die at any time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from conveyor import App, RetryPolicy, Settings
from conveyor.examples.sum_of_primes.balancer import REPLICA_HEADER
from conveyor.examples.sum_of_primes.primes import SumPrimeRequest, sum_of_primes
from conveyor.http import FAILED, PENDING, RUNNING, SUCCEEDED, JobAPI, JobContext, Jobs

__all__ = [
    "FINISHED",
    "IN_PROGRESS",
    "KIND",
    "ServiceConfig",
    "SumPrimeAPI",
    "create_asgi",
    "create_jobs",
    "prepare",
    "reshape_status",
    "run_worker",
]

log = logging.getLogger(__name__)

KIND = "sum_of_primes"
IN_PROGRESS = "IN_PROGRESS"
FINISHED = "FINISHED"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """Where a replica or a worker finds the shared state.

    ``redis_url`` holds the broker's streams and the job records, both under
    ``namespace`` so two runs on one Redis never mix; ``store_url`` is the
    SQL store of the runtime (the worker's inbox, API key table), a SQLite
    file every process of one run shares. ``ttl``: seconds a finished job's
    answer is kept. ``rate_limit``: one limit for every caller (API keys
    are off), shared by the replicas through Redis (``None``: off)."""

    redis_url: str
    namespace: str
    store_url: str
    ttl: float = 180.0
    rate_limit: str | None = "1000/s"
    idle_poll: float = 0.05

    @property
    def broker_url(self) -> str:
        return f"{self.redis_url}?namespace={self.namespace}"


async def compute(job: JobContext, body: SumPrimeRequest) -> int:
    """The sum of the primes in [a, b]."""
    # In a thread so the worker's event loop keeps renewing leases while
    # the sieve runs (the request bounds keep one job well under a second).
    return await asyncio.to_thread(sum_of_primes, body.a, body.b)


def create_jobs(config: ServiceConfig) -> Jobs:
    """The App (Redis broker, SQL store) with the ``sum_of_primes`` kind
    registered on a Redis job store."""
    from conveyor.http.redis_jobs import RedisJobStore

    settings = Settings(
        broker_url=config.broker_url, store_url=config.store_url, idle_poll=config.idle_poll
    )
    app = App("sum_of_primes", settings=settings)
    # A replica killed between leasing accepted jobs from the Redis outbox
    # and publishing them delays those jobs by this lease, not longer.
    jobs = Jobs(app, store=RedisJobStore(config.broker_url, lease=5.0))
    jobs.kind(KIND, ttl=config.ttl, retry=RetryPolicy(max_attempts=3))(compute)
    return jobs


_STATUSES = {PENDING: IN_PROGRESS, RUNNING: IN_PROGRESS, SUCCEEDED: FINISHED}


def reshape_status(body: dict[str, Any]) -> dict[str, Any]:
    """A job API status body as this service's ``{requestId, status, payload}``:
    PENDING and RUNNING are IN_PROGRESS, SUCCEEDED is FINISHED with the sum
    as payload; FAILED and CANCELLED keep their name (a FAILED one carries
    ``error``)."""
    status = body["status"]
    shaped: dict[str, Any] = {
        "requestId": body["id"],
        "status": _STATUSES.get(status, status),
        "payload": body.get("result") if status == SUCCEEDED else None,
    }
    if status == FAILED:
        shaped["error"] = body.get("error")
    return shaped


class SumPrimeAPI:
    """ASGI: ``/sumPrime`` onto ``api``'s ``/jobs/sum_of_primes`` (anything
    else, such as ``/healthz`` and ``/readyz``, passes through unchanged),
    with ``X-Replica: <replica>`` on every response. Error bodies (422 with
    the field list, 404 for an unknown or expired id) are the job API's
    problem bodies, unchanged."""

    def __init__(self, api: JobAPI, *, replica: str) -> None:
        self.api = api
        self.replica = replica
        self._tag = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # lifespan: relay and pruning
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._tag]}
            await send(message)

        path: str = scope["path"]
        base = f"/jobs/{KIND}"
        if path == "/sumPrime":
            await self._reshaped(scope, receive, tagged, base)
        elif path.startswith("/sumPrime/") and "/" not in path[len("/sumPrime/") :]:
            await self._reshaped(scope, receive, tagged, f"{base}/{path[len('/sumPrime/') :]}")
        else:
            await self.api(scope, receive, tagged)

    async def _reshaped(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        inner = {**scope, "path": path, "raw_path": path.encode()}
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.api(inner, receive, capture)
        status: int = start["status"]
        headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        body = b"".join(chunks)
        if status in (200, 202):  # a status body (POST, GET, DELETE): reshape it
            shaped = reshape_status(json.loads(body))
            body = json.dumps(shaped, separators=(",", ":")).encode()
            headers = [
                (name, value)
                for name, value in headers
                if name.lower() not in (b"content-length", b"location")
            ]
            headers.append((b"content-length", str(len(body)).encode()))
            if scope["method"] == "POST":
                headers.append((b"location", f"/sumPrime/{shaped['requestId']}".encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_asgi(config: ServiceConfig, *, replica: str) -> SumPrimeAPI:
    """One HTTP replica (serve it with uvicorn); its lifespan relays accepted
    jobs from Redis to the broker and prunes expired records."""
    jobs = create_jobs(config)
    api = JobAPI(
        jobs,
        require_api_key=False,
        rate_limit=config.rate_limit,
        rate_burst=1000,
        redis_url=config.redis_url,
        retry_after=1,
        # A replica killed between claiming an Idempotency-Key and creating
        # its job leaves the key "in progress" (409) until this lease ends;
        # the client's retries of that submit outlast it.
        idempotency_lease=5.0,
    )
    return SumPrimeAPI(api, replica=replica)


async def prepare(config: ServiceConfig) -> None:
    """Create the run's SQL store and tables (and the broker's consumer
    group) once, before several processes open them at the same moment."""
    api = create_asgi(config, replica="setup").api
    try:
        await api.connect()
    finally:
        await api.jobs.store.close()
        await api.app.close()


async def run_worker(config: ServiceConfig) -> None:
    """Compute sums until SIGTERM/SIGINT, then finish the job in hand and exit."""
    jobs = create_jobs(config)
    await jobs.app.run()
