"""The order system as separate processes, configured by the environment.

    ORDERS_SERVICES=orders,inventory conveyor worker conveyor.examples.orders.run:app
    uvicorn --factory conveyor.examples.orders.run:front

- ``app``: the services named in ``ORDERS_SERVICES`` (default: all four) on
  the ``CONVEYOR_*`` settings, with the shop's tables and shelves created on
  connect (``ORDERS_STOCK`` per SKU, default 60).
- ``front()``: the HTTP front (``POST /orders``, ``GET /orders/{id}``,
  ``POST /webhooks``) on an app that runs no service: its workers are the
  ``app`` processes. With ``CONVEYOR_TRACING`` its requests are server
  spans, in the trace of everything they cause.

``ORDERS_WEBHOOK_ALLOW`` is the SSRF allow-list of the webhooks, comma
separated (``127.0.0.1:8901``); without it only public receivers are served.
"""

from __future__ import annotations

import os
from typing import Any

from conveyor import App, Settings
from conveyor.examples.orders.demo import DEFAULT_STOCK, open_shop
from conveyor.examples.orders.services import SERVICES, Faults, create_app

__all__ = ["app", "build", "front"]


def build(services: tuple[str, ...]) -> App:
    """An app with ``services`` on the environment's settings and shop."""
    allow = [a for a in os.environ.get("ORDERS_WEBHOOK_ALLOW", "").split(",") if a]
    stock = int(os.environ.get("ORDERS_STOCK", DEFAULT_STOCK))
    built = create_app(
        settings=Settings(), faults=Faults.none(), services=services, webhook_allow=allow
    )
    return open_shop(built, stock)


app = build(tuple(s for s in os.environ.get("ORDERS_SERVICES", ",".join(SERVICES)).split(",") if s))


def front() -> Any:
    """The HTTP front, for ``uvicorn --factory``; see the module doc."""
    from conveyor.examples.orders.api import create_api

    served = build(())
    api = create_api(served)
    if served.settings.tracing:
        from conveyor.observability.tracing import Tracing, wrap_asgi

        Tracing(served)
        api.router.lifespan_context = _connected(served)
        return wrap_asgi(api)
    api.router.lifespan_context = _connected(served)
    return api


def _connected(served: App) -> Any:
    import contextlib
    from collections.abc import AsyncIterator

    @contextlib.asynccontextmanager
    async def lifespan(_api: Any) -> AsyncIterator[None]:
        async with served:
            yield

    return lifespan
