"""The reference order system: order, inventory, payment and shipping services
driven by an orchestrated saga, with fault injection and invariant checks."""

from conveyor.examples.orders.services import (
    INVARIANTS,
    SERVICES,
    STATES,
    Faults,
    OrderEvent,
    check_invariants,
    create_app,
    create_schema,
    place_order,
)

__all__ = [
    "Faults",
    "INVARIANTS",
    "OrderEvent",
    "SERVICES",
    "STATES",
    "check_invariants",
    "create_app",
    "create_schema",
    "place_order",
]
