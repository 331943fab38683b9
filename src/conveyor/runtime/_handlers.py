from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from conveyor.errors import ConfigError
from conveyor.messages import Codec
from conveyor.resilience import RetryPolicy
from conveyor.runtime._context import Context, Middleware

__all__ = ["Handler", "HandlerFunc"]

HandlerFunc = Callable[..., Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Handler:
    """A registered handler: one (topic, group) subscription."""

    func: HandlerFunc
    topic: str
    group: str
    body_type: type[Any] | None
    concurrency: int
    prefetch: int | None
    retry: RetryPolicy
    timeout: float | None

    @staticmethod
    def inspect_body(func: HandlerFunc) -> type[Any] | None:
        if not inspect.iscoroutinefunction(func):
            raise ConfigError(f"handler {func.__qualname__} must be an async function")
        params = list(inspect.signature(func).parameters.values())
        if not params or len(params) > 2:
            raise ConfigError(
                f"handler {func.__qualname__} must take (ctx) or (ctx, body), "
                f"not {len(params)} parameters"
            )
        if len(params) == 1:
            return None
        body = params[1].annotation
        if body is inspect.Parameter.empty:
            return dict
        if isinstance(body, str):
            scope = dict(func.__globals__)
            scope.update(inspect.getclosurevars(func).nonlocals)
            try:
                body = eval(body, scope)
            except Exception as exc:
                raise ConfigError(
                    f"cannot resolve the body type {body!r} of handler {func.__qualname__} "
                    f"({exc}); define it at module level"
                ) from None
        if body is Any or body is object:
            return dict
        origin = typing.get_origin(body)
        if origin is not None:
            return origin if isinstance(origin, type) else dict
        return body if isinstance(body, type) else dict

    def build_call(
        self, middleware: Sequence[Middleware], codec: Codec
    ) -> Callable[[Context], Awaitable[None]]:
        """Compose middleware (first = outermost) around decode + handler."""

        async def call(ctx: Context) -> None:
            if self.body_type is None:
                await self.func(ctx)
            else:
                await self.func(ctx, ctx.message.decode(self.body_type, codec))

        async def link(
            mw: Middleware, inner: Callable[[Context], Awaitable[None]], ctx: Context
        ) -> None:
            await mw(ctx, partial(inner, ctx))

        chain: Callable[[Context], Awaitable[None]] = call
        for mw in reversed(middleware):
            chain = partial(link, mw, chain)
        return chain
