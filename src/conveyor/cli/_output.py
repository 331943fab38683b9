"""What the CLI prints, and how: verbatim, whole when piped.

Both consoles have Rich markup off, so text from exceptions, rows, reasons
and payloads prints exactly as it is (``conveyor[redis]`` keeps its
brackets); Conveyor's own emphasis is given as styles, never as markup.
When stdout is not a terminal, tables are as wide as their widest value and
nothing is cut short, so ``conveyor sagas list | grep COMPLETED`` works.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from rich.console import Console
from rich.text import Text

__all__ = ["console", "errors", "error_line", "fit", "styled", "when"]

# Far wider than any row: a table printed into a pipe takes its natural width.
_UNBOUNDED = 1_000_000

console = Console(
    markup=False,
    highlight=False,
    width=None if sys.stdout.isatty() else _UNBOUNDED,
)
errors = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def error_line(message: object) -> Text:
    """``error: <message>``, the message verbatim."""
    return Text.assemble(("error: ", "bold red"), str(message))


def styled(text: object, style: str = "") -> Text:
    return Text(str(text), style=style)


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters on a terminal; whole in a pipe."""
    if not console.is_terminal or len(text) <= width:
        return text
    return text[: width - 3] + "..."


def when(ts: float) -> str:
    """A timestamp for people and for sorting: ``2026-12-02 09:30:00Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
