"""Standard Webhooks signatures: ``sign`` and ``verify`` (no network)."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from conveyor.client import WebhookVerificationError, sign, verify
from conveyor.client._verify import new_secret, signature_header
from conveyor.errors import ConfigError

NOW = 1_700_000_000
BODY = b'{"type":"job.succeeded","data":{"id":"j1"}}'


def headers(secret: str | list[str], *, webhook_id: str = "msg_1", ts: int = NOW) -> dict[str, str]:
    keys = [secret] if isinstance(secret, str) else secret
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature_header(keys, webhook_id, ts, BODY),
    }


def test_spec_test_vector() -> None:
    """The signature matches the Standard Webhooks reference test vector."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signed = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signed == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    verify(
        {
            "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "webhook-timestamp": "1614265330",
            "webhook-signature": signed,
        },
        body,
        secret,
        now=1614265330,
    )


def test_new_secret_has_prefix_and_enough_random_bytes() -> None:
    """A fresh secret is whsec_ + base64 of 32 random bytes, different each time."""
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    assert first != second


def test_round_trip_with_any_header_case() -> None:
    """What sign produces verifies, whatever the letter case of the header names."""
    secret = new_secret()
    shouted = {k.upper(): v for k, v in headers(secret).items()}
    verify(shouted, BODY, secret, now=NOW)
    verify(headers(secret), BODY.decode(), secret, now=NOW)


def test_tampered_body_is_rejected() -> None:
    """One changed byte of the body fails verification."""
    secret = new_secret()
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(headers(secret), BODY.replace(b"j1", b"j2"), secret, now=NOW)


def test_tampered_id_is_rejected() -> None:
    """The id is signed: a different webhook-id fails verification."""
    secret = new_secret()
    forged = {**headers(secret), "webhook-id": "msg_2"}
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(forged, BODY, secret, now=NOW)


def test_wrong_secret_is_rejected() -> None:
    """A signature made with another secret does not verify."""
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(headers(new_secret()), BODY, new_secret(), now=NOW)


def test_stale_timestamp_is_rejected() -> None:
    """A delivery older than the tolerance is refused even if correctly signed."""
    secret = new_secret()
    signed = headers(secret, ts=NOW - 301)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(signed, BODY, secret, now=NOW)
    verify(signed, BODY, secret, now=NOW, tolerance=timedelta(minutes=6))


def test_future_timestamp_is_rejected() -> None:
    """A delivery dated beyond the tolerance in the future is refused."""
    secret = new_secret()
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(headers(secret, ts=NOW + 301), BODY, secret, now=NOW)
    verify(headers(secret, ts=NOW + 299), BODY, secret, now=NOW)


def test_rotated_secret_either_signature_verifies() -> None:
    """During a rotation a delivery carries two signatures; either secret verifies it."""
    old, new = new_secret(), new_secret()
    signed = headers([new, old])
    assert len(signed["webhook-signature"].split()) == 2
    verify(signed, BODY, old, now=NOW)
    verify(signed, BODY, new, now=NOW)
    with pytest.raises(WebhookVerificationError):
        verify(signed, BODY, new_secret(), now=NOW)


def test_unknown_versions_and_junk_entries_are_skipped() -> None:
    """Entries of other versions are ignored; one valid v1 entry among them verifies."""
    secret = new_secret()
    good = headers(secret)
    good["webhook-signature"] = "v1a,abc v2,xyz junk " + good["webhook-signature"]
    verify(good, BODY, secret, now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_rejected(missing: str) -> None:
    """Each of the three headers is required, and the error names it."""
    secret = new_secret()
    partial = {k: v for k, v in headers(secret).items() if k != missing}
    with pytest.raises(WebhookVerificationError, match=missing):
        verify(partial, BODY, secret, now=NOW)


def test_non_integer_timestamp_is_rejected() -> None:
    """webhook-timestamp must be integer seconds."""
    secret = new_secret()
    bad = {**headers(secret), "webhook-timestamp": "2023-11-14T22:13:20Z"}
    with pytest.raises(WebhookVerificationError, match="integer"):
        verify(bad, BODY, secret, now=NOW)


def test_malformed_secret_is_a_config_error() -> None:
    """A secret that is not base64 is the receiver's configuration mistake."""
    with pytest.raises(ConfigError, match="base64"):
        verify(headers(new_secret()), BODY, "whsec_not*base64", now=NOW)
