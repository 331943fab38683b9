"""The sum-of-primes example's domain: the segmented sieve and the request model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conveyor.examples.sum_of_primes import primes
from conveyor.examples.sum_of_primes.primes import MAX_B, MAX_SPAN, SumPrimeRequest, sum_of_primes


def _is_prime(n: int) -> bool:
    """Miller-Rabin with the bases that decide every n < 3.4e14 exactly."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17)
    if n in bases:
        return True
    if any(n % p == 0 for p in bases):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for base in bases:
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _reference(a: int, b: int) -> int:
    return sum(n for n in range(a, b + 1) if _is_prime(n))


def test_known_sums() -> None:
    """Published values: primes up to 10, 100 and two million, and an empty range."""
    assert sum_of_primes(1, 10) == 17
    assert sum_of_primes(1, 100) == 1060
    assert sum_of_primes(1, 2_000_000) == 142_913_828_922
    assert sum_of_primes(24, 28) == 0
    assert sum_of_primes(2, 2) == 2
    assert sum_of_primes(1, 1) == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0, max_value=400))
def test_matches_a_primality_test(a: int, width: int) -> None:
    """Any small range sums to what a Miller-Rabin test finds."""
    assert sum_of_primes(a, a + width) == _reference(a, a + width)


def test_segments_join_without_gaps_or_overlaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny segments (many per range, boundaries on primes and squares) the sum is unchanged."""
    expected = {(a, b): _reference(a, b) for a, b in [(1, 1000), (97, 1009), (120, 121), (5, 49)]}
    for segment in (1, 2, 7, 10, 49):
        monkeypatch.setattr(primes, "SEGMENT", segment)
        for (a, b), total in expected.items():
            assert sum_of_primes(a, b) == total, (segment, a, b)


def test_large_bounds_at_the_limit() -> None:
    """Near the largest accepted b the sieve agrees with a Miller-Rabin test."""
    a = MAX_B - 50_000
    assert sum_of_primes(a, MAX_B) == _reference(a, MAX_B)


def test_negative_bounds_are_refused() -> None:
    """The function names both bounds when one is negative."""
    with pytest.raises(ValueError, match="a=-1, b=5"):
        sum_of_primes(-1, 5)


def _errors(body: object) -> list[tuple[tuple[object, ...], str]]:
    with pytest.raises(ValidationError) as info:
        SumPrimeRequest.model_validate(body)
    return [(tuple(e["loc"]), e["msg"]) for e in info.value.errors()]


def test_valid_request() -> None:
    """Positive integers with a <= b and a bounded span are accepted."""
    assert SumPrimeRequest.model_validate({"a": 1, "b": MAX_SPAN}) == SumPrimeRequest(
        a=1, b=MAX_SPAN
    )
    assert SumPrimeRequest.model_validate_json('{"a": 7, "b": 7}').b == 7


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        ({"a": 0, "b": 5}, ("a",), "greater than or equal to 1"),
        ({"a": -3, "b": 5}, ("a",), "greater than or equal to 1"),
        ({"a": 1, "b": 0}, ("b",), "greater than or equal to 1"),
        ({"a": 1.5, "b": 5}, ("a",), "valid integer"),
        ({"a": 2.0, "b": 5}, ("a",), "valid integer"),
        ({"a": "2", "b": 5}, ("a",), "valid integer"),
        ({"a": True, "b": 5}, ("a",), "valid integer"),
        ({"a": None, "b": 5}, ("a",), "valid integer"),
        ({"b": 5}, ("a",), "Field required"),
        ({"a": 1}, ("b",), "Field required"),
        ({"a": 1, "b": 5, "c": 1}, ("c",), "Extra inputs are not permitted"),
        ({"a": 1, "b": MAX_B + 1}, ("b",), f"less than or equal to {MAX_B}"),
        ({"a": 9, "b": 5}, (), "a must be <= b, got a=9 > b=5"),
        ({"a": 1, "b": MAX_SPAN + 1}, (), f"over the limit of {MAX_SPAN}"),
    ],
)
def test_invalid_requests_name_the_field(
    body: dict[str, object], loc: tuple[object, ...], fragment: str
) -> None:
    """Each kind of bad input is refused with a message that names the field and the rule."""
    errors = _errors(body)
    assert any(got_loc == loc and fragment in msg for got_loc, msg in errors), errors
