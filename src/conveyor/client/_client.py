"""The job API client: submit, then poll until the job is done.

``Client`` (sync) and ``AsyncClient`` share one request-and-decide core
(``_Core``); each only adds its way of sending and sleeping.

Retries. A submit always carries an ``Idempotency-Key`` (a fresh UUID when
the caller gives none), and every retry of it sends the same key, so a
submit retried after a lost answer never creates a second job. Retried:
connection errors and timeouts, 502/503/504, 429 (waiting at least its
``Retry-After``) and, on submit, 409 (the first request with that key is
still being created). Anything else is final: a 4xx on submit is
``JobRejected`` with the server's problem body.

Polling. ``result()`` asks for the status at once, then waits the server's
``Retry-After`` when it sends one, else a backoff that starts at
``poll_interval`` and doubles up to ``max_poll_interval``; every wait is
cut to what is left of the timeout. ``JobTimeout`` names the job id.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar, overload
from urllib.parse import quote

import httpx
import pydantic

from conveyor._retry_after import parse_retry_after
from conveyor._time import seconds
from conveyor.errors import (
    ClientError,
    ConfigError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobRejected,
    JobTimeout,
)
from conveyor.resilience import RetryPolicy

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "Client",
    "JobHandle",
    "JobStatus",
    "Route",
]

T = TypeVar("T")

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "PENDING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
)
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

DEFAULT_RETRY = RetryPolicy(max_attempts=6, base_delay=0.2, max_delay=5.0)
MAX_RETRY_AFTER = 120.0
"""A server's ``Retry-After`` (on a retried request or a poll) is honoured up to this."""

_TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_TRANSIENT_STATUS = frozenset({502, 503, 504, 429})

Body = pydantic.BaseModel | Mapping[str, object]


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"), limit=MAX_RETRY_AFTER)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """A job's state as the server reported it. ``status`` is one of
    PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED; ``retry_after`` is the
    server's hint (seconds) for the next poll; ``body`` the raw JSON."""

    id: str
    kind: str
    status: str
    progress: float | None = None
    note: str | None = None
    result: object = None
    error: str | None = None
    retry_after: float | None = None
    body: Mapping[str, object] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """How a job API lays out its paths and status bodies.

    The default is Conveyor's own (``POST /jobs/{kind}``, ``GET`` and
    ``DELETE /jobs/{kind}/{id}``, ``{"id", "status", "result", "error"}``).
    Another API of the same shape is a different ``Route``; for example an
    API with ``POST /sumPrime`` and ``GET /sumPrime/{requestId}`` answering
    ``{requestId, status: IN_PROGRESS|FINISHED, payload}``::

        Route(submit="/sumPrime", status="/sumPrime/{id}", cancel=None,
              id_field="requestId", result_field="payload",
              statuses={"IN_PROGRESS": "RUNNING", "FINISHED": "SUCCEEDED"})

    ``statuses`` maps the server's names onto Conveyor's (unlisted names
    pass unchanged). ``use_location``: follow the submit's ``Location``
    header to poll, when there is one. Subclass and override
    ``read_status`` for bodies that fields cannot describe.
    """

    submit: str = "/jobs/{kind}"
    status: str = "/jobs/{kind}/{id}"
    cancel: str | None = "/jobs/{kind}/{id}"
    id_field: str = "id"
    status_field: str = "status"
    result_field: str = "result"
    error_field: str = "error"
    statuses: Mapping[str, str] = field(default_factory=dict)
    use_location: bool = True

    def submit_path(self, kind: str) -> str:
        return self.submit.format(kind=quote(kind, safe=""))

    def status_path(self, kind: str, job_id: str) -> str:
        return self.status.format(kind=quote(kind, safe=""), id=quote(job_id, safe=""))

    def cancel_path(self, kind: str, job_id: str) -> str | None:
        if self.cancel is None:
            return None
        return self.cancel.format(kind=quote(kind, safe=""), id=quote(job_id, safe=""))

    def job_id(self, body: Mapping[str, object]) -> str:
        """The job id in a submit's answer."""
        value = body.get(self.id_field)
        if not isinstance(value, str | int) or value == "":
            raise ClientError(f"the submit answer has no {self.id_field!r}: {_brief(body)}")
        return str(value)

    def read_status(
        self, kind: str, body: Mapping[str, object], retry_after: float | None
    ) -> JobStatus:
        """A status answer as a ``JobStatus``."""
        raw = body.get(self.status_field)
        if not isinstance(raw, str):
            raise ClientError(f"the status answer has no {self.status_field!r}: {_brief(body)}")
        progress = body.get("progress")
        note, error = body.get("note"), body.get(self.error_field)
        return JobStatus(
            id=self.job_id(body),
            kind=kind,
            status=self.statuses.get(raw, raw),
            progress=float(progress) if isinstance(progress, int | float) else None,
            note=note if isinstance(note, str) else None,
            result=body.get(self.result_field),
            error=None if error is None else str(error),
            retry_after=retry_after,
            body=dict(body),
        )


def _brief(body: object) -> str:
    text = repr(body)
    return text if len(text) <= 200 else text[:197] + "..."


class _Again(Exception):
    """Internal: this response or error is worth another try after ``wait``."""

    def __init__(self, wait: float, why: str) -> None:
        super().__init__(why)
        self.wait = wait
        self.why = why


class _PastDeadline(Exception):
    """Internal: the next retry would end after the caller's deadline."""


class _Core:
    """What both clients share: requests, retry decisions, reading answers."""

    def __init__(
        self,
        *,
        api_key: str | None,
        retry: RetryPolicy | None,
        route: Route | None,
        poll_interval: float | timedelta,
        max_poll_interval: float | timedelta,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.retry = retry or DEFAULT_RETRY
        self.route = route or Route()
        self.poll_interval = seconds(poll_interval)
        self.max_poll_interval = seconds(max_poll_interval)
        if self.poll_interval <= 0 or self.max_poll_interval < self.poll_interval:
            raise ConfigError(
                "poll_interval must be > 0 and max_poll_interval >= poll_interval, got "
                f"{self.poll_interval:g} and {self.max_poll_interval:g}"
            )
        self.headers = {"accept": "application/json", **(headers or {})}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.rng = random.Random()

    def retry_wait(self, attempt: int, retry_after: float | None) -> float:
        wait = self.retry.backoff(attempt, self.rng)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait

    def check(self, response: httpx.Response, attempt: int, *, conflict_retries: bool) -> None:
        """Raise ``_Again`` if ``response`` is worth another try."""
        status = response.status_code
        if status in _TRANSIENT_STATUS or (status == 409 and conflict_retries):
            retry_after = _retry_after(response)
            raise _Again(self.retry_wait(attempt, retry_after), f"HTTP {status}")

    def failure(self, exc: Exception, attempt: int) -> _Again:
        """An ``_Again`` for a transient transport error; re-raise anything else."""
        if isinstance(exc, _TRANSIENT_ERRORS):
            return _Again(self.retry_wait(attempt, None), f"{type(exc).__name__}: {exc}")
        raise ClientError(f"request failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def payload(body: Body) -> object:
        if isinstance(body, pydantic.BaseModel):
            return body.model_dump(mode="json")
        if isinstance(body, Mapping):
            return dict(body)
        raise ConfigError(f"a job body is a pydantic model or a dict, not {type(body).__name__}")

    @staticmethod
    def problem(response: httpx.Response) -> dict[str, object]:
        try:
            data = response.json()
        except ValueError:
            text = response.text.strip()
            return {"detail": text[:500]} if text else {}
        return data if isinstance(data, dict) else {"detail": data}

    def error(
        self,
        response: httpx.Response,
        what: str,
        *,
        kind: type[ClientError] = ClientError,
        job_id: str | None = None,
    ) -> ClientError:
        problem = self.problem(response)
        detail = problem.get("detail") or problem.get("title") or response.reason_phrase
        message = f"{what} answered {response.status_code}: {detail}"
        errors = problem.get("errors")
        if isinstance(errors, list) and errors:
            message += f" {_brief(errors)}"
        if response.status_code == 404 and job_id is not None:
            return JobNotFound(
                f"{message} (unknown job, or its result expired)", job_id=job_id, problem=problem
            )
        return kind(message, status=response.status_code, problem=problem)

    def accepted(self, kind: str, response: httpx.Response) -> tuple[str, str, float | None]:
        """(job id, status path, Retry-After) from a submit's answer."""
        if not response.is_success:
            raise self.error(response, f"POST {response.request.url.path}", kind=JobRejected)
        try:
            body = response.json()
        except ValueError:
            raise ClientError(
                f"the submit answer is not JSON: {response.text[:200]!r}",
                status=response.status_code,
            ) from None
        if not isinstance(body, dict):
            raise ClientError(f"the submit answer is not an object: {_brief(body)}")
        job_id = self.route.job_id(body)
        location = response.headers.get("location")
        path = (
            location
            if location and self.route.use_location
            else self.route.status_path(kind, job_id)
        )
        return job_id, path, _retry_after(response)

    def status(self, kind: str, job_id: str, response: httpx.Response, what: str) -> JobStatus:
        if not response.is_success:
            raise self.error(response, what, job_id=job_id)
        try:
            body = response.json()
        except ValueError:
            raise ClientError(f"{what}: the answer is not JSON: {response.text[:200]!r}") from None
        if not isinstance(body, dict):
            raise ClientError(f"{what}: the answer is not an object: {_brief(body)}")
        return self.route.read_status(kind, body, _retry_after(response))

    @staticmethod
    def outcome(state: JobStatus, into: type[Any] | None) -> object:
        """The result of a finished job, or the error that says why there is none."""
        if state.status == FAILED:
            raise JobFailed(
                f"job {state.id} ({state.kind}) failed: {state.error or 'no error given'}",
                job_id=state.id,
                error=state.error,
            )
        if state.status == CANCELLED:
            raise JobCancelled(f"job {state.id} ({state.kind}) was cancelled", job_id=state.id)
        if into is None:
            return state.result
        try:
            return pydantic.TypeAdapter(into).validate_python(state.result)
        except pydantic.ValidationError as exc:
            raise ClientError(
                f"job {state.id} ({state.kind}) result is not a valid {into!r}: {exc}"
            ) from exc

    def next_wait(self, state: JobStatus, interval: float) -> float:
        if state.retry_after is not None and state.retry_after > 0:
            return state.retry_after
        return interval

    @staticmethod
    def timeout_error(handle: JobHandle | AsyncJobHandle, timeout: float, last: str) -> JobTimeout:
        return JobTimeout(
            f"job {handle.id} ({handle.kind}) did not finish within {timeout:g}s "
            f"(last status {last}); it may still finish: poll it again with "
            f"client.job({handle.kind!r}, {handle.id!r})",
            job_id=handle.id,
        )


class Client:
    """A synchronous client of a job API; see the module doc.

    ``transport`` replaces the network (``httpx.MockTransport`` in tests);
    ``sleep`` and ``monotonic`` replace waiting and the clock, so tests run
    instantly. ``timeout`` bounds each HTTP request.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float | timedelta = 10.0,
        retry: RetryPolicy | None = None,
        route: Route | None = None,
        poll_interval: float | timedelta = 0.05,
        max_poll_interval: float | timedelta = 2.0,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._core = _Core(
            api_key=api_key,
            retry=retry,
            route=route,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            headers=headers,
        )
        self._http = httpx.Client(
            base_url=base_url,
            transport=transport,
            timeout=seconds(timeout),
            headers=self._core.headers,
        )
        self._sleep = sleep
        self._monotonic = monotonic

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        headers: Mapping[str, str] | None = None,
        conflict_retries: bool = False,
        deadline: float | None = None,
    ) -> httpx.Response:
        core = self._core
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    response = self._http.request(method, path, json=json, headers=headers)
                except httpx.HTTPError as exc:
                    raise core.failure(exc, attempt) from exc
                core.check(response, attempt, conflict_retries=conflict_retries)
                return response
            except _Again as again:
                if attempt >= core.retry.max_attempts:
                    if again.__cause__ is None:
                        return response  # the caller reads the final answer
                    raise ClientError(
                        f"{method} {path} failed {attempt} times, last: {again.why}"
                    ) from again.__cause__
                if deadline is not None and self._monotonic() + again.wait > deadline:
                    raise _PastDeadline from again.__cause__
                self._sleep(again.wait)

    def submit(
        self,
        kind: str,
        body: Body,
        *,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> JobHandle:
        """Submit a job of ``kind``; returns its handle once the server has
        accepted it. Retries reuse one ``Idempotency-Key`` (made here if not
        given), so at most one job is created. ``JobRejected`` on a 4xx."""
        key = idempotency_key or str(uuid.uuid4())
        headers = {"idempotency-key": key}
        if callback_url is not None:
            headers["callback-url"] = callback_url
        route = self._core.route
        response = self._send(
            "POST",
            route.submit_path(kind),
            json=self._core.payload(body),
            headers=headers,
            conflict_retries=True,
        )
        job_id, path, retry_after = self._core.accepted(kind, response)
        return JobHandle(self, kind, job_id, path, key, retry_after)

    def job(self, kind: str, job_id: str) -> JobHandle:
        """A handle on an existing job (say, after a ``JobTimeout``)."""
        return JobHandle(self, kind, job_id, self._core.route.status_path(kind, job_id), None, None)


class JobHandle:
    """A submitted job: ``status()``, ``result(timeout=...)``, ``cancel()``."""

    def __init__(
        self,
        client: Client,
        kind: str,
        job_id: str,
        status_path: str,
        idempotency_key: str | None,
        retry_after: float | None,
    ) -> None:
        self.client = client
        self.kind = kind
        self.id = job_id
        self.status_path = status_path
        self.idempotency_key = idempotency_key
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"JobHandle(kind={self.kind!r}, id={self.id!r})"

    def _status(self, deadline: float | None) -> JobStatus:
        response = self.client._send("GET", self.status_path, deadline=deadline)
        return self.client._core.status(self.kind, self.id, response, f"GET {self.status_path}")

    def status(self) -> JobStatus:
        """The job's current state (transient errors are retried)."""
        return self._status(None)

    @overload
    def result(self, *, timeout: float | timedelta | None = ...) -> object: ...

    @overload
    def result(self, *, timeout: float | timedelta | None = ..., into: type[T]) -> T: ...

    def result(
        self, *, timeout: float | timedelta | None = 60.0, into: type[Any] | None = None
    ) -> object:
        """Wait for the job to finish and return its result (validated as
        ``into`` when given). ``JobFailed`` / ``JobCancelled`` if it did not
        succeed, ``JobTimeout`` if it is not done after ``timeout`` seconds
        (None: wait as long as it takes)."""
        client, core = self.client, self.client._core
        limit = None if timeout is None else seconds(timeout)
        deadline = None if limit is None else client._monotonic() + limit
        interval = core.poll_interval
        last = "unknown"
        while True:
            try:
                state = self._status(deadline)
            except _PastDeadline:
                raise core.timeout_error(self, limit or 0.0, last) from None
            last = state.status
            if state.done:
                return core.outcome(state, into)
            wait = core.next_wait(state, interval)
            interval = min(interval * 2, core.max_poll_interval)
            if deadline is not None:
                remaining = deadline - client._monotonic()
                if remaining <= 0:
                    raise core.timeout_error(self, limit or 0.0, last)
                wait = min(wait, remaining)
            client._sleep(wait)

    def cancel(self) -> JobStatus:
        """Ask the server to cancel the job; returns its state after the
        request (already finished jobs are left as they are)."""
        core = self.client._core
        path = core.route.cancel_path(self.kind, self.id)
        if path is None:
            raise ConfigError("this job API has no cancel route (route.cancel is None)")
        response = self.client._send("DELETE", path)
        if response.status_code == 409:
            return self.status()
        return core.status(self.kind, self.id, response, f"DELETE {path}")


class AsyncClient:
    """The asynchronous twin of ``Client`` (same arguments, ``await`` the
    calls; ``sleep`` is an async function)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | timedelta = 10.0,
        retry: RetryPolicy | None = None,
        route: Route | None = None,
        poll_interval: float | timedelta = 0.05,
        max_poll_interval: float | timedelta = 2.0,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._core = _Core(
            api_key=api_key,
            retry=retry,
            route=route,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            headers=headers,
        )
        self._http = httpx.AsyncClient(
            base_url=base_url,
            transport=transport,
            timeout=seconds(timeout),
            headers=self._core.headers,
        )
        self._sleep = sleep
        self._monotonic = monotonic

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        headers: Mapping[str, str] | None = None,
        conflict_retries: bool = False,
        deadline: float | None = None,
    ) -> httpx.Response:
        core = self._core
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    response = await self._http.request(method, path, json=json, headers=headers)
                except httpx.HTTPError as exc:
                    raise core.failure(exc, attempt) from exc
                core.check(response, attempt, conflict_retries=conflict_retries)
                return response
            except _Again as again:
                if attempt >= core.retry.max_attempts:
                    if again.__cause__ is None:
                        return response
                    raise ClientError(
                        f"{method} {path} failed {attempt} times, last: {again.why}"
                    ) from again.__cause__
                if deadline is not None and self._monotonic() + again.wait > deadline:
                    raise _PastDeadline from again.__cause__
                await self._sleep(again.wait)

    async def submit(
        self,
        kind: str,
        body: Body,
        *,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> AsyncJobHandle:
        """See ``Client.submit``."""
        key = idempotency_key or str(uuid.uuid4())
        headers = {"idempotency-key": key}
        if callback_url is not None:
            headers["callback-url"] = callback_url
        response = await self._send(
            "POST",
            self._core.route.submit_path(kind),
            json=self._core.payload(body),
            headers=headers,
            conflict_retries=True,
        )
        job_id, path, retry_after = self._core.accepted(kind, response)
        return AsyncJobHandle(self, kind, job_id, path, key, retry_after)

    def job(self, kind: str, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job."""
        path = self._core.route.status_path(kind, job_id)
        return AsyncJobHandle(self, kind, job_id, path, None, None)


class AsyncJobHandle:
    """The asynchronous twin of ``JobHandle``."""

    def __init__(
        self,
        client: AsyncClient,
        kind: str,
        job_id: str,
        status_path: str,
        idempotency_key: str | None,
        retry_after: float | None,
    ) -> None:
        self.client = client
        self.kind = kind
        self.id = job_id
        self.status_path = status_path
        self.idempotency_key = idempotency_key
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"AsyncJobHandle(kind={self.kind!r}, id={self.id!r})"

    async def _status(self, deadline: float | None) -> JobStatus:
        response = await self.client._send("GET", self.status_path, deadline=deadline)
        return self.client._core.status(self.kind, self.id, response, f"GET {self.status_path}")

    async def status(self) -> JobStatus:
        """See ``JobHandle.status``."""
        return await self._status(None)

    @overload
    async def result(self, *, timeout: float | timedelta | None = ...) -> object: ...

    @overload
    async def result(self, *, timeout: float | timedelta | None = ..., into: type[T]) -> T: ...

    async def result(
        self, *, timeout: float | timedelta | None = 60.0, into: type[Any] | None = None
    ) -> object:
        """See ``JobHandle.result``."""
        client, core = self.client, self.client._core
        limit = None if timeout is None else seconds(timeout)
        deadline = None if limit is None else client._monotonic() + limit
        interval = core.poll_interval
        last = "unknown"
        while True:
            try:
                state = await self._status(deadline)
            except _PastDeadline:
                raise core.timeout_error(self, limit or 0.0, last) from None
            last = state.status
            if state.done:
                return core.outcome(state, into)
            wait = core.next_wait(state, interval)
            interval = min(interval * 2, core.max_poll_interval)
            if deadline is not None:
                remaining = deadline - client._monotonic()
                if remaining <= 0:
                    raise core.timeout_error(self, limit or 0.0, last)
                wait = min(wait, remaining)
            await client._sleep(wait)

    async def cancel(self) -> JobStatus:
        """See ``JobHandle.cancel``."""
        core = self.client._core
        path = core.route.cancel_path(self.kind, self.id)
        if path is None:
            raise ConfigError("this job API has no cancel route (route.cancel is None)")
        response = await self.client._send("DELETE", path)
        if response.status_code == 409:
            return await self.status()
        return core.status(self.kind, self.id, response, f"DELETE {path}")
