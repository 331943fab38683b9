"""The order system's HTTP front: place an order, answered 202 at once.

    POST /orders            {"sku": "mug", "qty": 2}  -> 202 {"id", "state": "CREATED", ...}
                            Location: /orders/{id}, Retry-After: 1
                            optional headers: Idempotency-Key, Callback-Url
    GET  /orders/{id}       -> 200 the order; Retry-After while it is not terminal
    POST /webhooks          {"url": ...} -> 201 {"id", "url", "secret": "whsec_..."}

The order row and the saga's first command commit in one transaction; the
saga then moves the order on (``services.py``). With ``Idempotency-Key`` the
order id is derived from the key, so a retried POST places one order (the
same key with another body is 422), also when two such POSTs race: both
answer 202 with the one order. ``Callback-Url`` must be a registered
endpoint: it then receives a signed ``order.<state>`` webhook on every state
change. Every error is a problem+json body. Run it with the services::

    uvicorn --factory conveyor.examples.orders.api:main
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import pydantic
from fastapi import Body, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse

from conveyor import App, Settings
from conveyor.examples.orders.demo import PRODUCTS, open_shop
from conveyor.examples.orders.services import (
    TERMINAL,
    Faults,
    create_app,
    order_view,
    place_order_in,
    webhooks_of,
)
from conveyor.http import problem_api, problem_response
from conveyor.messages import uuid7

__all__ = ["PlaceOrder", "create_api", "main"]

RETRY_AFTER = "1"


class PlaceOrder(pydantic.BaseModel):
    """An order for ``qty`` of one SKU."""

    model_config = pydantic.ConfigDict(extra="forbid")

    sku: str = pydantic.Field(min_length=1, max_length=64)
    qty: int = pydantic.Field(ge=1, le=100, strict=True)  # true, 2.0 and "2" are refused


class Registration(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    url: str = pydantic.Field(min_length=1, max_length=2048)


def _order_id(idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return f"ord-{uuid7()}"
    return "ord-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


def create_api(app: App, *, prices: dict[str, int] = PRODUCTS) -> FastAPI:
    """The HTTP front of ``app`` (an order-system app from ``create_app``);
    prices in cents per SKU."""
    api = problem_api("Conveyor order system")

    def accepted(view: dict[str, Any]) -> Response:
        location = f"/orders/{view['id']}"
        body = {"id": view["id"], "state": view["state"], "status_url": location}
        return JSONResponse(body, 202, headers={"Location": location, "Retry-After": RETRY_AFTER})

    @api.post("/orders", status_code=202)
    async def place(
        order: PlaceOrder,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
        callback_url: Annotated[str | None, Header(max_length=2048)] = None,
    ) -> Response:
        """Place an order; 202 with its id and status URL."""
        if order.sku not in prices:
            known = ", ".join(sorted(prices))
            return problem_response(
                422,
                f"unknown sku {order.sku!r}; choose one of {known}",
                errors=[{"loc": ["body", "sku"], "msg": "unknown sku"}],
            )
        order_id = _order_id(idempotency_key)
        async with app.transaction() as s:
            existing = await order_view(s, order_id)
            if existing is None:
                if callback_url:
                    webhooks = webhooks_of(app)
                    endpoint = (
                        None
                        if webhooks is None
                        else await webhooks.endpoint_for(s, owner="", url=callback_url)
                    )
                    if endpoint is None or not endpoint.enabled:
                        return problem_response(
                            422,
                            f"Callback-Url {callback_url!r} is not a registered webhook "
                            "endpoint; POST /webhooks first",
                        )
                # A concurrent request with this key may have placed it since:
                # the insert then waits for its commit and places nothing,
                # and this request answers with that order.
                await place_order_in(
                    s,
                    app,
                    order_id=order_id,
                    sku=order.sku,
                    qty=order.qty,
                    amount=prices[order.sku] * order.qty,
                    callback=callback_url or "",
                )
                existing = await order_view(s, order_id)
                assert existing is not None
            if (existing["sku"], existing["qty"]) != (order.sku, order.qty):
                return problem_response(422, "this Idempotency-Key was used for a different order")
        return accepted(existing)

    @api.get("/orders/{order_id}")
    async def status(order_id: str) -> Response:
        """The order's state; ``Retry-After`` while it can still change."""
        async with app.transaction() as s:
            view = await order_view(s, order_id)
        if view is None:
            return problem_response(404, f"no order {order_id!r}")
        headers = {} if view["state"] in TERMINAL else {"Retry-After": RETRY_AFTER}
        return JSONResponse(view, headers=headers)

    @api.post("/webhooks", status_code=201)
    async def register(registration: Annotated[Registration, Body()], request: Request) -> Response:
        """Register a callback endpoint; its signing secret is in the answer."""
        webhooks = webhooks_of(app)
        if webhooks is None:
            return problem_response(404, "webhooks are not enabled on this server")
        url = await webhooks.check(registration.url)  # DNS, outside any transaction
        async with app.transaction() as s:
            endpoint = await webhooks.register(s, owner="", url=url)
        body = {"id": endpoint.id, "url": endpoint.url, "secret": endpoint.secret}
        return JSONResponse(body, 201)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return api


def main() -> FastAPI:
    """The front with every service in this process, on ``CONVEYOR_*``
    settings (the embedded SQLite default), webhooks to public hosts only."""
    app = open_shop(create_app(settings=Settings(), faults=Faults.none(), webhook_allow=[]))

    api = create_api(app)
    api.router.lifespan_context = _with_worker(app)
    return api


def _with_worker(app: App) -> Any:
    import asyncio
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        await app.connect()
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        try:
            yield
        finally:
            worker.stop()
            await task
            await app.close()

    return lifespan
