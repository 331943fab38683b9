"""The envelope, its ids and its codec."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

import pydantic
import pytest

from conveyor.errors import DecodeError, MessageError, PayloadTooLarge
from conveyor.messages import (
    CAUSATION_ID,
    CORRELATION_ID,
    Message,
    child_traceparent,
    trace_id,
    uuid7,
)


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


def test_uuid7_is_version_7_and_time_ordered() -> None:
    """Ids are RFC 9562 version-7 UUIDs that sort in creation order."""
    ids = [uuid7() for _ in range(5000)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_create_encodes_pydantic_model_and_decodes_back() -> None:
    """A pydantic body round-trips and names the message type after the model."""
    message = Message.create("orders", Order(order_id="o1", amount=5), key="o1")
    assert message.type == "Order"
    assert message.key == "o1"
    assert isinstance(message.payload, bytes)
    assert message.decode(Order) == Order(order_id="o1", amount=5)
    assert message.decode(dict) == {"order_id": "o1", "amount": 5}


def test_message_is_frozen_and_headers_read_only() -> None:
    """Messages are immutable values, headers included."""
    message = Message.create("t", {"a": 1}, headers={"x": "1"})
    with pytest.raises(AttributeError):
        message.topic = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        message.headers["x"] = "2"  # type: ignore[index]


def test_payload_over_limit_is_a_clear_error() -> None:
    """An oversized payload raises PayloadTooLarge naming size and limit."""
    with pytest.raises(PayloadTooLarge, match="over the 100-byte limit"):
        Message.create("t", {"blob": "x" * 200}, max_payload=100)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"topic": "", "payload": b"{}"}, "non-empty topic"),
        ({"topic": "t", "payload": "text"}, "payload must be bytes"),
        ({"topic": "t", "payload": b"{}", "headers": {"a": 1}}, "must map a str to a str"),
    ],
)
def test_bad_envelope_fields_are_refused(kwargs: dict[str, object], needle: str) -> None:
    """Invalid envelopes raise MessageError with the reason."""
    with pytest.raises(MessageError, match=needle):
        Message(**kwargs)  # type: ignore[arg-type]


def test_unencodable_body_is_a_message_error() -> None:
    """A body JSON cannot encode raises MessageError, not TypeError."""
    with pytest.raises(MessageError, match="cannot encode"):
        Message.create("t", {"when": object()})


def test_decode_errors_are_permanent_decode_errors() -> None:
    """Payloads that do not match the wanted type raise DecodeError with the reason."""
    with pytest.raises(DecodeError, match="not a valid Order"):
        Message.create("t", {"order_id": "o1"}).decode(Order)
    with pytest.raises(DecodeError):
        Message(topic="t", payload=b"{not json").decode(dict)
    with pytest.raises(DecodeError, match="expected dict"):
        Message.create("t", [1, 2]).decode(dict)


def test_payloads_nested_too_deeply_are_decode_and_message_errors() -> None:
    """100,000 levels of nesting: DecodeError on decode (for any type) and
    MessageError on encode, never a RecursionError."""
    deep = b"[" * 100_000 + b"]" * 100_000
    for into in (dict, list, object, Order):
        with pytest.raises(DecodeError, match="not a valid"):
            Message(topic="t", payload=deep).decode(into)
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(MessageError, match="cannot encode"):
        Message.create("t", value)


def test_caused_message_carries_correlation_and_causation() -> None:
    """A message caused by another keeps its correlation id, points back to
    it, and gets a traceparent of its own in the cause's trace."""
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    first = Message.create("a", {}, headers={CORRELATION_ID: "corr-1", "traceparent": parent})
    headers = first.causal_headers()
    assert headers[CORRELATION_ID] == "corr-1"
    assert headers[CAUSATION_ID] == first.id
    child = headers["traceparent"]
    assert trace_id(child) == "0af7651916cd43dd8448eb211c80319c"
    assert child != parent
    assert child.endswith("-01")
    assert first.causal_headers()["traceparent"] != child  # a fresh span id each time
    assert Message.create("t", {}).causal_headers()[CORRELATION_ID] != "corr-1"


def test_a_message_without_a_valid_traceparent_starts_a_trace() -> None:
    """No parent, or a malformed one: a new valid trace, sampled."""
    for parent in (None, "", "00-ab-cd-01", "01-" + "a" * 32 + "-" + "b" * 16 + "-01"):
        child = child_traceparent(parent)
        assert trace_id(child) is not None
        assert trace_id(child) != "a" * 32


def test_delay_sets_not_before() -> None:
    """A delayed message is not deliverable before created_at + delay."""
    message = Message.create("t", {}, delay=5)
    assert message.not_before is not None
    assert message.not_before == pytest.approx(message.created_at + 5)


class Colour(enum.Enum):
    RED = "red"


def test_dict_bodies_with_everyday_types_encode() -> None:
    """A dict holding datetime, date, UUID, Decimal, Enum, a set and a model
    encodes as pydantic writes them (Decimal exact, as a string)."""

    class Line(pydantic.BaseModel):
        sku: str

    when = datetime(2026, 12, 2, 9, 30, tzinfo=UTC)
    ident = uuid.UUID("0193e4a1-7c1a-7000-8000-000000000001")
    body = {
        "at": when,
        "day": date(2026, 12, 2),
        "id": ident,
        "amount": Decimal("12.30"),
        "colour": Colour.RED,
        "tags": {"a"},
        "line": Line(sku="mug"),
    }
    decoded = Message.create("t", body).decode(dict)
    assert decoded == {
        "at": "2026-12-02T09:30:00Z",
        "day": "2026-12-02",
        "id": str(ident),
        "amount": "12.30",
        "colour": "red",
        "tags": ["a"],
        "line": {"sku": "mug"},
    }
    assert datetime.fromisoformat(decoded["at"]) == when
