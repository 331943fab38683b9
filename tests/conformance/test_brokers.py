"""Every broker passes the same checks from ``conveyor.testing.conformance``;
the implementations are listed in ``conftest.py``."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

from conveyor.brokers import broker_from_url
from conveyor.brokers.memory import MemoryBroker
from conveyor.errors import ConfigError
from conveyor.store import store_from_url
from conveyor.testing import (
    BROKER_CHECKS,
    BrokerFactory,
    StoreFactory,
    UrlBrokerFactory,
    UrlStoreFactory,
    check_ack_is_final,
    check_bad_input,
    check_competing_consumers,
    check_dead_letter_after_max_attempts,
    check_delayed_retry,
    check_durable_across_kill,
    check_fan_out,
    check_malformed_entries,
    check_parked_until_first_group,
    check_per_key_order,
    check_priorities,
    check_redelivery_after_lease,
    check_round_trip,
    check_stats,
    check_wait_wakes_on_publish,
    required_capabilities,
    supported,
)
from tests.conformance.conftest import BROKERS
from tests.conformance.malformed import INJECTORS


async def test_round_trip(broker_factory: BrokerFactory) -> None:
    """A fetched message is the published one: id, topic, type, key, headers, payload."""
    await check_round_trip(broker_factory)


async def test_fan_out(broker_factory: BrokerFactory) -> None:
    """Every group of a topic gets every message, and acks in one group leave the rest."""
    await check_fan_out(broker_factory)


async def test_competing_consumers(broker_factory: BrokerFactory) -> None:
    """Within a group each message goes to exactly one of two consumers, and both get some."""
    await check_competing_consumers(broker_factory)


async def test_ack_is_final(broker_factory: BrokerFactory) -> None:
    """An acked message never comes back, even after its lease would have expired."""
    await check_ack_is_final(broker_factory)


async def test_delayed_retry(broker_factory: BrokerFactory) -> None:
    """A nack with a delay is not fetchable before the delay and is fetchable after it."""
    await check_delayed_retry(broker_factory)


async def test_redelivery_after_lease(broker_factory: BrokerFactory) -> None:
    """A message whose consumer died unacked comes back after the lease, attempt + 1."""
    await check_redelivery_after_lease(broker_factory)


@pytest.mark.requires("per_key_ordering")
async def test_per_key_order(broker_factory: BrokerFactory) -> None:
    """One key's messages are delivered in publish order, one at a time, across consumers."""
    await check_per_key_order(broker_factory)


@pytest.mark.requires("priorities")
async def test_priorities(broker_factory: BrokerFactory) -> None:
    """Among ready messages the highest priority goes first, then the oldest."""
    await check_priorities(broker_factory)


async def test_parked_until_first_group(broker_factory: BrokerFactory) -> None:
    """Messages published before any group exists go to the first group declared."""
    await check_parked_until_first_group(broker_factory)


async def test_stats(broker_factory: BrokerFactory) -> None:
    """stats() counts ready, in-flight and delayed messages per (topic, group)."""
    await check_stats(broker_factory)


async def test_bad_input(broker_factory: BrokerFactory) -> None:
    """Malformed messages raise MessageError; over max_payload raises PayloadTooLarge."""
    await check_bad_input(broker_factory)


async def test_wait_wakes_on_publish(broker_factory: BrokerFactory) -> None:
    """wait() returns soon after another client publishes, not at its timeout."""
    await check_wait_wakes_on_publish(broker_factory)


@pytest.mark.requires("durable")
async def test_durable_across_kill(broker_factory: BrokerFactory) -> None:
    """Messages a process published survive its SIGKILL right after publish returns."""
    await check_durable_across_kill(broker_factory)


async def test_dead_letter_after_max_attempts(
    broker_factory: BrokerFactory, runtime_store: StoreFactory
) -> None:
    """A worker dead-letters an always-failing message once, after 3 attempts, with details."""
    await check_dead_letter_after_max_attempts(broker_factory, runtime_store)


async def test_a_capability_check_refuses_a_broker_without_it() -> None:
    """A check for a capability a broker does not declare fails loudly, never passes."""
    assert not supported(check_durable_across_kill, MemoryBroker.capabilities)
    with pytest.raises(AssertionError, match="durable"):
        await check_durable_across_kill(UrlBrokerFactory("memory://conformance-not-durable"))


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("bogus://localhost/x", "unknown broker URL scheme 'bogus'"),
        ("not a url", "expected scheme://"),
        ("", "expected scheme://"),
        ("sqlite:conveyor.db", "expected scheme://"),
        ("sqlite://host/x.db", "sqlite:///relative.db"),
        ("sqlite:///", "no file path"),
        ("sqlite://[::1/x.db", "[::1"),
        ("redis://[::1:6379", "[::1"),
    ],
)
def test_bad_urls_are_one_readable_config_error(url: str, needle: str) -> None:
    """An unknown scheme or a malformed URL is a one-line ConfigError that names it."""
    for build in (broker_from_url, store_from_url):
        with pytest.raises(ConfigError) as info:
            build(url)
        message = str(info.value)
        assert needle.replace("broker", build.__name__.split("_")[0]) in message
        assert "\n" not in message


@pytest.mark.parametrize("option", ["bogus=1", "synchronous=sometimes"])
def test_sqlite_url_options_are_checked(tmp_path: Path, option: str) -> None:
    """A SQLite URL with an unknown option or value is a ConfigError naming it."""
    url = f"sqlite:///{tmp_path / 'x.db'}?{option}"
    for build in (broker_from_url, store_from_url):
        with pytest.raises(ConfigError, match=option.split("=")[-1 if "sync" in option else 0]):
            build(url)


def test_every_broker_check_runs_with_its_capabilities() -> None:
    """Each broker check has a test here, marked with exactly the capabilities it needs."""
    module = sys.modules[__name__]
    tests = [
        f
        for name, f in vars(module).items()
        if name.startswith("test_") and "broker_factory" in inspect.signature(f).parameters
    ]
    for check in BROKER_CHECKS:
        callers = [t for t in tests if f"await {check.__name__}(" in inspect.getsource(t)]
        assert callers, f"{check.__name__} is not run by this suite"
        for test in callers:
            marks = getattr(test, "pytestmark", [])
            declared = {f for m in marks if m.name == "requires" for f in m.args}
            assert declared == required_capabilities(check), (
                f"{test.__name__} must be marked requires{tuple(required_capabilities(check))}"
            )


@pytest.mark.parametrize("backend", sorted(INJECTORS))
async def test_malformed_entries_are_dead_lettered_and_the_queue_flows(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Raw entries no Conveyor client wrote, each unreadable in its own way,
    end up as dead letters with their reason; 20 good messages around them
    are all handled. SQL brokers run the bound path (store on the same
    database), the others a SQLite store."""
    url = BROKERS[backend](tmp_path)
    request.getfixturevalue("_namespaces").append(url)
    store = UrlStoreFactory(url) if url.startswith(("sqlite:", "postgresql:")) else None
    await check_malformed_entries(UrlBrokerFactory(url), INJECTORS[backend], store)
