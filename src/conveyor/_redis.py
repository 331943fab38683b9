"""Redis plumbing shared by the Redis broker, the Redis job store and the
job API's shared rate limit: one URL syntax (see ``conveyor.brokers.redis``)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis

from conveyor._tls import PYTHON, TlsFiles, tls_files
from conveyor._urls import redact
from conveyor.errors import ConfigError

__all__ = ["RedisConfig", "redact"]

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_OPTIONS = (
    "namespace",
    "password",
    "socket_timeout",
    "connect_timeout",
    "retry_for",
    *PYTHON,
)


def _option(query: dict[str, list[str]], name: str, default: float, url: str) -> float:
    raw = query.get(name, [str(default)])[-1]
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"invalid {name}={raw!r} in Redis URL {url!r}: expected seconds > 0")
    return value


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
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} in Redis URL {safe!r}; "
                f"known: {', '.join(_OPTIONS)}"
            )
        namespace = query.get("namespace", ["default"])[-1]
        if not _NAMESPACE.match(namespace):
            raise ConfigError(
                f"invalid namespace={namespace!r} in Redis URL {safe!r}: "
                "use 1-100 letters, digits, '_', '.' or '-'"
            )
        self.ssl = parts.scheme == "rediss"
        self.tls: TlsFiles = tls_files(
            {k: v[-1] for k, v in query.items()}, url, schemes=("redis", "rediss")
        )
        self.host = parts.hostname
        self.port = port
        self.db = int(path)
        self.namespace = namespace
        self.username = unquote(parts.username) if parts.username else None
        password = query.get("password", [None])[-1]
        if password is None and parts.password is not None:
            password = unquote(parts.password)
        self.password = password
        self.socket_timeout = _option(query, "socket_timeout", 5.0, safe)
        self.connect_timeout = _option(query, "connect_timeout", 5.0, safe)
        self.retry_for = _option(query, "retry_for", 30.0, safe)


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
