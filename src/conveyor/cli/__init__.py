"""The ``conveyor`` command line."""

from conveyor.cli._main import app, main

__all__ = ["app", "main"]
