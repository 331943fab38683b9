"""The job API client and the webhook verifier.

``Client``/``AsyncClient`` submit a job and poll it to its end, retrying
transient failures without ever creating a job twice; ``verify`` checks a
webhook delivery's Standard Webhooks signature. See docs/client.md.
"""

from conveyor._drivers import missing_extra

try:
    from conveyor.client._client import (
        AsyncClient,
        AsyncJobHandle,
        Client,
        JobHandle,
        JobStatus,
        Route,
    )
    from conveyor.client._verify import sign, verify
    from conveyor.errors import (
        ClientError,
        JobCancelled,
        JobFailed,
        JobNotFound,
        JobRejected,
        JobTimeout,
        WebhookVerificationError,
    )
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "conveyor.client", "client") from None

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "Client",
    "ClientError",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRejected",
    "JobStatus",
    "JobTimeout",
    "Route",
    "WebhookVerificationError",
    "sign",
    "verify",
]
