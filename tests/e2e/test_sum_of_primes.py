"""The sum-of-primes service end to end: nginx in front of three replicas, a
worker, the machine's Redis (under a namespace of the test's own), and the
polling client. A replica is killed with SIGKILL in the middle of a batch."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from conveyor.client import AsyncClient, JobNotFound, JobRejected
from conveyor.examples.sum_of_primes.balancer import REPLICA_HEADER, nginx_conf
from conveyor.examples.sum_of_primes.client import ROUTE, SumPrimeClient
from conveyor.examples.sum_of_primes.primes import MAX_B, MAX_SPAN, sum_of_primes
from conveyor.examples.sum_of_primes.service import ServiceConfig
from conveyor.examples.sum_of_primes.stack import Stack, drop_namespace
from conveyor.testing import eventually
from tests.helpers import wait_until
from tests.nginx import Nginx, free_port, nginx_binary
from tests.servers import REDIS_URL

pytestmark = pytest.mark.slow

BATCH = 200
KILL_AFTER = 100
CONCURRENCY = 50
LARGEST_B = 2_000_000
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    stack: Stack
    nginx: Nginx
    config: ServiceConfig

    @property
    def url(self) -> str:
        return self.nginx.url


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """``prefix[n]``: the sum of the primes <= n, by a plain sieve (independent
    of the service's segmented one)."""
    sieve = bytearray([1]) * (LARGEST_B + 1)
    sieve[0:2] = b"\x00\x00"
    for p in range(2, int(LARGEST_B**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, LARGEST_B + 1, p)))
    return list(itertools.accumulate(n if sieve[n] else 0 for n in range(LARGEST_B + 1)))


def _start(workdir: Path) -> Running:
    config = ServiceConfig(
        redis_url=REDIS_URL,
        namespace=f"t{uuid.uuid4().hex[:12]}",
        store_url=f"sqlite:///{workdir / 'store.db'}",
    )
    stack = Stack(config, workdir, replicas=3, workers=1)
    nginx: Nginx | None = None
    try:
        stack.start()
        port = free_port()
        nginx = Nginx(
            workdir / "nginx", nginx_conf(port=port, upstreams=stack.upstreams), port=port
        )
        nginx.start()
    except BaseException:
        stack.stop()
        drop_namespace(REDIS_URL, config.namespace)
        raise
    return Running(stack, nginx, config)


def _stop(running: Running) -> None:
    try:
        running.nginx.stop()
    finally:
        running.stack.stop()
        drop_namespace(REDIS_URL, running.config.namespace)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = _start(tmp_path_factory.mktemp("sum_of_primes"))
    try:
        yield running
    finally:
        _stop(running)


@pytest.fixture
def own_service(tmp_path: Path) -> Iterator[Running]:
    """A stack of the test's own (the test kills one of its replicas)."""
    running = _start(tmp_path)
    try:
        yield running
    finally:
        _stop(running)


class _Tally(httpx.AsyncHTTPTransport):
    """Counts which replica answered each request, by the phase of the test
    in which the request was sent (an answer r2 sent just before its kill may
    arrive after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "before"
        self.replicas: dict[str, Counter[str]] = {"before": Counter(), "after": Counter()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        phase = self.phase
        response = await super().handle_async_request(request)
        # nginx's own error pages (a 502) name no replica.
        self.replicas[phase][response.headers.get(REPLICA_HEADER, "nginx")] += 1
        return response


async def _job_keys(namespace: str) -> int:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys: list[bytes] = [
            k async for k in client.scan_iter(match=f"conveyor:{{{namespace}}}:job:*")
        ]
        return len(keys)
    finally:
        await client.aclose()


async def test_every_answer_arrives_when_a_replica_dies_mid_batch(
    own_service: Running, reference: list[int]
) -> None:
    """200 submitted ranges all get their correct sum, once each, though replica r2 is SIGKILLed halfway."""
    rng = random.Random(20240611)
    ranges = []
    for _ in range(BATCH):
        a = rng.randint(1, LARGEST_B - 50_000)
        ranges.append((a, a + rng.randint(0, 50_000)))
    tally = _Tally()
    slots = asyncio.Semaphore(CONCURRENCY)
    submitted = 0

    async def one(client: SumPrimeClient, a: int, b: int) -> int:
        nonlocal submitted
        async with slots:
            handle = await client.submit(a, b)
            submitted += 1
            return await handle.result(timeout=60, into=int)

    async def kill_halfway() -> None:
        await eventually(lambda: submitted >= KILL_AFTER, timeout=60, what="half submitted")
        await asyncio.to_thread(own_service.stack.kill, "r2", signal.SIGKILL)
        tally.phase = "after"

    async with SumPrimeClient(own_service.url, transport=tally) as client:
        killer = asyncio.create_task(kill_halfway())
        # Submits and polls are in flight when r2 dies.
        sums = await asyncio.wait_for(asyncio.gather(*(one(client, a, b) for a, b in ranges)), 120)
        await killer

    assert own_service.stack.processes["r2"].returncode == -signal.SIGKILL
    wrong = [
        (a, b, got, reference[b] - reference[a - 1])
        for (a, b), got in zip(ranges, sums, strict=True)
        if got != reference[b] - reference[a - 1]
    ]
    assert not wrong, wrong[:5]
    # Retried submits reuse their Idempotency-Key: one job per range.
    assert await _job_keys(own_service.config.namespace) == BATCH
    before, after = tally.replicas["before"], tally.replicas["after"]
    assert {"r1", "r2", "r3"} <= set(before), before
    assert after["r2"] == 0, after
    assert {"r1", "r3"} <= set(after), after


def test_requests_are_spread_round_robin(service: Running) -> None:
    """Consecutive requests through nginx go to every replica in turn, with no affinity."""
    served: Counter[str] = Counter()
    with httpx.Client(base_url=service.url, timeout=10) as client:
        for i in range(30):
            response = client.post("/sumPrime", json={"a": 1, "b": 100 + i})
            assert response.status_code == 202, response.text
            served[response.headers[REPLICA_HEADER]] += 1
    assert set(served) == {"r1", "r2", "r3"}
    assert max(served.values()) - min(served.values()) <= 1, served


def test_submit_answers_202_then_the_poll_finishes(service: Running) -> None:
    """POST answers 202 IN_PROGRESS with Location and Retry-After; GET on that Location ends FINISHED with the sum."""
    with httpx.Client(base_url=service.url, timeout=10) as client:
        accepted = client.post("/sumPrime", json={"a": 10, "b": 30})
        assert accepted.status_code == 202
        body = accepted.json()
        assert body == {"requestId": body["requestId"], "status": "IN_PROGRESS", "payload": None}
        assert accepted.headers["location"] == f"/sumPrime/{body['requestId']}"
        assert int(accepted.headers["retry-after"]) >= 1

        polled: list[dict[str, object]] = []

        def finished() -> bool:
            response = client.get(accepted.headers["location"])
            assert response.status_code == 200, response.text
            polled.append(response.json())
            return polled[-1]["status"] == "FINISHED"

        wait_until(finished, timeout=30)
    assert polled[-1] == {"requestId": body["requestId"], "status": "FINISHED", "payload": 112}
    assert all(p["status"] in ("IN_PROGRESS", "FINISHED") for p in polled)


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        ({"a": 9, "b": 5}, ["body"], "a must be <= b"),
        ({"a": 0, "b": 5}, ["body", "a"], "greater than or equal to 1"),
        ({"a": -4, "b": 5}, ["body", "a"], "greater than or equal to 1"),
        ({"a": 1, "b": 2.5}, ["body", "b"], "valid integer"),
        ({"a": 1.0, "b": 2}, ["body", "a"], "valid integer"),
        ({"a": "1", "b": 2}, ["body", "a"], "valid integer"),
        ({"b": 2}, ["body", "a"], "Field required"),
        ({"a": 1, "b": MAX_B + 1}, ["body", "b"], f"less than or equal to {MAX_B}"),
        ({"a": 1, "b": MAX_SPAN + 1}, ["body"], f"over the limit of {MAX_SPAN}"),
    ],
)
def test_invalid_input_is_a_422_problem(
    service: Running, body: dict[str, object], loc: list[object], fragment: str
) -> None:
    """Bad input through nginx is a 422 problem body whose errors name the field and the rule."""
    response = httpx.post(f"{service.url}/sumPrime", json=body, timeout=10)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 422
    assert any(e["loc"] == loc and fragment in e["msg"] for e in problem["errors"]), problem


def test_a_body_that_is_not_json_is_a_422(service: Running) -> None:
    """A body that is not JSON at all is refused with 422, not a server error."""
    response = httpx.post(
        f"{service.url}/sumPrime",
        content=b"a=1&b=2",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 422, response.text


async def test_the_client_reports_a_rejected_range(service: Running) -> None:
    """Through the client, a 422 is a JobRejected carrying the server's field errors."""
    async with AsyncClient(service.url, route=ROUTE) as c:
        with pytest.raises(JobRejected) as info:
            await c.submit("sum_of_primes", {"a": 7, "b": 3})
    assert info.value.status == 422
    assert "a must be <= b" in str(info.value)


async def test_unknown_request_id_is_404(service: Running) -> None:
    """An id the service never issued answers 404 (raw and through the client)."""
    unknown = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as raw:
        response = await raw.get(f"/sumPrime/{unknown}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert unknown in response.json()["detail"]
    async with SumPrimeClient(service.url) as client:
        with pytest.raises(JobNotFound):
            await client.client.job("sum_of_primes", unknown).status()


async def test_cancelling_a_finished_request_is_409(service: Running) -> None:
    """DELETE after the answer is in leaves it alone: 409, and the answer still reads FINISHED."""
    async with SumPrimeClient(service.url) as client:
        handle = await client.submit(1, 10)
        assert await handle.result(timeout=30, into=int) == 17
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as raw:
            refused = await raw.delete(f"/sumPrime/{handle.id}")
        assert refused.status_code == 409, refused.text
        state = await handle.cancel()
    assert state.status == "SUCCEEDED"
    assert state.body == {"requestId": handle.id, "status": "FINISHED", "payload": 17}


async def test_finished_answer_expires_in_three_minutes(service: Running) -> None:
    """A finished answer's Redis record carries a TTL of about 180 s."""
    async with SumPrimeClient(service.url) as client:
        handle = await client.submit(1, 1000)
        assert await handle.result(timeout=30, into=int) == 76127
    key = f"conveyor:{{{service.config.namespace}}}:job:{handle.id}"
    store = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        ttl = await store.ttl(key)
        record = await store.hgetall(key)
    finally:
        await store.aclose()
    assert 170 <= ttl <= 180, ttl
    assert record["status"] == "SUCCEEDED"
    assert json.loads(record["result"]) == 76127


def test_up_serves_the_demo_then_stops(tmp_path: Path) -> None:
    """`python -m conveyor.examples.sum_of_primes up --demo N` starts everything, prints N correct sums and exits 0."""
    nginx_binary()  # `up` finds nginx on the PATH; install it if missing
    command = [sys.executable, "-m", "conveyor.examples.sum_of_primes", "up", "--port", "0",
               "--redis", REDIS_URL, "--demo", "5", "--seed", "7"]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = re.findall(r"sum of primes in \[(\d+), (\d+)\] = (\d+)", done.stdout)
    assert len(lines) == 5, done.stdout
    for a, b, total in lines:
        assert int(total) == sum_of_primes(int(a), int(b))
    assert "5 answers in" in done.stdout
    workdir = re.search(r"files in (\S+)\)", done.stdout)
    assert workdir is not None
    assert not Path(workdir.group(1)).exists()
