"""The one loop every backend retries a call to its server with."""

from __future__ import annotations

import pytest

from conveyor._connect import keep_trying
from conveyor.errors import BrokerError
from conveyor.resilience import RetryPolicy

NO_WAIT = RetryPolicy(max_attempts=1, base_delay=0.0, max_delay=0.0)


class Lost(Exception):
    pass


def failing(times: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    async def op() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return calls, op


def give_up(exc: Exception, again: bool) -> BaseException:
    if isinstance(exc, Lost):
        return BrokerError(f"gave up ({'deadline' if again else 'permanent'})")
    return exc


async def test_transient_errors_are_tried_again_until_the_call_succeeds() -> None:
    calls, op = failing(3, Lost("reset"))
    warned: list[float] = []
    result = await keep_trying(
        op,  # type: ignore[arg-type]
        within=60,
        transient=lambda e: isinstance(e, Lost),
        give_up=give_up,
        policy=NO_WAIT,
        warn=lambda e, d: warned.append(d),
    )
    assert result == "done"
    assert len(calls) == 4
    assert warned == [0.0, 0.0, 0.0]


async def test_past_the_limit_give_up_decides_the_error_with_the_driver_error_as_cause() -> None:
    calls, op = failing(100, Lost("reset"))
    with pytest.raises(BrokerError, match="deadline") as info:
        await keep_trying(
            op,  # type: ignore[arg-type]
            within=0,
            transient=lambda e: isinstance(e, Lost),
            give_up=give_up,
            policy=NO_WAIT,
        )
    assert len(calls) == 1
    assert isinstance(info.value.__cause__, Lost)


async def test_an_error_that_is_not_transient_is_not_tried_again() -> None:
    calls, op = failing(100, Lost("refused"))
    with pytest.raises(BrokerError, match="permanent"):
        await keep_trying(
            op,  # type: ignore[arg-type]
            within=60,
            transient=lambda e: False,
            give_up=give_up,
            policy=NO_WAIT,
        )
    assert len(calls) == 1
    calls, op = failing(100, ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):  # give_up let it pass unchanged
        await keep_trying(
            op,  # type: ignore[arg-type]
            within=60,
            transient=lambda e: False,
            give_up=give_up,
            policy=NO_WAIT,
        )


async def test_a_cause_give_up_chose_is_kept() -> None:
    inner = OSError("connection refused")

    def wrapped(exc: Exception, again: bool) -> BaseException:
        error = BrokerError("unreachable")
        error.__cause__ = inner
        return error

    _, op = failing(100, Lost("wrapper"))
    with pytest.raises(BrokerError) as info:
        await keep_trying(
            op,  # type: ignore[arg-type]
            within=0,
            transient=lambda e: True,
            give_up=wrapped,
            policy=NO_WAIT,
        )
    assert info.value.__cause__ is inner
