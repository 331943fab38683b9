"""Run every Python block of a Markdown page, in order, in one namespace.

    python -m tests.docs_runner PAGE.md

- Blocks fenced as ```python run one after another in one namespace and one
  event loop, as in ``python -m asyncio``: top-level ``await`` works, and
  what one block defines the next one uses.
- A block fenced as ```python title="NAME.py" is the file NAME.py the page
  asks the reader to write: it is written to the current directory (which
  is on ``sys.path``), not run; later blocks import it.
- Blocks inside an HTML comment (``<!-- ... -->``) run too, unseen by the
  reader: a page's set-up, such as a server its examples talk to.
- ``namespace=NAME`` in a block's server URLs gets a suffix of this run, so
  that runs never share server state; those namespaces are dropped from the
  servers when the page is done.

Run it in an empty directory: the page's files are created there.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import textwrap
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Block", "blocks", "main"]

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python(?P<info>[^\n]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)
_TITLE = re.compile(r'title="(?P<name>[^"]+)"')
_NAMESPACE = re.compile(r"(?<=[?&])namespace=(?P<name>[A-Za-z][A-Za-z0-9_]*)")
_URL = re.compile(r"""(?P<url>(?:redis|postgresql|postgres|amqp|nats)://[^\s"'`)]+)""")


@dataclass(frozen=True, slots=True)
class Block:
    line: int
    code: str
    title: str | None


def blocks(text: str) -> list[Block]:
    """The page's Python blocks, in order, with the line each starts on."""
    found = []
    for m in _FENCE.finditer(text):
        title = _TITLE.search(m.group("info"))
        found.append(
            Block(
                line=text.count("\n", 0, m.start()) + 2,
                code=textwrap.dedent(m.group("code")),
                title=title.group("name") if title else None,
            )
        )
    return found


def _write(name: str, code: str) -> None:
    Path(name).write_text(code)


async def _run(page: Path, found: list[Block], run_id: str) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in found:
        code = _NAMESPACE.sub(rf"namespace=\g<name>_{run_id}", block.code)
        if block.title is not None:
            _write(block.title, code)
            continue
        compiled = compile(
            code, f"{page}:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        )
        result = eval(compiled, namespace)
        if inspect.iscoroutine(result):
            await result


def _namespaced_urls(text: str) -> list[str]:
    return sorted({m.group("url") for m in _URL.finditer(text) if "namespace=" in m.group("url")})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.docs_runner PAGE.md", file=sys.stderr)
        return 2
    page = Path(args[0])
    sys.path.insert(0, str(Path.cwd()))
    run_id = uuid.uuid4().hex[:8]
    try:
        asyncio.run(_run(page, blocks(page.read_text()), run_id))
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        from tests.namespaces import drop_all

        code = "\n".join(b.code for b in blocks(page.read_text()))
        asyncio.run(
            drop_all(_namespaced_urls(_NAMESPACE.sub(rf"namespace=\g<name>_{run_id}", code)))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
