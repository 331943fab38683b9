"""schemathesis over an ASGI app's own /openapi.json, shared by the API tests."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def fuzz_every_operation(asgi: Any, *, max_examples: int) -> int:
    """Generated requests against every operation of ``asgi``'s schema,
    each response checked for no 5xx and for its documented codes, content
    types and schemas; returns how many operations were tested."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    with _quiet():
        schema = schemathesis.openapi.from_asgi("/openapi.json", asgi)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=max_examples,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call()
            case.validate_response(response, checks=checks)

        with _quiet():
            given(operation.as_strategy())(run)()
        tested += 1
    return tested
