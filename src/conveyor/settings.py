"""One settings object, from arguments, ``CONVEYOR_*`` environment variables
or a ``.env``-style file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.errors import ConfigError
from conveyor.messages import DEFAULT_MAX_PAYLOAD

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    """Runtime configuration. Durations are seconds."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="forbid", frozen=True)

    broker_url: str = "sqlite:///conveyor.db"
    store_url: str | None = pydantic.Field(
        default=None,
        description="defaults to broker_url when that is a database (SQLite, PostgreSQL)",
    )
    max_payload: int = pydantic.Field(default=DEFAULT_MAX_PAYLOAD, gt=0)
    prefetch: int = pydantic.Field(default=64, gt=0, le=10_000)
    lease: float = pydantic.Field(default=60.0, gt=0)
    grace_period: float = pydantic.Field(default=30.0, ge=0)
    idle_poll: float = pydantic.Field(default=0.5, gt=0, le=60)
    inbox_retention: float = pydantic.Field(default=7 * 24 * 3600.0, gt=0)
    shed_above: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="App.publish raises Overloaded while a topic's backlog is deeper",
    )
    log_level: str = "INFO"

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        if self.broker_url.startswith(("sqlite:", "postgresql:", "postgres:")):
            return self.broker_url
        return "sqlite:///conveyor.db"


def load_settings(env_file: str | Path | None = None, **overrides: object) -> Settings:
    """Build ``Settings``; any invalid value is one ``ConfigError`` line."""
    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if env_file is not None:
        if not Path(env_file).is_file():
            raise ConfigError(f"settings file {str(env_file)!r} does not exist")
        values["_env_file"] = str(env_file)
    try:
        return Settings(**values)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(
            f"invalid setting {where} (CONVEYOR_{where.upper()}): {err['msg']}"
        ) from None
