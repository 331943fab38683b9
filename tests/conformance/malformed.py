"""Injectors for ``check_malformed_entries``: raw entries written straight
into each broker with its own driver, as another program might, none of
which reads as a Conveyor message."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable

from conveyor.brokers import Broker

Injector = Callable[[Broker, str, str], Awaitable[list[str]]]

# (description, msg_id, priority, headers, payload, created_at) for SQL queues.
_SQL_ROWS: list[tuple[str, object, object, object, object, object]] = [
    ("headers are a JSON list", "bad-list", 0, "[]", b"{}", 1.0),
    ("headers are JSON null", "bad-null", 0, "null", b"{}", 1.0),
    ("headers are not JSON", "bad-text", 0, "not json {", b"{}", 1.0),
    ("a header value is a number", "bad-value", 0, '{"a": 1}', b"{}", 1.0),
    ("the id is empty", "", 0, "{}", b"{}", 1.0),
]
# Only SQLite lets a column hold another type than its declared one.
_SQLITE_ONLY: list[tuple[str, object, object, object, object, object]] = [
    ("the priority is text", "bad-priority", "high", "{}", b"{}", 1.0),
    ("the payload is TEXT, not a BLOB", "bad-payload", 0, "{}", "plain text", 1.0),
    ("created_at is text", "bad-created", 0, "{}", b"{}", "yesterday"),
]


async def sqlite(broker: Broker, topic: str, group: str) -> list[str]:
    path = broker.db.path  # type: ignore[attr-defined]
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        conn.executemany(
            "INSERT INTO conveyor_queue (grp, msg_id, topic, type, key, priority, headers, "
            "payload, created_at, attempt, visible_at) VALUES (?, ?, ?, '', NULL, ?, ?, ?, ?, 0, 0)",
            [(group, i, topic, p, h, b, c) for _, i, p, h, b, c in [*_SQL_ROWS, *_SQLITE_ONLY]],
        )
    finally:
        conn.close()
    return [d for d, *_ in [*_SQL_ROWS, *_SQLITE_ONLY]]


async def postgres(broker: Broker, topic: str, group: str) -> list[str]:
    pool = broker.db.pool  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO conveyor_queue (grp, msg_id, topic, type, key, priority, headers, "
            "payload, created_at, attempt, visible_at) VALUES ($1, $2, $3, '', NULL, $4, $5, $6, $7, 0, 0)",
            [(group, i, topic, p, h, b, c) for _, i, p, h, b, c in _SQL_ROWS],
        )
    return [d for d, *_ in _SQL_ROWS]


def _stream_fields(**changes: bytes | None) -> dict[str, bytes]:
    fields = {
        "id": str(uuid.uuid4()).encode(),
        "topic": b"",
        "type": b"",
        "headers": b"{}",
        "payload": b'{"raw": true}',
        "created_at": repr(time.time()).encode(),
        "priority": b"0",
        "attempt": b"0",
    }
    for name, value in changes.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    return fields


async def redis(broker: Broker, topic: str, group: str) -> list[str]:
    client = broker._redis  # type: ignore[attr-defined]
    stream = broker._queue(topic, group).stream  # type: ignore[attr-defined]
    entries = {
        "no headers field": _stream_fields(headers=None),
        "no id field": _stream_fields(id=None),
        "no payload field": _stream_fields(payload=None),
        "headers are a JSON list": _stream_fields(headers=b"[1, 2]"),
        "headers are not JSON": _stream_fields(headers=b"{nope"),
        "created_at is not a number": _stream_fields(created_at=b"monday"),
        "the id is not UTF-8": _stream_fields(id=b"\xff\xfe\xfd"),
        "attempt is not an integer": _stream_fields(attempt=b"one"),
    }
    for fields in entries.values():
        await client.xadd(stream, {**fields, "topic": topic.encode()})
    return list(entries)


def _envelope(**changes: object) -> bytes:
    env: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "topic": "",
        "type": "",
        "key": None,
        "headers": {},
        "priority": 0,
        "created_at": time.time(),
        "not_before": None,
    }
    for name, value in changes.items():
        if value is _MISSING:
            del env[name]
        else:
            env[name] = value
    return json.dumps(env).encode()


_MISSING = object()


async def nats(broker: Broker, topic: str, group: str) -> list[str]:
    js = broker._client.jetstream()  # type: ignore[attr-defined]
    subject = f"{broker._prefix}.{topic}.all"  # type: ignore[attr-defined]
    entries: dict[str, dict[str, str]] = {
        "no envelope header": {},
        "the envelope is not JSON": {"Conveyor-Envelope": "{nope"},
        "the envelope is a JSON list": {"Conveyor-Envelope": "[]"},
        "the envelope has no id": {"Conveyor-Envelope": _envelope(id=_MISSING).decode()},
        "created_at is text": {"Conveyor-Envelope": _envelope(created_at="monday").decode()},
    }
    for headers in entries.values():
        await js.publish(
            subject, b'{"raw": true}', headers={**headers, "Nats-Msg-Id": str(uuid.uuid4())}
        )
    return list(entries)


async def kafka(broker: Broker, topic: str, group: str) -> list[str]:
    producer = broker._producer  # type: ignore[attr-defined]
    name = broker._main(topic)  # type: ignore[attr-defined]
    entries = {
        "the envelope is not JSON": b"{nope",
        "the envelope is a JSON list": b"[]",
        "the envelope has no id": _envelope(id=_MISSING, attempt=0),
        "priority is text": _envelope(priority="high", attempt=0),
    }
    for raw in entries.values():
        await producer.send_and_wait(name, b'{"raw": true}', headers=[("conveyor", raw)])
    return list(entries)


async def rabbitmq(broker: Broker, topic: str, group: str) -> list[str]:
    import aio_pika

    connection = await broker._connected()  # type: ignore[attr-defined]
    queue = broker._queue(topic, group)  # type: ignore[attr-defined]
    entries: dict[str, dict[str, object]] = {
        "the conveyor header is text, not a table": {"conveyor": "oops"},
        "attempts is not a number": {"conveyor": {"attempts": "one"}},
        "created_at is not a number": {"conveyor": {"created_at": "monday"}},
        "not_before is not a number": {"conveyor": {"not_before": "later"}},
    }
    channel = await connection.channel()
    try:
        for headers in entries.values():
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"raw": true}', headers=headers, message_id=str(uuid.uuid4())),
                routing_key=queue,
            )
    finally:
        await channel.close()
    return list(entries)


INJECTORS: dict[str, Injector] = {
    "rabbitmq": rabbitmq,
    "rabbitmq-classic": rabbitmq,
    "sqlite": sqlite,
    "postgres": postgres,
    "redis": redis,
    "nats": nats,
    "kafka": kafka,
}
