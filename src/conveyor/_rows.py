"""A message as a SQL row: the columns and their mapping, shared by the SQLite
and PostgreSQL queue, outbox and dead-letter tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from conveyor.messages import Message

__all__ = ["MESSAGE_COLUMNS", "message_from_row", "message_params"]

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


def message_from_row(row: Sequence[Any], attempt: int = 0) -> Message:
    """The message in a row that starts with ``MESSAGE_COLUMNS``."""
    return Message(
        id=row[0],
        topic=row[1],
        type=row[2],
        key=row[3],
        priority=row[4],
        headers=MappingProxyType(json.loads(row[5])),
        payload=bytes(row[6]),
        created_at=row[7],
        attempt=attempt,
    )
