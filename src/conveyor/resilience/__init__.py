"""Resilience primitives, usable on their own; no broker imports here."""

from conveyor.resilience._retry import RetryPolicy

__all__ = ["RetryPolicy"]
