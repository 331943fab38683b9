"""Durable orchestrated sagas: ordered steps with compensations, step
timeouts, crash recovery and an event-sourced history (docs/sagas.md)."""

from conveyor.errors import SagaConflict, SagaError, StepFailed
from conveyor.sagas._definition import LocalCall, Saga, Step
from conveyor.sagas._history import (
    ACTIVE,
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    FAILED,
    RUNNING,
    STATES,
    TERMINAL,
    SagaEvent,
    SagaRecord,
    rebuild,
)
from conveyor.sagas._orchestrator import SAGA_ID, OnChange, Sagas, saga_id_of
from conveyor.sagas._tables import list_sagas, load_events, load_saga

__all__ = [
    "ACTIVE",
    "COMPENSATED",
    "COMPENSATING",
    "COMPLETED",
    "FAILED",
    "LocalCall",
    "OnChange",
    "RUNNING",
    "SAGA_ID",
    "STATES",
    "Saga",
    "SagaConflict",
    "SagaError",
    "SagaEvent",
    "SagaRecord",
    "Sagas",
    "Step",
    "StepFailed",
    "TERMINAL",
    "list_sagas",
    "load_events",
    "load_saga",
    "rebuild",
    "saga_id_of",
]
