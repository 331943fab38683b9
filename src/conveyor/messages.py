"""The message envelope and its codec.

A ``Message`` is a frozen value: an id (UUIDv7, time-ordered), the topic it is
published to, an optional type and key, ``bytes`` payload and string headers.
``attempt`` is the delivery attempt (1 on first delivery), ``not_before`` the
earliest time (epoch seconds) it may be delivered.
"""

from __future__ import annotations

import builtins
import json
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, cast

import pydantic
import pydantic_core

from conveyor.errors import DecodeError, MessageError, PayloadTooLarge

__all__ = [
    "CAUSATION_ID",
    "CORRELATION_ID",
    "Codec",
    "DEFAULT_MAX_PAYLOAD",
    "IDEMPOTENCY_KEY",
    "JsonCodec",
    "Message",
    "TRACEPARENT",
    "child_traceparent",
    "parse_traceparent",
    "trace_id",
    "uuid7",
]

CORRELATION_ID = "correlation-id"
CAUSATION_ID = "causation-id"
TRACEPARENT = "traceparent"
IDEMPOTENCY_KEY = "idempotency-key"
DEFAULT_MAX_PAYLOAD = 1024 * 1024

T = TypeVar("T")

_uuid_lock = threading.Lock()
_rand_bits = random.getrandbits
_last_ms = 0
_seq = 0


def uuid7() -> str:
    """A UUIDv7 string (RFC 9562): 48-bit ms timestamp, then a 12-bit sequence
    that keeps ids monotonic within one process and millisecond, then random
    bits (``random`` is reseeded in forked children, so processes differ)."""
    global _last_ms, _seq
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:
                _last_ms += 1
                _seq = 0
            ms = _last_ms
        else:
            _last_ms, _seq = ms, 0
        seq = _seq
    value = (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | _rand_bits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_NO_TRACE = "0" * 32


def child_traceparent(parent: str | None) -> str:
    """A W3C ``traceparent`` for a message sent in the trace of ``parent``:
    the same trace id and flags, a fresh span id; a new trace (sampled) when
    ``parent`` is missing or not a valid version-00 value."""
    match = _TRACEPARENT.match(parent or "")
    span = f"{_rand_bits(64) or 1:016x}"
    if match is not None:
        trace, flags = match.group(1, 3)
        if trace != _NO_TRACE:
            return f"00-{trace}-{span}-{flags}"
    return f"00-{_rand_bits(128) or 1:032x}-{span}-01"


def parse_traceparent(traceparent: str | None) -> tuple[str, str, str] | None:
    """A version-00 ``traceparent``'s trace id, parent span id and flags (hex),
    or None if it is not one."""
    match = _TRACEPARENT.match(traceparent or "")
    return None if match is None else (match.group(1), match.group(2), match.group(3))


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a ``traceparent`` header, or None if it is not one."""
    match = _TRACEPARENT.match(traceparent or "")
    return None if match is None else match.group(1)


class Codec(Protocol):
    """Turns handler values into payload bytes and back."""

    content_type: str

    def encode(self, value: object) -> bytes: ...

    def decode(self, data: bytes, into: type[T]) -> T: ...


class JsonCodec:
    """JSON (UTF-8). Accepts pydantic models, dataclasses, dicts, lists and
    scalars, with ``datetime``/``date``/``time`` (ISO 8601), ``UUID``,
    ``Decimal`` (a string, exact), ``Enum`` (its value) and sets anywhere
    inside, as pydantic writes them; ``bytes`` go out unchanged."""

    content_type = "application/json"

    def encode(self, value: object) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, pydantic.BaseModel):
            return value.model_dump_json().encode()
        try:
            return pydantic_core.to_json(value)
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            raise MessageError(f"cannot encode {type(value).__name__} as JSON: {exc}") from exc

    def decode(self, data: bytes, into: type[T]) -> T:
        try:
            if into is bytes:
                return cast(T, data)
            if isinstance(into, type) and issubclass(into, pydantic.BaseModel):
                return cast(T, into.model_validate_json(data))
            value = json.loads(data)
        except (ValueError, pydantic.ValidationError) as exc:
            name = getattr(into, "__name__", str(into))
            raise DecodeError(f"payload is not a valid {name}: {_short(exc)}") from exc
        except RecursionError:
            # json.loads recurses per level: a hostile payload is permanent,
            # not a crash of the handler (retried as if it were transient).
            name = getattr(into, "__name__", str(into))
            raise DecodeError(f"payload is not a valid {name}: nested too deeply") from None
        if into in (dict, list, str, int, float) and not isinstance(value, into):
            raise DecodeError(f"payload is {type(value).__name__}, expected {into.__name__}")
        return cast(T, value)


def _short(exc: Exception) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


JSON = JsonCodec()


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One message. Build with ``Message.create``; payload is always ``bytes``."""

    topic: str
    payload: bytes
    id: str = field(default_factory=uuid7)
    type: str = ""
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    priority: int = 0
    attempt: int = 0
    created_at: float = field(default_factory=time.time)
    not_before: float | None = None

    def __post_init__(self) -> None:
        if not self.topic or not isinstance(self.topic, str):
            raise MessageError("a message needs a non-empty topic")
        if not isinstance(self.payload, bytes):
            raise MessageError(
                f"payload must be bytes, got {type(self.payload).__name__}; use Message.create"
            )
        if not isinstance(self.headers, MappingProxyType):
            headers = dict(self.headers)
            for name, value in headers.items():
                if not isinstance(name, str) or not isinstance(value, str):
                    raise MessageError(f"header {name!r} must map a str to a str")
            object.__setattr__(self, "headers", MappingProxyType(headers))

    @classmethod
    def create(
        cls,
        topic: str,
        body: object,
        *,
        type: str = "",
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: int = 0,
        delay: float = 0.0,
        codec: Codec = JSON,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> Message:
        """Encode ``body`` with ``codec`` and wrap it; raises ``PayloadTooLarge``."""
        payload = codec.encode(body)
        if len(payload) > max_payload:
            raise PayloadTooLarge(len(payload), max_payload)
        if not type and isinstance(body, pydantic.BaseModel):
            type = body.__class__.__name__
        now = time.time()
        return cls(
            topic=topic,
            payload=payload,
            type=type,
            key=key,
            headers=dict(headers or {}),
            priority=priority,
            created_at=now,
            not_before=now + delay if delay > 0 else None,
        )

    @property
    def correlation_id(self) -> str:
        """The id shared by every message of one business operation."""
        return self.headers.get(CORRELATION_ID, self.id)

    @property
    def causation_id(self) -> str | None:
        """The id of the message whose handler sent this one."""
        return self.headers.get(CAUSATION_ID)

    @property
    def traceparent(self) -> str | None:
        return self.headers.get(TRACEPARENT)

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get(IDEMPOTENCY_KEY)

    def decode(self, into: builtins.type[T], codec: Codec = JSON) -> T:
        """Decode the payload into ``into``; raises ``DecodeError`` (permanent)."""
        return codec.decode(self.payload, into)

    def with_attempt(self, attempt: int) -> Message:
        return replace(self, attempt=attempt)

    def causal_headers(self) -> dict[str, str]:
        """Headers for a message this one causes: same correlation id,
        causation id = this message's id, and a ``traceparent`` of its own in
        this message's trace (a fresh span id: the new message's own)."""
        return {
            CORRELATION_ID: self.correlation_id,
            CAUSATION_ID: self.id,
            TRACEPARENT: child_traceparent(self.traceparent),
        }

    def envelope(self) -> dict[str, Any]:
        """Every field but the payload and the attempt, JSON-safe: what a broker
        that carries the payload on its own puts beside it (one header)."""
        return {
            "id": self.id,
            "topic": self.topic,
            "type": self.type,
            "key": self.key,
            "headers": dict(self.headers),
            "priority": self.priority,
            "created_at": self.created_at,
            "not_before": self.not_before,
        }

    @classmethod
    def from_envelope(cls, fields: Mapping[str, Any], payload: bytes) -> Message:
        """The message ``envelope()`` described, around ``payload`` (attempt 1).
        Raises ``KeyError``/``ValueError``/``TypeError`` on a malformed envelope."""
        return cls(
            id=str(fields["id"]),
            topic=str(fields["topic"]),
            payload=payload,
            type=str(fields["type"]),
            key=fields.get("key"),
            headers={str(k): str(v) for k, v in dict(fields["headers"]).items()},
            priority=int(fields["priority"]),
            created_at=float(fields["created_at"]),
            not_before=None if fields["not_before"] is None else float(fields["not_before"]),
        )

    def to_json(self) -> dict[str, object]:
        """A JSON-safe view (payload as text when UTF-8, for CLIs and logs)."""
        try:
            payload: object = json.loads(self.payload)
        except ValueError:
            payload = self.payload.decode("utf-8", "replace")
        return {**self.envelope(), "attempt": self.attempt, "payload": payload}
