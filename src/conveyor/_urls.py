"""Hide secrets in URLs before they reach a log line, an error or the CLI."""

from __future__ import annotations

import re

__all__ = ["redact"]

# user:password@ in the authority (also before the first of several hosts).
_USERINFO = re.compile(r"(?P<head>://[^/@?#]*?:)[^/@?#]*@")
# Secrets passed as query parameters.
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|secret|token|sasl_password)=)[^&#]*", re.I)


def redact(url: object) -> str:
    """``url`` with every password replaced by ``***`` (user names stay)."""
    return _QUERY.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>***@", str(url)))
