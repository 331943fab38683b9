"""The short, bounded form of the chaos suite (``python -m tests.chaos`` runs
the long one): 25 seconds of faults under load per configuration, then every
invariant. The seed is printed; a failing run is reproduced with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor import Settings
from conveyor.examples.orders.demo import open_shop
from conveyor.examples.orders.services import Faults, create_app, place_order_in
from tests.chaos._run import CONFIGS, check, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_fault_loses_or_doubles_anything(config: str) -> None:
    seed = int(os.environ["CHAOS_SEED"]) if "CHAOS_SEED" in os.environ else None
    report = run(config, seconds=25, seed=seed, max_orders=400, min_faults=10)
    print(report.text())
    assert sum(report.faults.values()) >= 10, report.text()
    assert report.accepted > 0, report.text()
    assert report.ok, report.text()


async def test_the_checker_reports_a_lost_and_a_stuck_order(tmp_path: Path) -> None:
    """The invariants are not vacuous: an accepted order that was never
    stored and a stored one that never finished are both violations."""
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    app = open_shop(
        create_app(
            settings=Settings(broker_url=url, store_url=url), faults=Faults.none(), services=()
        ),
        5,
    )
    async with app:
        async with app.transaction() as s:
            await place_order_in(s, app, order_id="o-stuck", sku="book", qty=1, amount=1800)
        results = {name: held for name, held, _ in await check(app, {"k1": "o-lost"})}
    assert results["every order terminal"] is False
    assert results["accepted orders == stored orders"] is False
    assert results["one order per Idempotency-Key"] is True
