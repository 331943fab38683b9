"""Settings, URL selection and the public namespace."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import conveyor
from conveyor.brokers import broker_from_url
from conveyor.brokers.memory import MemoryBroker
from conveyor.brokers.sqlite import SqliteBroker
from conveyor.errors import ConfigError
from conveyor.settings import load_settings
from conveyor.store import store_from_url


@pytest.mark.parametrize(
    "module",
    [
        "conveyor",
        "conveyor.brokers",
        "conveyor.store",
        "conveyor.runtime",
        "conveyor.resilience",
        "conveyor.testing",
        "conveyor.errors",
        "conveyor.messages",
    ],
)
def test_all_is_sorted_and_matches_public_names(module: str) -> None:
    """Every public package lists exactly its public names, sorted, in __all__."""
    mod = importlib.import_module(module)
    exported = list(mod.__all__)
    assert exported == sorted(exported)
    for name in exported:
        assert hasattr(mod, name), f"{module}.{name} is in __all__ but missing"


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONVEYOR_* variables configure the settings; the store defaults to the broker file."""
    monkeypatch.setenv("CONVEYOR_BROKER_URL", "sqlite:///env.db")
    monkeypatch.setenv("CONVEYOR_PREFETCH", "7")
    settings = load_settings()
    assert settings.prefetch == 7
    assert settings.resolved_store_url == "sqlite:///env.db"


def test_settings_from_file(tmp_path: Path) -> None:
    """An env file is read; a missing one is a ConfigError."""
    env = tmp_path / "conveyor.env"
    env.write_text("CONVEYOR_LEASE=12.5\n")
    assert load_settings(env).lease == 12.5
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.env")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"prefetch": 0}, "CONVEYOR_PREFETCH"),
        ({"lease": "soon"}, "CONVEYOR_LEASE"),
        ({"brokr_url": "x"}, "CONVEYOR_BROKR_URL"),
    ],
)
def test_bad_settings_are_one_config_error(overrides: dict[str, object], needle: str) -> None:
    """An invalid or unknown setting is one ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=needle) as info:
        load_settings(**overrides)
    assert "\n" not in str(info.value)


def test_urls_choose_implementations() -> None:
    """Broker and store are chosen by URL scheme."""
    assert isinstance(broker_from_url("memory://"), MemoryBroker)
    assert isinstance(broker_from_url("sqlite:///x.db"), SqliteBroker)
    assert type(store_from_url("sqlite://:memory:")).__name__ == "SqliteStore"


@pytest.mark.parametrize(
    "url",
    ["redis2://x", "nonsense", "", "sqlite://host/x.db", "sqlite:///x.db?synchronous=sometimes"],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    """Unknown schemes and malformed URLs are ConfigErrors, for brokers and stores."""
    with pytest.raises(ConfigError):
        broker_from_url(url)
    with pytest.raises(ConfigError):
        store_from_url(url)


def test_handler_registration_errors() -> None:
    """Bad handler declarations fail at import time with the handler's name."""
    app = conveyor.App("t", settings=load_settings(broker_url="memory://"))

    with pytest.raises(ConfigError, match="must be an async function"):

        @app.handler("t")
        def sync_handler(ctx: conveyor.Context) -> None:  # type: ignore[misc]
            return None

    @app.handler("t", group="g")
    async def first(ctx: conveyor.Context) -> None:
        return None

    with pytest.raises(ConfigError, match="two handlers for topic 't' in group 'g'"):

        @app.handler("t", group="g")
        async def second(ctx: conveyor.Context) -> None:
            return None

    with pytest.raises(ConfigError, match="concurrency"):
        app.handler("t", concurrency=0)


async def test_new_settings_take_effect_on_the_next_connect(tmp_path: Path) -> None:
    """Settings assigned after close() give the next connect() their broker
    and store; assigning while connected is refused."""
    first = f"sqlite:///{tmp_path / 'first.db'}"
    second = f"sqlite:///{tmp_path / 'second.db'}"
    app = conveyor.App("a", settings=conveyor.Settings(broker_url=first))
    async with app:
        await app.publish("t", {"n": 1})
        assert app.broker.url == first
        with pytest.raises(ConfigError, match="close"):
            app.settings = conveyor.Settings(broker_url=second)
    app.settings = conveyor.Settings(broker_url=second)
    async with app:
        assert (app.broker.url, app.store.url) == (second, second)
        assert sum(s.ready for s in await app.broker.stats()) == 0
    assert (tmp_path / "second.db").exists()
