"""Clean-up of the PostgreSQL namespaces (schemas) tests create."""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg

__all__ = ["drop_namespace", "drop_namespace_async"]


def _target(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return None
    namespace = parse_qs(parts.query).get("namespace", [""])[-1]
    if not namespace or namespace == "public":
        return None
    # The TLS options stay: a TLS-only server takes nothing else.
    tls = urlencode({k: v[-1] for k, v in parse_qs(parts.query).items() if k.startswith("ssl")})
    return parts._replace(scheme="postgresql", query=tls).geturl(), namespace


async def drop_namespace_async(url: str) -> None:
    """Drop the schema named by ``url``'s ``namespace=`` (nothing for other URLs)."""
    target = _target(url)
    if target is None:
        return
    dsn, namespace = target
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
    finally:
        await conn.close()


def drop_namespace(url: str) -> None:
    """``drop_namespace_async`` from synchronous code (a fixture's teardown),
    on a thread of its own so that it works whether or not a loop runs here."""
    if _target(url) is None:
        return
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(drop_namespace_async(url))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
