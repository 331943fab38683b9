from __future__ import annotations

from conveyor._drivers import load_backend
from conveyor._time import Clock
from conveyor._urls import redact
from conveyor.brokers._protocol import Broker
from conveyor.errors import ConfigError
from conveyor.store._factory import _scheme

# scheme -> (module under conveyor.brokers, class, extra that brings its driver)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "redis": ("redis", "RedisBroker", "redis"),
    "rediss": ("redis", "RedisBroker", "redis"),
    "amqp": ("rabbitmq", "RabbitMQBroker", "rabbitmq"),
    "amqps": ("rabbitmq", "RabbitMQBroker", "rabbitmq"),
    "nats": ("nats", "NatsBroker", "nats"),
    "tls": ("nats", "NatsBroker", "nats"),
    "kafka": ("kafka", "KafkaBroker", "kafka"),
    "postgresql": ("postgres", "PostgresBroker", "postgres"),
    "postgres": ("postgres", "PostgresBroker", "postgres"),
}
_SCHEMES = ("memory", "sqlite", *_BACKENDS)


def broker_from_url(url: str, *, clock: Clock | None = None) -> Broker:
    """Build the broker named by ``url``; an unknown scheme is a ``ConfigError``.

    Building does not connect; ``connect()`` does.
    """
    scheme = _scheme(url, "broker")
    if scheme == "memory":
        from conveyor.brokers.memory import MemoryBroker

        return MemoryBroker(url, clock=clock)
    if scheme == "sqlite":
        from conveyor._sqlite import parse_url
        from conveyor.brokers.sqlite import SqliteBroker

        parse_url(url)
        return SqliteBroker(url, clock=clock)
    if scheme in _BACKENDS:
        module, name, extra = _BACKENDS[scheme]
        broker: Broker = getattr(load_backend(f"brokers.{module}", extra), name)(url, clock=clock)
        return broker
    raise ConfigError(
        f"unknown broker URL scheme {scheme!r} in {redact(url)!r}; supported: {', '.join(_SCHEMES)}"
    )
