"""The admin API over 100,000 dead letters (SQLite): cursor pages read each
once with bounded memory, groups count them all, a bulk action is bounded."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import httpx
import pytest

from conveyor import App, Settings
from conveyor._rows import message_params
from conveyor._sqlite import MESSAGE_COLUMNS
from conveyor.http import AdminAPI, Console
from conveyor.messages import Message

TOTAL = 100_000
ERRORS = ("ProviderTimeout", "Declined", "KeyError")


async def seed(app: App, total: int) -> None:
    """``total`` dead letters for group ``payer``, three causes in turn."""
    await app.connect()
    rows = []
    for n in range(total):
        error = ERRORS[n % 3]
        message = Message.create("pay", {"n": n}, headers={"correlation-id": f"order-{n}"})
        traceback = (
            "Traceback (most recent call last):\n"
            f'  File "/srv/shop/pay.py", line {10 + n % 3}, in charge\n'
            f"    raise {error}()\n{error}: failed for order {n}\n"
        )
        rows.append(("payer", *message_params(message), 3, f"{error}: n={n}", error, traceback, n))
    async with app.store.transaction() as tx:
        await tx.executemany(
            f"INSERT INTO conveyor_dead (grp, {MESSAGE_COLUMNS}, attempts, reason, error_type, "
            "traceback, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


@pytest.mark.slow
async def test_a_hundred_thousand_dead_letters(tmp_path: Path) -> None:
    """Every dead letter is paged through once, in order, the pages' memory
    bounded; three groups hold them all; a replay of all acts on max_bulk."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    app = App("big", settings=Settings(broker_url=url, store_url=url))

    @app.handler("pay", group="payer")
    async def pay(ctx: object, body: dict[str, int]) -> None:
        """Declares the queue the replay goes to; never run here."""

    await seed(app, TOTAL)
    admin = AdminAPI(Console(app, max_bulk=5_000))
    transport = httpx.ASGITransport(app=admin)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as c:
            tracemalloc.start()
            seen = 0
            last = 0
            after = 0
            while True:
                page = (
                    await c.get("/admin/dead-letters", params={"limit": 500, "after": after})
                ).json()
                ids = [d["id"] for d in page["items"]]
                assert ids == sorted(ids)
                assert not ids or ids[0] > last
                seen += len(ids)
                last = ids[-1] if ids else last
                if page["next"] is None:
                    break
                after = int(page["next"])
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert seen == TOTAL
            assert peak < 64 * 1024 * 1024, f"paging held {peak / 1e6:.0f} MB at its peak"
            filtered = await c.get(
                "/admin/dead-letters", params={"error_type": "Declined", "limit": 10}
            )
            assert filtered.json()["total"] == TOTAL // 3
            groups = (await c.get("/admin/dead-letters/groups")).json()
            assert sorted(g["count"] for g in groups) == [33_333, 33_333, 33_334]
            assert {g["frame"] for g in groups} == {
                "pay.py:10 in charge",
                "pay.py:11 in charge",
                "pay.py:12 in charge",
            }
            bounded = (await c.post("/admin/dead-letters/replay", json={"all": True})).json()
            assert bounded["affected"] == 5_000
            assert bounded["remaining"] == TOTAL - 5_000
            queued = {(q["topic"], q["group"]): q for q in (await c.get("/admin/queues")).json()}
            assert queued[("pay", "payer")]["ready"] == 5_000
            assert queued[("pay", "payer")]["dead"] == TOTAL - 5_000
    finally:
        await app.close()
