"""``conveyor serve``: uvicorn with limits on what a client may make it hold.

uvicorn's own settings do most of it: the h11 protocol with
``h11_max_incomplete_event_size`` (the size of a request head),
``timeout_keep_alive`` (an idle connection between requests) and
``limit_concurrency`` (connections and requests at once; 503 beyond). What
uvicorn lacks is written here, in ``LimitedH11Protocol``:

- one deadline for a request's head and body together
  (``request_timeout``), from its first byte (or from the connection's
  opening) to its last: a client that trickles its headers or its body, or
  connects and sends nothing, is answered 408 and disconnected;
- a header count (``max_headers``) and the head's size again, for a head
  that arrived in one read (431 beyond);
- problem+json bodies for the errors the server answers itself (400, 408,
  431), like every error of the app.

The limit on requests without a valid API key is the job API's
(``JobAPI(unauthenticated_limit=)``): only it knows which requests those are.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import h11
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from conveyor.http._app import PROBLEM, problem_body, problem_response
from conveyor.settings import Settings

__all__ = ["LimitedH11Protocol", "ServeLimits", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

_REQUEST_DONE = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeLimits:
    """What one client may make a server hold; see the module doc. The
    defaults are the ``http_*`` settings'."""

    max_header_bytes: int
    max_headers: int
    request_timeout: float
    keep_alive: int
    max_connections: int | None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServeLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
            request_timeout=settings.http_request_timeout,
            keep_alive=settings.http_keep_alive,
            max_connections=settings.http_max_connections,
        )


class _HeadLimits:
    """431 for a request with more than ``max_headers`` header fields, or a
    head over ``max_bytes`` that h11 parsed whole (its size limit applies to
    a head still incomplete after a read, not to one that came in one)."""

    def __init__(self, app: ASGIApp, limits: ServeLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = len(scope["raw_path"]) + len(scope["query_string"])
            size += sum(len(name) + len(value) + 4 for name, value in headers)
            detail = None
            if len(headers) > self.limits.max_headers:
                detail = (
                    f"the request has {len(headers)} header fields, "
                    f"over the limit of {self.limits.max_headers}"
                )
            elif size > self.limits.max_header_bytes:
                detail = f"the request head is over the {self.limits.max_header_bytes}-byte limit"
            if detail is not None:
                refusal = problem_response(431, detail, headers={"Connection": "close"})
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head and
    body, a header count, and problem+json for the errors it answers."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ServeLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.app = _HeadLimits(self.app, limits)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that sends nothing is a request that never ends

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on this connection
        super().data_received(data)
        if self.conn.their_state in _REQUEST_DONE:
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        # h11 refuses a head over its size limit and a malformed one alike;
        # the buffer it leaves behind tells the two apart.
        if len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            detail = f"the request head is over the {self.limits.max_header_bytes}-byte limit"
            self._answer_and_close(431, detail)
        else:
            self._answer_and_close(400, "the request is not valid HTTP/1.1")

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app is still reading this body: it sees a disconnect, and
            # whatever it sends from now on is dropped.
            started = cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
            if started:
                self.transport.close()
                return
        detail = f"the request's head and body took over {self.limits.request_timeout:g}s to arrive"
        self._answer_and_close(408, detail)

    def _answer_and_close(self, status: int, detail: str) -> None:
        # Written raw: h11 will not send a response to a request it has not
        # parsed (or has refused); the connection closes right after.
        problem = problem_body(status, detail)
        body = json.dumps(problem, separators=(",", ":")).encode()
        head = (
            f"HTTP/1.1 {status} {problem['title']}\r\ncontent-type: {PROBLEM}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def serve(
    app: Any, *, host: str, port: int, workers: int, settings: Settings, **options: Any
) -> None:
    """Run ``app`` (an ASGI app, or a ``MODULE:ATTR`` string when ``workers``
    > 1) under uvicorn with ``settings``' ``http_*`` limits."""
    limits = ServeLimits.from_settings(settings)
    # A partial of a module-level class: uvicorn pickles it to its workers.
    protocol = functools.partial(LimitedH11Protocol, limits=limits)
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=workers,
        http=cast(type[asyncio.Protocol], protocol),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=limits.keep_alive,
        limit_concurrency=limits.max_connections,
        **options,
    )
