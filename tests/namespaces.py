"""Delete what a test namespace (``?namespace=`` in a broker or store URL)
created on a shared server, and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from urllib.parse import parse_qsl, urlsplit

from tests.postgres import drop_namespace_async
from tests.rabbitmq_admin import drop_namespaces

__all__ = ["drop_all"]


def _namespace(url: str) -> str | None:
    return dict(parse_qsl(urlsplit(url).query)).get("namespace")


async def _drop_redis(url: str, namespace: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url.partition("?")[0])
    try:
        keys = [k async for k in client.scan_iter(match=f"conveyor:{{{namespace}}}:*", count=500)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def _drop_nats(url: str, namespace: str) -> None:
    import nats
    from nats.js.errors import NotFoundError

    client = await nats.connect(url.partition("?")[0])
    try:
        js = client.jetstream()
        for stream in (f"conveyor_{namespace}", f"conveyor_{namespace}_dead"):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(stream)
    finally:
        await client.close()


async def drop_all(urls: Collection[str]) -> None:
    """Drop every namespace in ``urls`` (PostgreSQL schemas, RabbitMQ queues and
    exchanges, Redis keys, NATS streams). Kafka's test broker keeps its topics
    in memory and goes with the test process; file URLs need nothing."""
    amqp: list[str] = []
    for url in urls:
        namespace = _namespace(url)
        if not namespace:
            continue
        scheme = urlsplit(url).scheme
        if scheme in ("postgresql", "postgres"):
            await drop_namespace_async(url)
        elif scheme == "amqp":
            amqp.append(namespace)
        elif scheme == "redis":
            await _drop_redis(url, namespace)
        elif scheme == "nats":
            await _drop_nats(url, namespace)
    await drop_namespaces(amqp)
