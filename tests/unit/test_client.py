"""The job API client against ``httpx.MockTransport`` servers: retries with
one idempotency key, polling that honours Retry-After, the errors it raises,
and another API's layout through a ``Route`` (no network, no real waiting)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator

import httpx
import pydantic
import pytest

from conveyor import RetryPolicy
from conveyor._retry_after import parse_retry_after
from conveyor.client import (
    AsyncClient,
    Client,
    ClientError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobRejected,
    JobTimeout,
    Route,
)
from conveyor.client._client import MAX_RETRY_AFTER

FAST = RetryPolicy(max_attempts=5, base_delay=0.1, max_delay=1.0, jitter=False)


class FakeTime:
    """Sleeps that only move a counter."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay

    async def asleep(self, delay: float) -> None:
        self.sleep(delay)


Script = Iterator[httpx.Response | Exception]


class Server:
    """A scripted server: each request takes the next answer (or raises it)."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers: Script = iter(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


def accepted(job_id: str = "j1", kind: str = "report", retry_after: str = "1") -> httpx.Response:
    return httpx.Response(
        202,
        json={
            "id": job_id,
            "kind": kind,
            "status": "PENDING",
            "status_url": f"/jobs/{kind}/{job_id}",
        },
        headers={"location": f"/jobs/{kind}/{job_id}", "retry-after": retry_after},
    )


def state(status: str, *, retry_after: str | None = None, **fields: object) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after else {}
    body = {"id": "j1", "kind": "report", "status": status, "progress": None, **fields}
    return httpx.Response(200, json=body, headers=headers)


def problem(status: int, detail: str, **extra: object) -> httpx.Response:
    body = {"type": "about:blank", "title": "x", "status": status, "detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def client_for(server: Server, clock: FakeTime, **options: object) -> Client:
    options.setdefault("retry", FAST)
    return Client(
        "http://jobs.test",
        api_key="k-123",
        transport=httpx.MockTransport(server),
        sleep=clock.sleep,
        monotonic=clock.monotonic,
        **options,  # type: ignore[arg-type]
    )


def test_public_namespace_is_sorted_and_complete() -> None:
    """conveyor.client lists exactly its public names, sorted, in __all__."""
    mod = importlib.import_module("conveyor.client")
    assert list(mod.__all__) == sorted(mod.__all__)
    assert all(hasattr(mod, name) for name in mod.__all__)


def test_submit_retries_transient_failures_with_one_idempotency_key() -> None:
    """A refused connection, a reset, a timeout, 502/503/504 and 429 are
    retried, every time with the same generated Idempotency-Key."""
    server = Server(
        httpx.ConnectError("refused"),
        httpx.ReadError("connection reset"),
        httpx.ReadTimeout("slow"),
        httpx.Response(502),
        httpx.Response(503),
        httpx.Response(504),
        httpx.Response(429, headers={"retry-after": "2"}),
        accepted(),
    )
    clock = FakeTime()
    client = client_for(
        server,
        clock,
        retry=RetryPolicy(max_attempts=8, base_delay=0.1, max_delay=1.0, jitter=False),
    )
    handle = client.submit("report", {"n": 1})
    assert handle.id == "j1"
    assert len(server.requests) == 8
    keys = {r.headers["idempotency-key"] for r in server.requests}
    assert len(keys) == 1
    assert handle.idempotency_key in keys
    assert all(r.headers["authorization"] == "Bearer k-123" for r in server.requests)
    assert all(json.loads(r.content) == {"n": 1} for r in server.requests)
    assert clock.sleeps[6] == 2.0, "the 429's Retry-After is waited"


def test_caller_key_is_sent_unchanged() -> None:
    """An Idempotency-Key given by the caller is the one sent, retries included."""
    server = Server(httpx.Response(503), accepted())
    client_for(server, FakeTime()).submit("report", {"n": 1}, idempotency_key="order-42")
    assert [r.headers["idempotency-key"] for r in server.requests] == ["order-42"] * 2


def test_conflict_while_the_original_is_in_flight_is_retried() -> None:
    """409 (the first request with this key is still being created) is retried."""
    server = Server(problem(409, "in flight"), accepted())
    assert client_for(server, FakeTime()).submit("report", {"n": 1}).id == "j1"
    assert len(server.requests) == 2


def test_rejected_submit_raises_with_the_problem_body() -> None:
    """A 422 is not retried; JobRejected carries the status and the problem's errors."""
    errors = [{"loc": ["body", "n"], "msg": "field required"}]
    server = Server(problem(422, "invalid body", errors=errors))
    with pytest.raises(JobRejected, match="422: invalid body") as caught:
        client_for(server, FakeTime()).submit("report", {})
    assert caught.value.status == 422
    assert caught.value.problem["errors"] == errors
    assert len(server.requests) == 1


def test_retries_give_up_after_max_attempts() -> None:
    """Persistent 503s end in a ClientError with the status after max_attempts;
    persistent connection errors end in a ClientError naming the error."""
    server = Server(*[httpx.Response(503)] * 5)
    with pytest.raises(ClientError) as caught:
        client_for(server, FakeTime()).submit("report", {"n": 1})
    assert caught.value.status == 503
    assert len(server.requests) == FAST.max_attempts
    down = Server(*[httpx.ConnectError("refused")] * 5)
    with pytest.raises(ClientError, match=r"failed 5 times.*refused"):
        client_for(down, FakeTime()).submit("report", {"n": 1})


def test_callback_url_and_pydantic_body_are_sent() -> None:
    """A pydantic body is sent as its JSON; callback_url goes in Callback-Url."""

    class Report(pydantic.BaseModel):
        n: int
        title: str

    server = Server(accepted())
    client_for(server, FakeTime()).submit(
        "report", Report(n=2, title="t"), callback_url="https://hooks.example/in"
    )
    [request] = server.requests
    assert json.loads(request.content) == {"n": 2, "title": "t"}
    assert request.headers["callback-url"] == "https://hooks.example/in"
    assert request.url.path == "/jobs/report"


def test_result_polls_honouring_retry_after_and_returns_the_result() -> None:
    """Polling waits the server's Retry-After when given, else a backoff that
    starts small and doubles; the result comes back typed when asked."""
    server = Server(
        accepted(),
        state("PENDING"),
        state("RUNNING"),
        state("RUNNING", retry_after="3"),
        state("RUNNING"),
        state("SUCCEEDED", result={"total": 7}),
    )
    clock = FakeTime()
    handle = client_for(server, clock, poll_interval=0.05, max_poll_interval=1.0).submit(
        "report", {"n": 1}
    )

    class Total(pydantic.BaseModel):
        total: int

    assert handle.result(timeout=60, into=Total) == Total(total=7)
    assert clock.sleeps == [0.05, 0.1, 3.0, 0.4]
    assert all(r.url.path == "/jobs/report/j1" for r in server.requests[1:])


def test_result_wait_is_cut_to_the_remaining_timeout_and_names_the_job() -> None:
    """A Retry-After longer than the time left is cut to it; then JobTimeout
    names the job id and its last status."""
    server = Server(accepted(), *[state("RUNNING", retry_after="30")] * 3)
    clock = FakeTime()
    handle = client_for(server, clock).submit("report", {"n": 1})
    with pytest.raises(JobTimeout, match=r"job j1 \(report\).*10s.*RUNNING") as caught:
        handle.result(timeout=10)
    assert caught.value.job_id == "j1"
    assert isinstance(caught.value, TimeoutError)
    assert clock.sleeps == [10.0]


def test_status_reads_are_retried_on_transient_errors() -> None:
    """GET errors (reset, 503) during polling are retried, not raised."""
    server = Server(
        accepted(), httpx.ReadError("reset"), httpx.Response(503), state("SUCCEEDED", result=5)
    )
    assert client_for(server, FakeTime()).submit("report", {"n": 1}).result(timeout=5) == 5


def test_failed_cancelled_and_unknown_jobs_raise_their_errors() -> None:
    """FAILED raises JobFailed with the error, CANCELLED JobCancelled, 404 JobNotFound."""
    clock = FakeTime()
    failed = client_for(Server(accepted(), state("FAILED", error="ValueError: bad")), clock)
    with pytest.raises(JobFailed, match="ValueError: bad") as caught:
        failed.submit("report", {"n": 1}).result(timeout=5)
    assert (caught.value.job_id, caught.value.error) == ("j1", "ValueError: bad")
    cancelled = client_for(Server(accepted(), state("CANCELLED")), clock)
    with pytest.raises(JobCancelled, match="j1"):
        cancelled.submit("report", {"n": 1}).result(timeout=5)
    gone = client_for(Server(accepted(), problem(404, "no job 'j1'")), clock)
    with pytest.raises(JobNotFound, match="expired") as missing:
        gone.submit("report", {"n": 1}).status()
    assert missing.value.job_id == "j1"


def test_cancel_deletes_and_tolerates_a_finished_job() -> None:
    """cancel() sends DELETE to the job; a 409 (already finished) returns its state."""
    server = Server(
        accepted(), state("CANCELLED"), problem(409, "finished"), state("SUCCEEDED", result=1)
    )
    client = client_for(server, FakeTime())
    handle = client.submit("report", {"n": 1})
    assert handle.cancel().status == "CANCELLED"
    assert handle.cancel().status == "SUCCEEDED"
    assert [r.method for r in server.requests] == ["POST", "DELETE", "DELETE", "GET"]


SUM_PRIME = Route(
    submit="/sumPrime",
    status="/sumPrime/{id}",
    cancel=None,
    id_field="requestId",
    result_field="payload",
    statuses={"IN_PROGRESS": "RUNNING", "FINISHED": "SUCCEEDED"},
    use_location=False,
)


def sum_prime_server() -> Callable[[httpx.Request], httpx.Response]:
    polls = iter(["IN_PROGRESS", "IN_PROGRESS", "FINISHED"])

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/sumPrime":
            return httpx.Response(
                202, json={"requestId": "r9", "status": "IN_PROGRESS", "payload": None}
            )
        assert request.method == "GET"
        assert request.url.path == "/sumPrime/r9"
        status = next(polls)
        return httpx.Response(
            200,
            json={
                "requestId": "r9",
                "status": status,
                "payload": 17 if status == "FINISHED" else None,
            },
        )

    return answer


def test_a_route_adapts_the_client_to_another_api_layout() -> None:
    """With a Route, the same polling client serves POST /sumPrime and
    GET /sumPrime/{requestId} with IN_PROGRESS/FINISHED statuses."""
    clock = FakeTime()
    client = Client(
        "http://primes.test",
        transport=httpx.MockTransport(sum_prime_server()),
        route=SUM_PRIME,
        sleep=clock.sleep,
        monotonic=clock.monotonic,
    )
    handle = client.submit("sum_of_primes", {"a": 1, "b": 10})
    assert handle.id == "r9"
    assert handle.status().status == "RUNNING"
    assert handle.result(timeout=5) == 17


async def test_async_client_retries_with_one_key_and_polls() -> None:
    """The async client keeps the same key across retries and polls to the result."""
    server = Server(
        httpx.ConnectError("refused"),
        httpx.Response(503, headers={"retry-after": "1"}),
        accepted(),
        state("RUNNING", retry_after="2"),
        state("SUCCEEDED", result=[1, 2]),
    )
    clock = FakeTime()
    async with AsyncClient(
        "http://jobs.test",
        transport=httpx.MockTransport(server),
        retry=FAST,
        sleep=clock.asleep,
        monotonic=clock.monotonic,
    ) as client:
        handle = await client.submit("report", {"n": 1})
        assert await handle.result(timeout=30) == [1, 2]
    posts = [r for r in server.requests if r.method == "POST"]
    assert len(posts) == 3
    assert len({r.headers["idempotency-key"] for r in posts}) == 1
    assert clock.sleeps == [0.1, 1.0, 2.0]


async def test_async_timeout_names_the_job() -> None:
    """The async client's JobTimeout names the job id."""
    clock = FakeTime()
    server = Server(accepted(job_id="j-77"), *[state("PENDING")] * 50)
    async with AsyncClient(
        "http://jobs.test",
        transport=httpx.MockTransport(server),
        sleep=clock.asleep,
        monotonic=clock.monotonic,
    ) as client:
        handle = await client.submit("report", {"n": 1})
        with pytest.raises(JobTimeout, match="j-77"):
            await handle.result(timeout=3)
    assert clock.now == pytest.approx(3.0)


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    """Retry-After is read as delta seconds or as an HTTP date."""
    assert parse_retry_after("7", limit=60) == 7.0
    when = "Wed, 21 Oct 2015 07:28:10 GMT"
    assert parse_retry_after(when, limit=60, now=1445412480.0) == 10.0
    assert parse_retry_after("soon", limit=60) is None
    assert parse_retry_after(None, limit=60) is None


def test_retry_after_is_parsed_strictly_and_capped() -> None:
    """Only ASCII digits or an HTTP date count: other digits, fractions,
    signs and impossible dates are ignored (None), never an error; a value
    of any length is cut to the limit."""
    for value in ("\u00b2", "\u0663", "1.5", "-1", "+3", "0x10", "Mon, 01 Jan 99999 00:00:00 GMT"):
        assert parse_retry_after(value, limit=60) is None, value
    assert parse_retry_after("9" * 400, limit=60) == 60
    assert parse_retry_after("9" * 5000, limit=60) == 60
    assert parse_retry_after("61", limit=60) == 60
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", limit=60, now=0.0) == 60


def test_a_huge_retry_after_does_not_stall_polling() -> None:
    """A 400-digit Retry-After on a poll is honoured only up to
    MAX_RETRY_AFTER, also with no timeout; a non-ASCII digit is ignored."""
    first = accepted()
    headers = [(k, v) for k, v in first.headers.raw if k.lower() != b"retry-after"]
    # As a server sends it: UTF-8 bytes.
    odd = httpx.Response(
        202, content=first.content, headers=[*headers, (b"retry-after", "\u00b2".encode())]
    )
    server = Server(
        odd,
        state("RUNNING", retry_after="9" * 400),
        state("SUCCEEDED", result=5),
    )
    clock = FakeTime()
    handle = client_for(server, clock, poll_interval=0.05).submit("report", {"n": 1})
    assert handle.retry_after is None
    assert handle.result(timeout=None) == 5
    assert clock.sleeps == [MAX_RETRY_AFTER]
