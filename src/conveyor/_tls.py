"""TLS files named in a server URL: checked once, before any I/O, for every
backend, and the one way a failed certificate check is reported.

Two vocabularies, each the one its users already write:

- PostgreSQL keeps libpq's: ``sslmode``, ``sslrootcert`` (the CA),
  ``sslcert`` and ``sslkey`` (a client certificate, for mutual TLS);
- the other servers take Python's ``ssl`` names, as redis-py does:
  ``ssl_ca_certs``, ``ssl_certfile`` and ``ssl_keyfile``.

A file that does not exist or cannot be read, or a key without its
certificate, is a ``ConfigError`` naming the option; a server whose
certificate the CA does not sign, or one that refuses the client's
certificate, is one error line at connect time, never retried
(``tls_failure``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor._urls import Option, redact
from conveyor.errors import ConfigError

__all__ = [
    "LIBPQ",
    "PYTHON",
    "TlsFiles",
    "readable_file",
    "tls_failure",
    "tls_files",
    "tls_options",
]

PYTHON = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
"""Option names for the CA, the client certificate and its key (redis-py's)."""
LIBPQ = ("sslrootcert", "sslcert", "sslkey")
"""The same for PostgreSQL, as libpq names them."""


def tls_options(names: tuple[str, str, str] = PYTHON) -> dict[str, Option]:
    """The URL options naming TLS files, for a backend's option table
    (``tls_files`` checks the files themselves)."""
    return {name: Option(expect="a PEM file") for name in names}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The CA and client certificate a URL names (None: not named)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __bool__(self) -> bool:
        return any((self.ca, self.cert, self.key))

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the server against ``ca`` (the
        system's CAs when None) and presents ``cert`` when named."""
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert is not None:
            context.load_cert_chain(self.cert, self.key)
        return context


def tls_files(
    options: Mapping[str, str],
    url: str,
    *,
    names: tuple[str, str, str] = PYTHON,
    schemes: tuple[str, str] | None = None,
) -> TlsFiles:
    """The files ``options`` (a URL's query, one value per name) name under
    ``names`` (CA, certificate, key), each checked to be a readable file.
    With ``schemes`` (plaintext, TLS: ``("redis", "rediss")``) they are
    refused on a URL of the plaintext scheme."""
    found: list[str | None] = []
    for name in names:
        path = options.get(name)
        if path is None:
            found.append(None)
            continue
        found.append(readable_file(name, path, url, what="a PEM file"))
    ca, cert, key = found
    if key is not None and cert is None:
        raise ConfigError(f"{names[2]} without {names[1]} in {redact(url)!r}: name both")
    tls = TlsFiles(ca, cert, key)
    if tls and schemes is not None and url.startswith(f"{schemes[0]}:"):
        plain, secure = schemes
        raise ConfigError(
            f"TLS options in {redact(url)!r} need the {secure}:// scheme ({plain}:// is plaintext)"
        )
    return tls


def readable_file(name: str, path: str, url: str, *, what: str) -> str:
    """``path``, the value of option ``name`` in ``url``, if it names a file
    this process can read; a ``ConfigError`` saying which it is not."""
    if not path:
        raise ConfigError(f"{name} is empty in {redact(url)!r}: name {what}")
    if not os.path.isfile(path):
        raise ConfigError(f"{name}={path!r} in {redact(url)!r}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{name}={path!r} in {redact(url)!r}: not readable by this process")
    return path


def tls_failure(exc: BaseException | None) -> str | None:
    """What went wrong in the TLS handshake under ``exc`` (a driver's error
    wrapping it, or its cause or context), if it is a certificate problem:
    one that trying again will not cure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = " ".join(str(exc.verify_message or exc).split())
            return (
                f"the server's TLS certificate failed verification ({why}); "
                "check the CA file the URL names"
            )
        if isinstance(exc, ssl.SSLError) and "CERTIFICATE" in str(exc.reason or ""):
            return (
                f"the server refused this client's TLS certificate ({exc.reason}); "
                "check the client certificate and key the URL names"
            )
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
