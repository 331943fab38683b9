"""A message as a SQL row: the columns and their mapping, shared by the SQLite
and PostgreSQL queue, outbox and dead-letter tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from conveyor.brokers._kit import malformed_delivery, short_reason
from conveyor.brokers._protocol import Delivery
from conveyor.errors import MessageError
from conveyor.messages import Message

__all__ = ["MESSAGE_COLUMNS", "claimed", "message_from_row", "message_params"]

MESSAGE_COLUMNS = "msg_id, topic, type, key, priority, headers, payload, created_at"


def message_params(message: Message) -> tuple[object, ...]:
    """The values of ``MESSAGE_COLUMNS`` for ``message``."""
    headers = json.dumps(dict(message.headers), separators=(",", ":"))
    return (
        message.id,
        message.topic,
        message.type,
        message.key,
        message.priority,
        headers,
        message.payload,
        message.created_at,
    )


def _headers(raw: object) -> dict[str, str]:
    if raw == "{}":
        return {}
    if not isinstance(raw, str):
        raise ValueError(f"headers are {type(raw).__name__}, not JSON text")
    try:
        headers = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"headers are not JSON: {exc}") from None
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError(f"headers are not a JSON object of strings: {raw[:100]!r}")
    return headers


def message_from_row(row: Sequence[Any], attempt: int = 0) -> Message:
    """The message in a row that starts with ``MESSAGE_COLUMNS``. Raises
    ``ValueError`` naming the column that does not hold what it must (a row
    written by something other than Conveyor)."""
    msg_id, topic, type_, key, priority, headers, payload, created_at = row[:8]
    if not isinstance(msg_id, str) or not msg_id:
        raise ValueError(f"msg_id is {msg_id!r}, not a message id")
    if not isinstance(type_, str) or not (key is None or isinstance(key, str)):
        raise ValueError("type and key must be text")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority is {priority!r}, not an integer")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ValueError(f"payload is {type(payload).__name__}, not bytes (a BLOB)")
    if not isinstance(created_at, int | float) or isinstance(created_at, bool):
        raise ValueError(f"created_at is {created_at!r}, not a number of seconds")
    try:
        return Message(
            id=msg_id,
            topic=topic,
            type=type_,
            key=key,
            priority=priority,
            headers=MappingProxyType(_headers(headers)),
            payload=bytes(payload),
            created_at=float(created_at),
            attempt=attempt,
        )
    except MessageError as exc:
        raise ValueError(str(exc)) from None


def claimed(
    rows: Sequence[Sequence[Any]], *, topic: str, group: str, token: str, queue: str
) -> list[Delivery]:
    """Deliveries of claimed rows (``seq, attempt, MESSAGE_COLUMNS...``),
    highest priority first, then oldest; a row that does not read as a
    message is a malformed delivery (see ``brokers._kit``)."""

    def order(row: Sequence[Any]) -> tuple[int, int]:
        priority = row[6] if isinstance(row[6], int) else 0
        return -priority, int(row[0])

    out = []
    for row in sorted(rows, key=order):
        receipt = f"{row[0]}:{token}"
        try:
            message = message_from_row(tuple(row)[2:], int(row[1]))
        except (ValueError, TypeError) as exc:
            out.append(
                malformed_delivery(
                    topic=topic,
                    group=group,
                    receipt=receipt,
                    reason=short_reason(exc),
                    where=f"{queue}/{group}/{row[0]}",
                    id=row[2],
                    payload=row[8],
                    attempt=row[1],
                )
            )
            continue
        out.append(Delivery(message, group, receipt))
    return out
