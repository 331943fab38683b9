"""Import an optional driver, or stop with the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from conveyor.errors import ConfigError

__all__ = ["load_backend", "missing_extra"]


def load_backend(module: str, extra: str) -> ModuleType:
    """Import ``conveyor.<module>``, whose driver comes with ``conveyor[extra]``.

    A missing driver is a ``ConfigError`` naming the extra to install.
    """
    try:
        return importlib.import_module(f"conveyor.{module}")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("conveyor"):
            raise
        raise ConfigError(
            f"{module.replace('.', ' ')} needs the {exc.name!r} package: "
            f"pip install 'conveyor[{extra}]'"
        ) from None


def missing_extra(exc: ModuleNotFoundError, package: str, extra: str) -> ModuleNotFoundError:
    """The error to raise when importing ``package`` failed on ``exc``: one
    naming the extra that installs the missing module (``exc`` itself when
    what is missing is part of Conveyor)."""
    if exc.name is None or exc.name.startswith("conveyor"):
        return exc
    return ModuleNotFoundError(
        f"{package} needs the {exc.name!r} package: pip install 'conveyor[{extra}]'",
        name=exc.name,
    )
