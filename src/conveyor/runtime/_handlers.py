from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from conveyor.errors import ConfigError
from conveyor.messages import Codec, Message
from conveyor.resilience import Bulkhead, Limiter, RetryBudget, RetryPolicy
from conveyor.resilience._breaker import CircuitBreaker, through
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
    breakers: tuple[CircuitBreaker, ...] = ()
    rate_limit: Limiter | None = None
    rate_limit_key: Callable[[Message], Hashable] | None = None
    bulkhead: Bulkhead | None = None
    retry_budget: RetryBudget | None = None
    prepare: Callable[[Message], Awaitable[object]] | None = None

    @staticmethod
    def inspect_body(func: Callable[..., Awaitable[object]]) -> type[Any] | None:
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

        # Decoding stays outside the breakers: a bad payload says nothing of a dependency.
        func = through(self.breakers, self.func)

        async def call(ctx: Context) -> None:
            if self.body_type is None:
                await func(ctx)
            else:
                await func(ctx, ctx.message.decode(self.body_type, codec))

        bulkhead = self.bulkhead

        async def guarded(ctx: Context) -> None:
            assert bulkhead is not None
            async with bulkhead:
                await call(ctx)

        async def link(
            mw: Middleware, inner: Callable[[Context], Awaitable[None]], ctx: Context
        ) -> None:
            await mw(ctx, partial(inner, ctx))

        chain: Callable[[Context], Awaitable[None]] = call if bulkhead is None else guarded
        for mw in reversed(middleware):
            chain = partial(link, mw, chain)
        return chain
