from __future__ import annotations

import signal
import sys
from types import FrameType

import pytest

from tests.servers import require_servers


def _terminated(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a CI timeout, a kill) exits through atexit, which stops the
    # private servers the run started (TLS, chaos) instead of orphaning them.
    sys.exit(128 + signum)


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _terminated)


@pytest.fixture(scope="session", autouse=True)
def _servers_running() -> None:
    """Every server the suite talks to answers; otherwise the run fails."""
    require_servers()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test fails the run: every server the suite needs is started
    by the test command, so a skip can only hide a broken set-up."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
