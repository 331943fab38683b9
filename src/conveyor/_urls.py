"""Server URLs: their query options, read from one declarative table per
backend, and secrets hidden before a URL reaches a log line, an error or
the CLI.

Every backend declares what its URL accepts as a table of ``Option``s and
reads it with ``url_options``: an unknown option, an option given twice or
a value out of range is one ``ConfigError`` line in one wording for every
backend ("invalid prefetch='0' in RabbitMQ URL '...': expected an integer
from 1 to 65535"), with the password hidden.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from conveyor.errors import ConfigError

__all__ = ["Option", "redact", "url_options"]

# user:password@ in the authority (also before the first of several hosts).
_USERINFO = re.compile(r"(?P<head>://[^/@?#]*?:)[^/@?#]*@")
# Secrets passed as query parameters.
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|secret|token|sasl_password)=)[^&#]*", re.I)


def redact(url: object) -> str:
    """``url`` with every password replaced by ``***`` (user names stay)."""
    return _QUERY.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>***@", str(url)))


@dataclass(frozen=True, slots=True)
class Option:
    """One URL query option: its default and what a valid value is.

    ``kind`` is ``int``, ``float`` (seconds) or ``str``. Numbers are checked
    against ``low`` (inclusive), ``above`` (exclusive) and ``high``
    (inclusive); text against ``choices`` or a ``pattern`` it must match in
    full, described by ``expect`` in the error."""

    default: Any = None
    kind: type[int] | type[float] | type[str] = str
    low: float | None = None
    above: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    expect: str = ""

    def read(self, raw: str) -> Any:
        """``raw`` as this option's value; ``ValueError`` saying what is expected."""
        if self.kind is str:
            if self.choices and raw not in self.choices:
                raise ValueError(self.expect or f"one of {', '.join(self.choices)}")
            if self.pattern is not None and not self.pattern.fullmatch(raw):
                raise ValueError(self.expect or f"a value matching {self.pattern.pattern}")
            return raw
        value: float | None
        try:
            value = self.kind(raw)  # type: ignore[assignment]  # int or float here
        except ValueError:
            value = None
        if (
            value is None
            or not math.isfinite(value)
            or (self.low is not None and value < self.low)
            or (self.above is not None and value <= self.above)
            or (self.high is not None and value > self.high)
        ):
            raise ValueError(self.expect or self._range())
        return value

    def _range(self) -> str:
        what = "an integer" if self.kind is int else "seconds"
        if self.low is not None and self.high is not None:
            return f"{what} from {self.low:g} to {self.high:g}"
        bounds = []
        if self.low is not None:
            bounds.append(f">= {self.low:g}")
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:g}")
        return " ".join([what, *bounds])


def url_options(query: str, table: Mapping[str, Option], *, url: str, what: str) -> dict[str, Any]:
    """Every option of ``table`` read from ``query`` (a URL's query string),
    its default where not given. ``what`` names the backend in errors
    ("RabbitMQ"); ``url`` is shown with its secrets hidden."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"invalid {what} URL {redact(url)!r}: malformed query") from None
    given: dict[str, str] = {}
    for name, raw in pairs:
        if name not in table:
            raise ConfigError(
                f"unknown option {name!r} in {what} URL {redact(url)!r}; known: {', '.join(table)}"
            )
        if name in given:
            raise ConfigError(f"option {name!r} given twice in {what} URL {redact(url)!r}")
        given[name] = raw
    values: dict[str, Any] = {}
    for name, option in table.items():
        text = given.get(name)
        if text is None:
            values[name] = option.default
            continue
        try:
            values[name] = option.read(text)
        except ValueError as exc:
            raise ConfigError(
                f"invalid {name}={text!r} in {what} URL {redact(url)!r}: expected {exc}"
            ) from None
    return values
