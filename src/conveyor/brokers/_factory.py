from __future__ import annotations

from conveyor._time import Clock
from conveyor.brokers._protocol import Broker
from conveyor.errors import ConfigError
from conveyor.store._factory import _scheme

_SCHEMES = ("memory", "sqlite")


def broker_from_url(url: str, *, clock: Clock | None = None) -> Broker:
    """Build the broker named by ``url``; an unknown scheme is a ``ConfigError``."""
    scheme = _scheme(url, "broker")
    if scheme == "memory":
        from conveyor.brokers.memory import MemoryBroker

        return MemoryBroker(url, clock=clock)
    if scheme == "sqlite":
        from conveyor._sqlite import parse_url
        from conveyor.brokers.sqlite import SqliteBroker

        parse_url(url)
        return SqliteBroker(url, clock=clock)
    raise ConfigError(
        f"unknown broker URL scheme {scheme!r} in {url!r}; supported: {', '.join(_SCHEMES)}"
    )
