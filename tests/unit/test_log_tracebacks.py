"""A logged exception's traceback in the text format shows the frames but
not their local variables: locals may hold secrets, and rendering large
ones is slow enough to starve a worker that logs a failure per retry."""

from __future__ import annotations

import io
import logging

from conveyor.observability._logs import configure_logging


def test_a_logged_traceback_shows_no_local_variables() -> None:
    stream = io.StringIO()
    configure_logging(level="INFO", format="text", stream=stream)
    try:
        # Built at run time: the traceback's source lines must not give it away.
        password = "-".join(["s3cr3t", "password", "value"])
        raise RuntimeError(f"failed to connect ({len(password)} chars of password)")
    except RuntimeError:
        logging.getLogger("conveyor.test").exception("connection failed")
    finally:
        configure_logging(level="WARNING", format="text")
    text = stream.getvalue()
    assert "connection failed" in text
    assert "RuntimeError" in text
    assert "test_a_logged_traceback_shows_no_local_variables" in text  # the frame is there
    assert "s3cr3t-password-value" not in text
