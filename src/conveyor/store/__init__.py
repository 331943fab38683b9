"""Stores: the transactional state behind effectively-once processing.

Pick one by URL with ``store_from_url`` (``sqlite:///conveyor.db``).
"""

from conveyor.store._factory import store_from_url
from conveyor.store._protocol import (
    DeadLetterFilter,
    DeadLetterRecord,
    OutboxStats,
    Store,
    Transaction,
)

__all__ = [
    "DeadLetterFilter",
    "DeadLetterRecord",
    "OutboxStats",
    "Store",
    "Transaction",
    "store_from_url",
]
