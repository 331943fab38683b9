"""One table of URL options per backend, read the same way everywhere."""

from __future__ import annotations

import re

import pytest

from conveyor._urls import Option, url_options
from conveyor.brokers import broker_from_url
from conveyor.errors import ConfigError

TABLE = {
    "name": Option("x", pattern=re.compile(r"[a-z]+"), expect="lower-case letters"),
    "count": Option(3, int, low=1, high=9),
    "wait": Option(1.5, float, above=0),
    "mode": Option("a", choices=("a", "b")),
    "extra": Option(None, int, low=0),
}
URL = "scheme://user:hunter2@host/db"


def read(query: str) -> dict[str, object]:
    return url_options(query, TABLE, url=f"{URL}?{query}", what="Test")


def test_defaults_fill_what_is_not_given() -> None:
    assert read("") == {"name": "x", "count": 3, "wait": 1.5, "mode": "a", "extra": None}
    assert read("count=9&wait=0.25&mode=b&extra=0&name=abc") == {
        "name": "abc",
        "count": 9,
        "wait": 0.25,
        "mode": "b",
        "extra": 0,
    }


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("bogus=1", "unknown option 'bogus' in Test URL"),
        ("count=1&count=2", "option 'count' given twice in Test URL"),
        ("count=0", "invalid count='0' in Test URL"),
        ("count=10", "expected an integer from 1 to 9"),
        ("count=two", "expected an integer from 1 to 9"),
        ("wait=0", "invalid wait='0' in Test URL"),
        ("wait=nan", "expected seconds > 0"),
        ("wait=inf", "expected seconds > 0"),
        ("mode=c", "expected one of a, b"),
        ("name=ABC", "expected lower-case letters"),
        ("name=abc1", "expected lower-case letters"),
        ("extra=-1", "expected an integer >= 0"),
        ("count", "malformed query"),
    ],
)
def test_each_bad_option_is_one_line_naming_it_without_the_password(
    query: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        read(query)
    text = str(info.value)
    assert needle in text
    assert "\n" not in text
    assert "hunter2" not in text
    assert "user:***@host" in text


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("amqp://guest:pw@127.0.0.1/?prefetch=0", "invalid prefetch='0' in RabbitMQ URL"),
        ("nats://127.0.0.1:4222?replicas=6", "invalid replicas='6' in NATS URL"),
        ("redis://127.0.0.1/0?retry_for=-1", "invalid retry_for='-1' in Redis URL"),
        ("kafka://127.0.0.1:9092?partitions=0", "invalid partitions='0' in Kafka URL"),
        ("postgresql://u:pw@127.0.0.1/db?pool_max=0", "invalid pool_max='0' in PostgreSQL URL"),
        ("sqlite:///x.db?synchronous=maybe", "invalid synchronous='maybe' in SQLite URL"),
        ("redis://127.0.0.1/0?namespace=a&namespace=b", "option 'namespace' given twice"),
    ],
)
def test_every_backend_reads_its_url_with_the_one_table_reader(url: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        broker_from_url(url)
    assert needle in str(info.value)
    assert ":pw@" not in str(info.value)
