"""Every store passes the same checks from ``conveyor.testing.conformance``;
the implementations are listed in ``conftest.py``."""

from __future__ import annotations

import inspect
import sys

from conveyor.testing import (
    STORE_CHECKS,
    StoreFactory,
    check_inbox,
    check_outbox_lease,
    check_prune_inbox,
    check_rollback,
    check_savepoint,
    check_store_dead_letters,
)


async def test_inbox(store_factory: StoreFactory) -> None:
    """inbox_add is True once per (group, id), then False; another group is independent."""
    await check_inbox(store_factory)


async def test_rollback(store_factory: StoreFactory) -> None:
    """A transaction that raises rolls back inbox, outbox, dead letters and user rows."""
    await check_rollback(store_factory)


async def test_savepoint(store_factory: StoreFactory) -> None:
    """A savepoint that raises undoes only its own writes; the transaction keeps the rest."""
    await check_savepoint(store_factory)


async def test_outbox_lease(store_factory: StoreFactory) -> None:
    """outbox_claim leases rows until expiry (FakeClock); outbox_done removes them."""
    await check_outbox_lease(store_factory)


async def test_dead_letters(store_factory: StoreFactory) -> None:
    """Dead letters filter by group/topic/error type/ids, replace per (group, id), delete, count."""
    await check_store_dead_letters(store_factory)


async def test_prune_inbox(store_factory: StoreFactory) -> None:
    """prune_inbox removes records older than the cut-off and only those."""
    await check_prune_inbox(store_factory)


def test_every_store_check_runs() -> None:
    """Each store check in conveyor.testing has a test here."""
    sources = [
        inspect.getsource(f)
        for name, f in vars(sys.modules[__name__]).items()
        if name.startswith("test_") and name != "test_every_store_check_runs"
    ]
    for check in STORE_CHECKS:
        assert any(f"await {check.__name__}(" in s for s in sources), f"{check.__name__} not run"
