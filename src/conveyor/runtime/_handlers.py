from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypedDict

from conveyor._time import Clock, seconds
from conveyor.errors import ConfigError
from conveyor.messages import Codec, Message
from conveyor.resilience import Bulkhead, Limiter, RateLimiter, RetryBudget, RetryPolicy
from conveyor.resilience._breaker import CircuitBreaker, through
from conveyor.runtime._context import Context, Middleware

__all__ = ["Handler", "HandlerFunc", "HandlerOptions"]

HandlerFunc = Callable[..., Awaitable[None]]


class HandlerOptions(TypedDict, total=False):
    """How a consumer runs: the keyword options of ``App.handler``, shared by
    ``Sagas.participant`` and ``Jobs.kind`` (every option of one means the
    same in the others).

    - ``concurrency`` (1): deliveries handled at once by this process;
    - ``prefetch`` (``CONVEYOR_PREFETCH``): at most this many leased per fetch;
    - ``retry`` (``RetryPolicy()``): attempts and backoff;
    - ``timeout``: seconds (or ``timedelta``) one attempt may run;
    - ``breakers``: while one is open the consumer stops fetching;
    - ``rate_limit`` / ``rate_limit_key``: a limiter (or ``"10/s"``), per key;
    - ``bulkhead``: concurrent calls allowed, shared between handlers;
    - ``retry_budget``: caps retries across the handler's messages;
    - ``prepare``: a call made before the transaction opens (``ctx.prepared``).
    """

    concurrency: int
    prefetch: int | None
    retry: RetryPolicy | None
    timeout: float | timedelta | None
    breakers: Sequence[CircuitBreaker]
    rate_limit: Limiter | str | None
    rate_limit_key: Callable[[Message], Hashable] | None
    bulkhead: Bulkhead | None
    retry_budget: RetryBudget | None
    prepare: Callable[[Message], Awaitable[object]] | None


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

    @classmethod
    def build(
        cls,
        func: HandlerFunc,
        *,
        topic: str,
        group: str,
        clock: Clock,
        options: HandlerOptions,
    ) -> Handler:
        """A handler of ``func`` for (topic, group) with ``options``; a bad
        option is a ``ConfigError``."""
        unknown = set(options) - set(HandlerOptions.__annotations__)
        if unknown:
            raise ConfigError(f"unknown handler option(s): {', '.join(sorted(unknown))}")
        concurrency = options.get("concurrency", 1)
        prefetch = options.get("prefetch")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if prefetch is not None and prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {prefetch}")
        timeout = options.get("timeout")
        rate_limit = options.get("rate_limit")
        return cls(
            func=func,
            topic=topic,
            group=group,
            body_type=cls.inspect_body(func),
            concurrency=concurrency,
            prefetch=prefetch,
            retry=options.get("retry") or RetryPolicy(),
            timeout=None if timeout is None else seconds(timeout),
            breakers=tuple(options.get("breakers", ())),
            rate_limit=(
                RateLimiter.parse(rate_limit, clock=clock)
                if isinstance(rate_limit, str)
                else rate_limit
            ),
            rate_limit_key=options.get("rate_limit_key"),
            bulkhead=options.get("bulkhead"),
            retry_budget=options.get("retry_budget"),
            prepare=options.get("prepare"),
        )

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
