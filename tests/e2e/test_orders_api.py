"""The order system's HTTP front: 202 at once, state by GET, problem bodies
for bad requests, one order per Idempotency-Key, and a signed webhook on
every state change."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor import App, Settings
from conveyor.client import verify
from conveyor.examples.orders import api as orders_api
from conveyor.examples.orders.api import create_api
from conveyor.examples.orders.demo import PRODUCTS
from conveyor.examples.orders.services import Faults, create_app, create_schema
from conveyor.testing import eventually, running
from tests.namespaces import drop_all
from tests.servers import POSTGRES_URL, namespaced
from tests.webhook_receiver import Receiver


def _app(tmp_path: Path, *, stock: int = 10, url: str | None = None) -> App:
    url = url or f"sqlite:///{tmp_path / 'orders.db'}"
    app = create_app(
        settings=Settings(broker_url=url, store_url=url, idle_poll=0.02),
        faults=Faults.none(),
        webhook_allow=["127.0.0.1/32:*"],
    )

    @app.on_connect
    async def shelves(app: App) -> None:
        await create_schema(app)
        async with app.transaction() as s:
            await s.execute(
                "INSERT INTO stock (sku, initial, available) VALUES ('mug', ?, ?) "
                "ON CONFLICT DO NOTHING",
                (stock, stock),
            )

    return app


def _client(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_api(app)), base_url="http://o"
    )


async def _state(client: httpx.AsyncClient, order_id: str) -> str:
    return str((await client.get(f"/orders/{order_id}")).json()["state"])


async def test_an_order_is_accepted_at_once_and_followed_to_delivery(tmp_path: Path) -> None:
    """POST /orders answers 202 with the id, Location and Retry-After before
    any service ran; GET follows it to DELIVERED, then without Retry-After."""
    app = _app(tmp_path)
    async with app, _client(app) as client:
        placed = await client.post("/orders", json={"sku": "mug", "qty": 2})
        assert placed.status_code == 202
        body = placed.json()
        assert body["state"] == "CREATED"
        assert placed.headers["location"] == f"/orders/{body['id']}" == body["status_url"]
        assert placed.headers["retry-after"] == "1"
        first = await client.get(f"/orders/{body['id']}")
        assert first.status_code == 200
        assert first.json()["amount"] == 2 * PRODUCTS["mug"]
        assert first.headers["retry-after"] == "1"
        async with running(app):

            async def delivered() -> bool:
                return await _state(client, body["id"]) == "DELIVERED"

            await eventually(delivered, what="order delivered")
        done = await client.get(f"/orders/{body['id']}")
        assert "retry-after" not in done.headers


async def test_bad_requests_get_problem_bodies(tmp_path: Path) -> None:
    """Invalid bodies, an unknown SKU and an unknown id are 4xx problem+json."""
    app = _app(tmp_path)
    async with app, _client(app) as client:
        for body in (
            {"sku": "mug", "qty": 0},
            {"sku": "mug"},
            {"sku": "mug", "qty": "x"},
            {"sku": "mug", "qty": True},
            {"sku": "mug", "qty": "2"},
            {"sku": "mug", "qty": 2.0},
        ):
            answer = await client.post("/orders", json=body)
            assert answer.status_code == 422, body
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["errors"]
        unknown = await client.post("/orders", json={"sku": "yacht", "qty": 1})
        assert unknown.status_code == 422
        assert "unknown sku 'yacht'" in unknown.json()["detail"]
        missing = await client.get("/orders/ord-nope")
        assert missing.status_code == 404
        assert missing.json()["status"] == 404
        wrong = await client.delete("/orders/ord-nope")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "GET"
        unregistered = await client.post(
            "/orders",
            json={"sku": "mug", "qty": 1},
            headers={"Callback-Url": "http://127.0.0.1:9/hook"},
        )
        assert unregistered.status_code == 422
        assert "not a registered webhook endpoint" in unregistered.json()["detail"]


async def test_one_order_per_idempotency_key(tmp_path: Path) -> None:
    """The same key places one order; the same key with another body is 422."""
    app = _app(tmp_path)
    async with app, _client(app) as client:
        headers = {"Idempotency-Key": "checkout-41"}
        first = await client.post("/orders", json={"sku": "mug", "qty": 1}, headers=headers)
        again = await client.post("/orders", json={"sku": "mug", "qty": 1}, headers=headers)
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = await client.post("/orders", json={"sku": "mug", "qty": 3}, headers=headers)
        assert other.status_code == 422
        async with app.transaction() as s:
            assert await s.fetchone("SELECT COUNT(*) FROM orders") == (1,)


async def test_every_state_change_is_a_signed_webhook(tmp_path: Path) -> None:
    """An order placed with a registered Callback-Url posts one signed
    webhook per state change, in order; a cancelled order's last one says why."""
    app = _app(tmp_path, stock=2)
    async with Receiver() as receiver, app, _client(app) as client:
        registered = await client.post("/webhooks", json={"url": receiver.url()})
        assert registered.status_code == 201
        secret = registered.json()["secret"]
        assert secret.startswith("whsec_")
        headers = {"Callback-Url": receiver.url()}
        ok = await client.post("/orders", json={"sku": "mug", "qty": 2}, headers=headers)
        short = await client.post("/orders", json={"sku": "mug", "qty": 1}, headers=headers)
        assert ok.status_code == short.status_code == 202
        async with running(app):
            await eventually(lambda: len(receiver.received) == 5, what="five webhooks")
        events: dict[str, list[tuple[str, str]]] = {}
        for delivery in receiver.received:
            verify(delivery.headers, delivery.body, secret)
            event = json.loads(delivery.body)
            events.setdefault(event["data"]["id"], []).append(
                (event["type"], event["data"]["reason"])
            )
        assert [t for t, _ in events[ok.json()["id"]]] == [
            "order.reserved",
            "order.paid",
            "order.shipped",
            "order.delivered",
        ]
        assert events[short.json()["id"]] == [("order.cancelled", "out of stock")]


async def test_racing_posts_with_one_key_place_one_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two POSTs with one Idempotency-Key on PostgreSQL, the second placing
    while the first has inserted and not committed: both answer 202 with
    the same order id, and there is one order."""
    url = namespaced(POSTGRES_URL)
    app = _app(tmp_path, url=url)
    place = orders_api.place_order_in
    inserted, go = asyncio.Event(), asyncio.Event()
    calls = 0

    async def gated(*args: Any, **options: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            placed = await place(*args, **options)
            inserted.set()
            await go.wait()
            return placed
        go.set()  # the first commits while this insert waits for it
        return await place(*args, **options)

    monkeypatch.setattr(orders_api, "place_order_in", gated)
    try:
        async with asyncio.timeout(60), app, _client(app) as client:
            headers = {"Idempotency-Key": "checkout-race"}
            body = {"sku": "mug", "qty": 1}
            first = asyncio.create_task(client.post("/orders", json=body, headers=headers))
            await inserted.wait()
            second = await client.post("/orders", json=body, headers=headers)
            one = await first
            assert one.status_code == 202, one.text
            assert second.status_code == 202, second.text
            assert second.json()["id"] == one.json()["id"]
            assert calls == 2
            async with app.transaction() as s:
                assert await s.fetchone("SELECT COUNT(*) FROM orders") == (1,)
    finally:
        await app.close()
        await drop_all([url])
