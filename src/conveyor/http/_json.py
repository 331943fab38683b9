"""JSON at the job API's edge: what a request body may hold, and the one
encoding of what the job stores keep (results, replayed responses).

Both refuse what would break a later step: a lone surrogate (``"\\ud800"``
parses, but is no Unicode text: UTF-8 responses and PostgreSQL text refuse
it), NaN and infinities (not JSON), and nesting deeper than ``MAX_DEPTH``
(serialisers give up near 250 levels, Python's recursion near 1,000).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

__all__ = ["MAX_DEPTH", "body_problem", "json_text"]

MAX_DEPTH = 64
"""The deepest nesting of objects and arrays a body or a result may have."""

# JSON reaches a lone surrogate only through a \uD800-\uDFFF escape: raw
# bytes that are no UTF-8 do not parse at all.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays more than ``limit`` levels
    (iterative: no recursion however deep it goes)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return False


def _is_text(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def body_problem(raw: bytes, data: object) -> str | None:
    """Why a request body (``raw``, parsed as ``data``) is refused, or None.
    Cheap for ordinary bodies: the full checks run only when the raw bytes
    hold enough brackets, or a surrogate escape."""
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(data, MAX_DEPTH):
        return f"the body nests objects or arrays deeper than {MAX_DEPTH} levels"
    if _SURROGATE_ESCAPE.search(raw) and not _is_text(data):
        return "the body holds a lone UTF-16 surrogate escape (such as \\ud800): not Unicode text"
    return None


def json_text(value: object) -> str:
    """``value`` as compact JSON text, non-ASCII characters as they are (a
    third of what ``\\u`` escapes take). ``ValueError`` naming the reason
    when it is not storable JSON: a type JSON has no form for, NaN or an
    infinity, a lone surrogate, nesting deeper than ``MAX_DEPTH``."""
    if _deeper_than(value, MAX_DEPTH):
        raise ValueError(f"it nests deeper than {MAX_DEPTH} levels")
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("a string in it holds a lone surrogate: not Unicode text") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return text
