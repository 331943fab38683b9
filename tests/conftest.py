from __future__ import annotations

import pytest

from tests.servers import require_servers


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
