"""Brokers: one module per backend, chosen by URL with ``broker_from_url``.

``memory://`` (tests) and ``sqlite:///path.db`` (the embedded default) are
built in; the others need their extra (``pip install 'conveyor[redis]'``).
"""

from conveyor.brokers._factory import broker_from_url
from conveyor.brokers._protocol import (
    Broker,
    BrokerBinding,
    Capabilities,
    DeadLetterSink,
    Delivery,
    QueueStats,
    TransactionalBroker,
)

__all__ = [
    "Broker",
    "BrokerBinding",
    "Capabilities",
    "DeadLetterSink",
    "Delivery",
    "QueueStats",
    "TransactionalBroker",
    "broker_from_url",
]
