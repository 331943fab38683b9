"""The asynchronous request-reply HTTP API: job kinds, their stores and the
ASGI app (``JobAPI``). See docs/http.md."""

from conveyor._drivers import missing_extra

try:
    from conveyor.http._admin import AdminAPI
    from conveyor.http._app import JobAPI, Problem, problem_api, problem_response
    from conveyor.http._audit import AuditEntry, AuditLog
    from conveyor.http._console import BusinessKey, Console, Selection, Story
    from conveyor.http._dashboard import Dashboard
    from conveyor.http._jobs import (
        CANCELLED,
        FAILED,
        PENDING,
        RUNNING,
        SUCCEEDED,
        IdempotencyRecord,
        JobContext,
        JobKind,
        JobRecord,
        Jobs,
        JobStore,
        StoredResponse,
    )
    from conveyor.http._keys import ApiKey, ApiKeys, create_api_key
    from conveyor.http._webhooks import DeliveryAttempt, Endpoint, Webhooks

except ModuleNotFoundError as exc:
    raise missing_extra(exc, "conveyor.http", "http") from None

__all__ = [
    "AdminAPI",
    "ApiKey",
    "ApiKeys",
    "AuditEntry",
    "AuditLog",
    "BusinessKey",
    "CANCELLED",
    "Console",
    "Dashboard",
    "DeliveryAttempt",
    "Endpoint",
    "FAILED",
    "IdempotencyRecord",
    "JobAPI",
    "JobContext",
    "JobKind",
    "JobRecord",
    "JobStore",
    "Jobs",
    "PENDING",
    "Problem",
    "RUNNING",
    "SUCCEEDED",
    "Selection",
    "StoredResponse",
    "Story",
    "Webhooks",
    "create_api_key",
    "problem_api",
    "problem_response",
]
