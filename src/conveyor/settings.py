"""One settings object, from arguments, ``CONVEYOR_*`` environment variables
or a ``.env``-style file."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

import pydantic
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor._loop import EventLoop
from conveyor.errors import ConfigError
from conveyor.messages import DEFAULT_MAX_PAYLOAD

__all__ = ["LOG_LEVELS", "Settings", "load_settings"]

PREFIX = "CONVEYOR_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_log = logging.getLogger("conveyor.settings")
_warned: set[str] = set()


class Settings(BaseSettings):
    """Runtime configuration. Durations are seconds."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid", frozen=True)

    broker_url: str = "sqlite:///conveyor.db"
    store_url: str | None = pydantic.Field(
        default=None,
        description="defaults to broker_url when that is a database (SQLite, PostgreSQL)",
    )
    max_payload: int = pydantic.Field(default=DEFAULT_MAX_PAYLOAD, gt=0)
    prefetch: int = pydantic.Field(default=256, gt=0, le=10_000)
    lease: float = pydantic.Field(default=60.0, gt=0)
    grace_period: float = pydantic.Field(default=30.0, ge=0)
    migrate: bool = True
    """Bring the store's tables to this release's layout when an App
    connects (a locked, additive migration); off: refuse a database at an
    older or unrecorded layout, for ``conveyor migrate`` to run first."""
    idle_poll: float = pydantic.Field(default=0.5, gt=0, le=60)
    event_loop: EventLoop = pydantic.Field(
        default="asyncio",
        description="asyncio's own loop; uvloop, or auto: uvloop when installed",
    )
    """asyncio by default: uvloop measured no faster here (the time goes to
    Python per message) and raises other errors for a lost connection."""
    inbox_retention: float = pydantic.Field(default=7 * 24 * 3600.0, gt=0)
    shed_above: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="App.publish raises Overloaded while a topic's backlog is deeper",
    )
    metrics_port: int | None = pydantic.Field(
        default=None, ge=1, le=65535, description="`conveyor worker` serves /metrics here"
    )
    metrics_host: str = "127.0.0.1"
    metrics: bool = pydantic.Field(
        default=False, description="the HTTP job API serves /metrics (`conveyor serve --metrics`)"
    )
    tracing: bool = pydantic.Field(
        default=False, description="OpenTelemetry spans, exported as the OTEL_* variables say"
    )
    heartbeat_interval: float = pydantic.Field(
        default=5.0, gt=0, description="seconds between a worker's heartbeats in the store"
    )
    http_max_header_bytes: int = pydantic.Field(
        default=16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="`conveyor serve`: largest request head (line and headers); 431 beyond",
    )
    http_max_headers: int = pydantic.Field(
        default=100, ge=1, le=10_000, description="`conveyor serve`: header fields; 431 beyond"
    )
    http_request_timeout: float = pydantic.Field(
        default=30.0,
        gt=0,
        le=3600,
        description="`conveyor serve`: seconds a request's head and body may take to arrive; 408",
    )
    http_keep_alive: int = pydantic.Field(
        default=5, ge=1, le=3600, description="`conveyor serve`: seconds an idle connection is kept"
    )
    http_max_connections: int | None = pydantic.Field(
        default=1000,
        ge=1,
        description="`conveyor serve`: connections and requests at once per process; 503 beyond",
    )
    http_unauthenticated_limit: str | None = pydantic.Field(
        default="10/s",
        description="JobAPI: requests without a valid API key per client address "
        "(as '10/s'; 'off' for none); 429 beyond",
    )
    log_level: str = "INFO"
    log_format: str = pydantic.Field(
        default="text", description="text, or json: one JSON object per log record"
    )

    @pydantic.field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
        return level

    @pydantic.field_validator("http_unauthenticated_limit")
    @classmethod
    def _known_rate(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "off", "none"):
            return None
        from conveyor.resilience import parse_rate

        try:
            parse_rate(value.strip())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value.strip()

    @pydantic.field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        form = value.strip().lower()
        if form not in ("text", "json"):
            raise ValueError(f"{value!r} is not a log format; use text or json")
        return form

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        if self.broker_url.startswith(("sqlite:", "postgresql:", "postgres:")):
            return self.broker_url
        return "sqlite:///conveyor.db"

    @property
    def implicit_local_store(self) -> bool:
        """A server broker whose store nobody chose: the local ``conveyor.db``."""
        return not self.store_url and self.resolved_store_url != self.broker_url


def _closest(name: str) -> str:
    fields = [f"{PREFIX}{f.upper()}" for f in Settings.model_fields]
    match = difflib.get_close_matches(name.upper(), fields, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _warn_unknown_environment() -> None:
    """Log, once per name, every ``CONVEYOR_*`` variable that is no setting:
    most likely a typo, which would otherwise be silently ignored."""
    known = {f"{PREFIX}{f.upper()}" for f in Settings.model_fields}
    for name in sorted(os.environ):
        if name.upper().startswith(PREFIX) and name.upper() not in known and name not in _warned:
            _warned.add(name)
            _log.warning(
                "unknown setting %s is ignored%s",
                name,
                _closest(name),
                extra={"event": "conveyor.unknown_setting"},
            )


def load_settings(env_file: str | Path | None = None, **overrides: object) -> Settings:
    """Build ``Settings``; any invalid value is one ``ConfigError`` line.

    Arguments win over ``CONVEYOR_*`` environment variables, which win over
    ``env_file``. An unknown name in ``env_file`` is an error; an unknown
    ``CONVEYOR_*`` environment variable is logged as a warning naming the
    closest setting."""
    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if env_file is not None:
        if not Path(env_file).is_file():
            raise ConfigError(f"settings file {str(env_file)!r} does not exist")
        values["_env_file"] = str(env_file)
    _warn_unknown_environment()
    try:
        return Settings(**values)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        if err["type"] == "extra_forbidden":
            name = where.upper() if where.upper().startswith(PREFIX) else f"{PREFIX}{where.upper()}"
            origin = f" in {str(env_file)!r}" if env_file is not None else ""
            raise ConfigError(f"unknown setting {name}{origin}{_closest(name)}") from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {where} ({PREFIX}{where.upper()}): {msg}") from None
