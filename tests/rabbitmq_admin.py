"""Housekeeping on the shared RabbitMQ node for the tests: delete what one
test namespace created (and nothing else), close one client's connection
from the server side.

``rabbitmqctl`` lists names (the management plugin is not enabled); the
deleting is done over AMQP.
"""

from __future__ import annotations

import subprocess
from collections.abc import Collection
from urllib.parse import parse_qsl, urlsplit

import aio_pika

from tests.servers import AMQP_URL

__all__ = ["close_connection_named", "drop_namespaces", "namespace_of"]


def namespace_of(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query)).get("namespace", "conveyor")


def _names(what: str) -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", what, "--no-table-headers", "name"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


async def drop_namespaces(namespaces: Collection[str]) -> int:
    """Delete every queue and exchange of ``namespaces``; how many were deleted."""
    prefixes = tuple(f"{ns}/" for ns in namespaces)
    if not prefixes:
        return 0
    queues = [n for n in _names("list_queues") if n.startswith(prefixes)]
    exchanges = [n for n in _names("list_exchanges") if n.startswith(prefixes)]
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
    finally:
        await connection.close()
    return len(queues) + len(exchanges)


def close_connection_named(name: str) -> None:
    """Have the server close the one connection whose client calls itself ``name``."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pids = [line.split()[0] for line in out.splitlines() if f'"{name}"' in line]
    assert len(pids) == 1, f"not exactly one connection named {name!r}: {out!r}"
    subprocess.run(
        ["rabbitmqctl", "-q", "close_connection", pids[0], "closed by the conveyor tests"],
        check=True,
        capture_output=True,
    )
