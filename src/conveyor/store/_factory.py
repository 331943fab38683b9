from __future__ import annotations

from urllib.parse import urlsplit

from conveyor._time import Clock
from conveyor._urls import redact
from conveyor.errors import ConfigError
from conveyor.store._protocol import Store

_SCHEMES = ("sqlite", "postgresql", "postgres")


def store_from_url(url: str, *, clock: Clock | None = None) -> Store:
    """Build the store named by ``url``; an unknown scheme is a ``ConfigError``."""
    scheme = _scheme(url, "store")
    if scheme == "sqlite":
        from conveyor._sqlite import parse_url
        from conveyor.store.sqlite import SqliteStore

        parse_url(url)
        return SqliteStore(url, clock=clock)
    if scheme in ("postgresql", "postgres"):
        from conveyor._drivers import load_backend

        store: Store = load_backend("store.postgres", "postgres").PostgresStore(url, clock=clock)
        return store
    raise ConfigError(
        f"unknown store URL scheme {scheme!r} in {redact(url)!r}; supported: {', '.join(_SCHEMES)}"
    )


def _scheme(url: str, what: str) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"invalid {what} URL {redact(url)!r}: expected scheme://..., e.g. sqlite:///conveyor.db"
        )
    try:
        return urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise ConfigError(f"invalid {what} URL {redact(url)!r}: {exc}") from None
