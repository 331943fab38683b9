"""The implementations the conformance suites run against.

Adding a broker is one line in ``BROKERS``: a name and the URL of a fresh
namespace for one test (a file under ``tmp_path``, a unique ``memory://``
name, or a server URL; the checks use unique topic and group names and never
flush shared state). Every test in ``test_brokers.py`` then runs against it,
except those marked ``requires(flag)`` for a capability it does not declare.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

from conveyor.brokers import Capabilities, broker_from_url
from conveyor.testing import UrlBrokerFactory, UrlStoreFactory
from tests.servers import AMQP_URL, NATS_URL, POSTGRES_URL, REDIS_URL, kafka_url, namespaced
from tests.tls import tls_nats, tls_postgres, tls_rabbitmq, tls_redis

BROKERS: dict[str, Callable[[Path], str]] = {
    "memory": lambda tmp: f"memory://conformance-{uuid.uuid4().hex}",
    "sqlite": lambda tmp: f"sqlite:///{tmp / 'broker.db'}",
    "postgres": lambda tmp: namespaced(POSTGRES_URL),
    "postgres-tls": lambda tmp: namespaced(tls_postgres().url),
    "redis": lambda tmp: namespaced(REDIS_URL),
    # TLS only, client certificate required (private servers, tests/tls.py).
    "redis-tls": lambda tmp: namespaced(tls_redis().url),
    "rabbitmq": lambda tmp: namespaced(AMQP_URL),
    "rabbitmq-tls": lambda tmp: namespaced(tls_rabbitmq().url),
    # Classic queues with priorities: the other RabbitMQ code path (basic.get).
    "rabbitmq-classic": lambda tmp: namespaced(f"{AMQP_URL}?queue_type=classic&max_priority=10"),
    "nats": lambda tmp: namespaced(NATS_URL),
    "nats-tls": lambda tmp: namespaced(tls_nats().url),
    "kafka": lambda tmp: namespaced(f"{kafka_url()}?session_timeout=3&heartbeat_interval=0.3"),
}

STORES: dict[str, Callable[[Path], str]] = {
    "sqlite": lambda tmp: f"sqlite:///{tmp / 'store.db'}",
    "postgres": lambda tmp: namespaced(POSTGRES_URL),
    "postgres-tls": lambda tmp: namespaced(tls_postgres().url),
}

# Brokers that can share a database with a store of the same URL: the unit of
# work is then one transaction.
SHARED_DATABASE = ("sqlite:", "postgresql:")

# The store the runtime checks pair with a broker that is not on a SQLite file.
RUNTIME_STORE = "sqlite"


@cache
def capabilities(name: str) -> Capabilities:
    """What broker ``name`` declares; building a broker does not connect it."""
    return broker_from_url(BROKERS[name](Path(tempfile.gettempdir()))).capabilities


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(*flags): run only against brokers whose capabilities declare every flag",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker_name" in metafunc.fixturenames:
        needs = {f for m in metafunc.definition.iter_markers("requires") for f in m.args}
        names = [n for n in BROKERS if all(getattr(capabilities(n), f) for f in needs)]
        if not names:
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: no broker declares {sorted(needs)}"
            )
        if "store_layout" in metafunc.fixturenames:
            pairs = [(n, "own-store") for n in names]
            pairs += [
                (n, "same-file")
                for n in names
                if BROKERS[n](Path(tempfile.gettempdir())).startswith(SHARED_DATABASE)
            ]
            metafunc.parametrize(
                ("broker_name", "store_layout"), pairs, ids=[f"{n}-{s}" for n, s in pairs]
            )
        else:
            metafunc.parametrize("broker_name", names)
    if "store_name" in metafunc.fixturenames:
        metafunc.parametrize("store_name", list(STORES))


@pytest.fixture(scope="session")
def _namespaces() -> Iterator[list[str]]:
    """Broker and store URLs the tests used; what their namespaces created on
    the shared servers (only that) is deleted at the end of the session."""
    used: list[str] = []
    yield used
    from tests.namespaces import drop_all

    asyncio.run(drop_all(used))


@pytest.fixture
def broker_factory(broker_name: str, tmp_path: Path, _namespaces: list[str]) -> UrlBrokerFactory:
    """Clients of one fresh namespace of broker ``broker_name``."""
    url = BROKERS[broker_name](tmp_path)
    _namespaces.append(url)
    return UrlBrokerFactory(url)


@pytest.fixture
def runtime_store(
    broker_factory: UrlBrokerFactory, store_layout: str, tmp_path: Path
) -> UrlStoreFactory:
    """The store a worker pairs with the broker: its own database, or the
    broker's (then the unit of work is one transaction)."""
    if store_layout == "same-file":
        return UrlStoreFactory(broker_factory.url)
    return UrlStoreFactory(STORES[RUNTIME_STORE](tmp_path))


@pytest.fixture
def store_factory(store_name: str, tmp_path: Path, _namespaces: list[str]) -> UrlStoreFactory:
    """Clients of one fresh namespace of store ``store_name``."""
    url = STORES[store_name](tmp_path)
    _namespaces.append(url)
    return UrlStoreFactory(url)
