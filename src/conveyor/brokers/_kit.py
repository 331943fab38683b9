"""What every broker backend shares: how an unreadable entry is delivered.

A broker that finds an entry it cannot read (written by something else, or
corrupted) must not fail the fetch, nor leave the entry to be leased again
forever: it hands it out as a *malformed* delivery, with a stand-in message
made of whatever could be kept (the raw payload above all) and the reason.
The runtime dead-letters it at once, with that reason, and acknowledges it,
so the rest of the queue flows on and nothing is lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping

from conveyor.brokers._protocol import Delivery
from conveyor.messages import Message

__all__ = ["malformed_delivery", "short_reason"]

_NAMESPACE = uuid.UUID("5d1f6b0e-5f2c-4d53-9a57-6f6e7665796f")


def short_reason(exc: BaseException) -> str:
    """One line naming what is wrong with an entry, at most 300 characters."""
    if isinstance(exc, KeyError):
        text = f"missing field {exc.args[0]!r}" if exc.args else "a field is missing"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def malformed_delivery(
    *,
    topic: str,
    group: str,
    receipt: str,
    reason: str,
    where: str,
    id: object = None,
    payload: object = None,
    headers: object = None,
    attempt: object = 1,
) -> Delivery:
    """A delivery of an entry that cannot be read as a Conveyor message.

    ``where`` identifies the entry within the broker (say ``queue/seq``): the
    stand-in's id is derived from it when the entry has no usable id of its
    own, so every redelivery of the entry has the same id. ``payload`` is kept
    as bytes whatever its type; headers only as far as they map text to text."""
    ident = id if isinstance(id, str) and 0 < len(id) <= 200 else None
    if ident is None:
        ident = str(uuid.uuid5(_NAMESPACE, where))
    if isinstance(payload, bytes | bytearray | memoryview):
        data = bytes(payload)
    elif isinstance(payload, str):
        data = payload.encode("utf-8", "surrogatepass")
    elif payload is None:
        data = b""
    else:
        data = repr(payload).encode()
    kept = {}
    if isinstance(headers, Mapping):
        kept = {k: v for k, v in headers.items() if isinstance(k, str) and isinstance(v, str)}
    message = Message(
        topic=topic or "unknown",
        payload=data,
        id=ident,
        headers=kept,
        created_at=time.time(),
        attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1,
    )
    return Delivery(message, group, receipt, malformed=reason)
