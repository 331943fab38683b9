"""Conveyor's exceptions and handler signals.

Every error Conveyor raises derives from ``ConveyorError``; driver exceptions
are translated at the boundary (``raise BrokerError(...) from exc``)::

    ConveyorError
    ├── ConfigError            invalid setting, URL or argument
    ├── MessageError           a message cannot be built or read
    │   ├── PayloadTooLarge    encoded payload over the size limit
    │   └── DecodeError        payload does not match the handler's type
    ├── BrokerError            the broker failed or refused an operation
    ├── StoreError             the store failed or refused an operation
    ├── HandlerTimeout         a handler ran past its timeout (retryable)
    ├── SagaError              a saga definition, instance or reply is invalid
    │   └── SagaConflict       two updates of one saga raced (retryable)
    ├── WebhookError           a webhook endpoint or delivery was refused
    │   ├── UnsafeTarget       the URL is not a public http(s) target (SSRF guard)
    │   └── UnknownEndpoint    no such (enabled) endpoint for this owner
    ├── ClientError            the job API refused or failed a request (.status, .problem)
    │   ├── JobRejected        the submit was refused (4xx other than 409/429)
    │   ├── JobNotFound        unknown or expired job id (404)
    │   ├── JobFailed          the job ended FAILED (.job_id, .error)
    │   ├── JobCancelled       the job was cancelled (.job_id)
    │   ├── JobTimeout         no final state within the timeout (.job_id)
    │   └── WebhookVerificationError  a delivery's signature or timestamp is invalid
    └── ResilienceError        a resilience primitive refused or cut a call
        ├── CircuitOpen        a circuit breaker is open (.retry_after)
        ├── BulkheadFull       every concurrent and waiting slot is taken
        ├── RateLimited        no permit within the deadline (.retry_after)
        ├── CallTimeout        a call ran past its timeout (also a TimeoutError)
        └── Overloaded         publish refused: the queue is too deep (.retry_after)

    PermanentError             raise from a handler: dead-letter, do not retry

Handler signals are not errors and are never logged as failures::

    HandlerSignal
    ├── Retry(delay=None)      redeliver later (counts as an attempt)
    ├── DeadLetter(reason)     dead-letter now, with a reason
    ├── Skip(reason)           acknowledge without applying any effect
    └── StepFailed(reason)     a saga participant refuses a step: nothing was
                               done, the saga compensates
"""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "BrokerError",
    "BulkheadFull",
    "CallTimeout",
    "CircuitOpen",
    "ClientError",
    "ConfigError",
    "ConveyorError",
    "DeadLetter",
    "DecodeError",
    "HandlerSignal",
    "HandlerTimeout",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "JobRejected",
    "JobTimeout",
    "MessageError",
    "Overloaded",
    "PayloadTooLarge",
    "PermanentError",
    "RateLimited",
    "ResilienceError",
    "Retry",
    "SagaConflict",
    "SagaError",
    "Skip",
    "StepFailed",
    "StoreError",
    "UnknownEndpoint",
    "UnsafeTarget",
    "WebhookError",
    "WebhookVerificationError",
]


class ConveyorError(Exception):
    """Root of every error Conveyor raises."""


class ConfigError(ConveyorError):
    """A setting, URL or argument is invalid; the message names it and the fix."""


class MessageError(ConveyorError):
    """A message cannot be built, encoded or decoded."""


class PayloadTooLarge(MessageError):
    """The encoded payload is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload is {size} bytes, over the {limit}-byte limit; "
            "store large data elsewhere and send a reference"
        )
        self.size = size
        self.limit = limit


class DecodeError(MessageError):
    """A payload does not decode into the type a handler expects (permanent)."""


class BrokerError(ConveyorError):
    """The broker failed or refused an operation."""


class StoreError(ConveyorError):
    """The store failed or refused an operation."""


class HandlerTimeout(ConveyorError):
    """A handler ran longer than its timeout; retried like any transient failure."""


class SagaError(ConveyorError):
    """A saga definition, instance or reply is invalid."""


class SagaConflict(SagaError):
    """Another transaction changed the saga first; the message is retried."""


class WebhookError(ConveyorError):
    """A webhook endpoint cannot be registered, or a delivery cannot be queued."""


class UnsafeTarget(WebhookError):
    """A webhook URL is refused by the SSRF guard: not http(s), has user info,
    or its host resolves to an address that is not public (loopback, private,
    link-local, ...). Add the host or its network to the allow-list to permit it."""


class UnknownEndpoint(WebhookError):
    """No webhook endpoint with that id or URL (enabled, for ``enqueue``) for this owner."""


class ClientError(ConveyorError):
    """The job API refused or failed a request. ``status`` is the HTTP status
    (None when no response came) and ``problem`` the RFC 9457 body, if any."""

    def __init__(
        self, message: str, *, status: int | None = None, problem: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}


class JobRejected(ClientError):
    """The server refused the submit (a 4xx other than 409 and 429): the body
    is invalid, the kind unknown, the key missing...; retrying cannot help."""


class JobNotFound(ClientError):
    """The job id is unknown to the server, or its result has expired."""

    def __init__(
        self, message: str, *, job_id: str, problem: dict[str, object] | None = None
    ) -> None:
        super().__init__(message, status=404, problem=problem)
        self.job_id = job_id


class JobFailed(ClientError):
    """The job ended ``FAILED``; ``error`` is the server's description."""

    def __init__(self, message: str, *, job_id: str, error: str | None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.error = error


class JobCancelled(ClientError):
    """The job was cancelled before it finished."""

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobTimeout(ClientError, TimeoutError):
    """The job did not reach a final state within the timeout; it may still
    finish: poll it again with ``client.job(kind, job_id)``."""

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class WebhookVerificationError(ClientError):
    """A webhook delivery does not verify: a header is missing, the timestamp
    is outside the tolerance, or no signature matches the secret."""


class ResilienceError(ConveyorError):
    """A resilience primitive (bulkhead, rate limiter, timeout, load shedding)
    refused or cut a call."""


class BulkheadFull(ResilienceError):
    """Every concurrent slot and every waiting slot of a bulkhead is taken."""


class RateLimited(ResilienceError):
    """No permit could be had within the deadline; try again in ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(ResilienceError):
    """A circuit breaker refused the call without making it; a probe is allowed
    in ``retry_after`` seconds (0 when the half-open probes are all taken)."""

    def __init__(self, message: str, *, breaker: str, retry_after: float) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.retry_after = retry_after


class CallTimeout(ResilienceError, TimeoutError):
    """A call ran longer than its timeout and was cancelled."""


class Overloaded(ResilienceError):
    """``publish`` refused: the topic's queue is deeper than the shedding
    threshold; try again in ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """Raise (or subclass) in a handler for a failure that retrying cannot fix."""


def _seconds(value: float | timedelta | None) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


class HandlerSignal(Exception):
    """Base of the control signals a handler may raise."""


class Retry(HandlerSignal):
    """Redeliver this message later; the attempt counts toward ``max_attempts``.

    ``delay`` (seconds or ``timedelta``) overrides the policy's backoff.
    """

    def __init__(self, *, delay: float | timedelta | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested by handler")
        self.delay = _seconds(delay)
        self.reason = reason


class DeadLetter(HandlerSignal):
    """Move this message to the dead-letter queue now, with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Skip(HandlerSignal):
    """Acknowledge this message without applying the handler's effects."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class StepFailed(HandlerSignal):
    """Raise from a saga participant to refuse a step (out of stock, card
    declined). The participant's writes roll back, a failure reply goes to
    the orchestrator and the saga compensates the steps before this one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
