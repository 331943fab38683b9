"""Redis plumbing shared by the Redis broker, the Redis job store and the
job API's shared rate limit: one URL syntax (see ``conveyor.brokers.redis``)."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis

from conveyor._tls import TlsFiles, tls_files, tls_options
from conveyor._urls import Option, redact, url_options
from conveyor.errors import ConfigError

__all__ = ["RedisConfig", "redact"]

_OPTIONS = {
    "namespace": Option(
        "default",
        pattern=re.compile(r"[A-Za-z0-9_.-]{1,100}"),
        expect="1-100 letters, digits, '_', '.' or '-'",
    ),
    "password": Option(None),
    "socket_timeout": Option(5.0, float, above=0),
    "connect_timeout": Option(5.0, float, above=0),
    "retry_for": Option(30.0, float, above=0),
    **tls_options(),
}


class RedisConfig:
    """A parsed ``redis[s]://[[user]:password@]host[:port][/db][?options]``
    URL; any invalid part is one ``ConfigError`` naming it (the password
    hidden)."""

    __slots__ = (
        "connect_timeout",
        "db",
        "host",
        "namespace",
        "password",
        "port",
        "retry_for",
        "socket_timeout",
        "ssl",
        "tls",
        "username",
    )

    def __init__(self, url: str) -> None:
        safe = redact(url)
        try:
            parts = urlsplit(url)
            port = parts.port or 6379
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {safe!r}: {exc}") from None
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(f"not a Redis URL: {safe!r} (expected redis://host:port/db)")
        if not parts.hostname:
            raise ConfigError(f"invalid Redis URL {safe!r}: no host (redis://127.0.0.1:6379/0)")
        path = parts.path.strip("/") or "0"
        if not path.isdigit():
            raise ConfigError(f"invalid Redis URL {safe!r}: database {path!r} is not a number")
        query = url_options(parts.query, _OPTIONS, url=url, what="Redis")
        self.ssl = parts.scheme == "rediss"
        self.tls: TlsFiles = tls_files(query, url, schemes=("redis", "rediss"))
        self.host = parts.hostname
        self.port = port
        self.db = int(path)
        self.namespace = query["namespace"]
        self.username = unquote(parts.username) if parts.username else None
        password = query["password"]
        if password is None and parts.password is not None:
            password = unquote(parts.password)
        self.password = password
        self.socket_timeout = query["socket_timeout"]
        self.connect_timeout = query["connect_timeout"]
        self.retry_for = query["retry_for"]


def client(config: RedisConfig, **options: object) -> aioredis.Redis:
    """A client for ``config`` (``options`` go to ``redis.asyncio.Redis``)."""
    return aioredis.Redis(
        host=config.host,
        port=config.port,
        db=config.db,
        username=config.username,
        password=config.password,
        ssl=config.ssl,
        ssl_ca_certs=config.tls.ca,
        ssl_certfile=config.tls.cert,
        ssl_keyfile=config.tls.key,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.connect_timeout,
        **options,  # type: ignore[arg-type]
    )
