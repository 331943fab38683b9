"""API keys: created by a function (or ``conveyor keys create NAME``), stored
hashed, checked in constant time.

A key is ``cvk_`` plus 32 random bytes (URL-safe base64) from ``secrets``.
Only its SHA-256 is stored. A fast unsalted hash is enough here, unlike for
passwords: with 256 bits of entropy no dictionary or brute-force search can
find a key from its hash, and a fast hash keeps the check cheap on every
request. The hash is looked up by its index, then compared with
``hmac.compare_digest`` so the final comparison leaks no timing.

A key carries scopes: ``jobs`` (the job API and its webhooks),
``admin:read`` (the operations console's reads) and ``admin:write`` (its
replays and purges; it implies ``admin:read``). Keys made before scopes
existed keep ``jobs``: the column is added to an older table, under the
store's DDL lock, with that default.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from conveyor._time import Clock, SystemClock
from conveyor.errors import ConfigError
from conveyor.http.sql_jobs import read_rows
from conveyor.runtime import App

__all__ = ["ADMIN_READ", "ADMIN_WRITE", "JOBS", "SCOPES", "ApiKey", "ApiKeys", "create_api_key"]

JOBS = "jobs"
ADMIN_READ = "admin:read"
ADMIN_WRITE = "admin:write"
SCOPES = (JOBS, ADMIN_READ, ADMIN_WRITE)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conveyor_api_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    scopes TEXT NOT NULL DEFAULT 'jobs'
)
"""

PREFIX = "cvk_"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    """A stored key: its name (the owner of jobs and webhooks, the actor of
    admin actions), when it was made and its scopes."""

    name: str
    created_at: float
    scopes: frozenset[str] = frozenset({JOBS})

    def allows(self, scope: str) -> bool:
        """Whether the key may do what ``scope`` guards (``admin:write``
        includes ``admin:read``)."""
        return scope in self.scopes or (scope == ADMIN_READ and ADMIN_WRITE in self.scopes)


def parse_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """``scopes`` checked; an unknown one is a ``ConfigError``, none at all means ``jobs``."""
    out = set()
    for scope in scopes:
        value = scope.strip().lower()
        if value not in SCOPES:
            raise ConfigError(f"unknown API key scope {scope!r}; use {', '.join(SCOPES)}")
        out.add(value)
    return frozenset(out or {JOBS})


def _scopes_of(text: object) -> frozenset[str]:
    return frozenset(s for s in str(text or JOBS).split() if s in SCOPES)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeys:
    """The API keys of an App, in its store (table ``conveyor_api_keys``)."""

    def __init__(self, app: App, *, clock: Clock | None = None) -> None:
        self.app = app
        self.clock: Clock = clock or SystemClock()
        self._ready = False

    async def ensure(self) -> None:
        """Connect the App and create the table (once per instance)."""
        if self._ready:
            return
        await self.app.connect()
        # A table from before scopes got its column when the App connected
        # (conveyor.store._schema, layout 2).
        async with self.app.store.transaction() as tx:
            await tx.execute(_SCHEMA)
        self._ready = True

    async def create(self, name: str, *, scopes: Iterable[str] = (JOBS,)) -> str:
        """Create a key named ``name`` with ``scopes`` (default ``jobs``);
        returns the secret (shown only once)."""
        if not name or len(name) > 200:
            raise ConfigError(f"API key name {name!r} must be 1 to 200 characters")
        granted = " ".join(sorted(parse_scopes(scopes)))
        secret = PREFIX + secrets.token_urlsafe(32)
        await self.ensure()
        async with self.app.store.transaction() as tx:
            row = await tx.fetchone("SELECT 1 FROM conveyor_api_keys WHERE name = ?", (name,))
            if row is not None:
                raise ConfigError(f"an API key named {name!r} exists; revoke it or pick another")
            await tx.execute(
                "INSERT INTO conveyor_api_keys (name, key_hash, created_at, scopes) "
                "VALUES (?, ?, ?, ?)",
                (name, _digest(secret), self.clock.time(), granted),
            )
        return secret

    async def revoke(self, name: str) -> bool:
        """Delete the key named ``name``; False if there was none."""
        await self.ensure()
        async with self.app.store.transaction() as tx:
            return (await tx.execute("DELETE FROM conveyor_api_keys WHERE name = ?", (name,))) > 0

    async def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, or None."""
        await self.ensure()
        digest = _digest(secret)
        rows = await read_rows(
            self.app.store,
            "SELECT name, key_hash, created_at, scopes FROM conveyor_api_keys WHERE key_hash = ?",
            (digest,),
        )
        if not rows or not hmac.compare_digest(rows[0][1], digest):
            return None
        return ApiKey(name=rows[0][0], created_at=rows[0][2], scopes=_scopes_of(rows[0][3]))

    async def any(self) -> bool:
        """Whether at least one key exists."""
        await self.ensure()
        return bool(await read_rows(self.app.store, "SELECT 1 FROM conveyor_api_keys LIMIT 1"))

    async def list(self) -> list[ApiKey]:
        await self.ensure()
        rows = await read_rows(
            self.app.store,
            "SELECT name, created_at, scopes FROM conveyor_api_keys ORDER BY name",
        )
        return [ApiKey(name=r[0], created_at=r[1], scopes=_scopes_of(r[2])) for r in rows]


async def create_api_key(app: App, name: str, *, scopes: Iterable[str] = (JOBS,)) -> str:
    """Create an API key named ``name`` (with ``scopes``) in ``app``'s store;
    returns the secret."""
    return await ApiKeys(app).create(name, scopes=scopes)
