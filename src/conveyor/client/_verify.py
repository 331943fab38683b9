"""Standard Webhooks signatures: sign a delivery, verify one.

A delivery carries ``webhook-id``, ``webhook-timestamp`` (integer seconds)
and ``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>``
entries, one per secret in use (two while a rotated secret is in its grace
period). Each HMAC is keyed by the base64-decoded part of a ``whsec_`` secret
and covers ``f"{id}.{timestamp}.".encode() + raw_body``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta

from conveyor._time import seconds
from conveyor.errors import ConfigError, WebhookVerificationError

__all__ = ["SECRET_PREFIX", "new_secret", "sign", "signature_header", "verify"]

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh ``whsec_`` secret: 32 random bytes, base64-encoded."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            "webhook secret is not base64 after 'whsec_'; copy it exactly as it was issued"
        ) from None
    if not key:
        raise ConfigError("webhook secret is empty; copy it exactly as it was issued")
    return key


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One signature entry, ``v1,<base64 HMAC-SHA256>``, for ``body`` sent
    with ``webhook_id`` at ``timestamp`` (integer epoch seconds)."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(keys: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one entry per secret in ``keys``, space-separated."""
    return " ".join(sign(key, webhook_id, timestamp, body) for key in keys)


def verify(
    headers: Mapping[str, str],
    raw_body: bytes | str,
    secret: str,
    *,
    tolerance: float | timedelta = 300,
    now: float | None = None,
) -> None:
    """Check a received delivery; raise ``WebhookVerificationError`` unless it
    is authentic and fresh.

    ``headers`` may use any letter case; ``raw_body`` must be the bytes as
    received (re-serialised JSON will not verify). The timestamp must lie
    within ``tolerance`` seconds of ``now`` (default: the system clock), in
    either direction, against replays. Any one ``v1`` entry of the signature
    header may match; entries are compared in constant time. The id is
    the delivery's idempotency key: store it to drop duplicates.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    missing = [
        name
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        if not lower.get(name)
    ]
    if missing:
        raise WebhookVerificationError(f"webhook delivery lacks the {', '.join(missing)} header")
    webhook_id, stamp = lower["webhook-id"], lower["webhook-timestamp"].strip()
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(
            f"webhook-timestamp {stamp[:40]!r} is not integer seconds"
        ) from None
    current = time.time() if now is None else now
    limit = seconds(tolerance)
    if timestamp < current - limit:
        raise WebhookVerificationError(
            f"webhook {webhook_id} is too old: sent {current - timestamp:.0f}s ago, "
            f"tolerance {limit:g}s (a replay, or clocks out of sync)"
        )
    if timestamp > current + limit:
        raise WebhookVerificationError(
            f"webhook {webhook_id} is from the future: {timestamp - current:.0f}s ahead, "
            f"tolerance {limit:g}s (clocks out of sync)"
        )
    body = raw_body.encode() if isinstance(raw_body, str) else raw_body
    expected = sign(secret, webhook_id, timestamp, body).encode("ascii")
    matched = False
    for entry in lower["webhook-signature"].split():
        # Compare every entry (no early exit) so timing says nothing of which matched.
        if entry.startswith("v1,"):
            matched |= hmac.compare_digest(entry.encode("ascii", "replace"), expected)
    if not matched:
        raise WebhookVerificationError(
            f"no signature of webhook {webhook_id} matches the secret "
            "(wrong secret, or the body was changed)"
        )
