"""With ``GROUPSYNC_FAIL_ON_SKIP=1`` (set by ``.ci/run``) any skipped test fails the session.

A skip in CI means a test did not run: a vendor example missing from the clone, a browser not
installed. Locally a skip is fine; in CI it must fail, with the reasons listed. The hooks are
imported by tests/conftest.py; ``pytest -p tests.skip_guard`` loads them alone.
"""

from __future__ import annotations

import os

import pytest

FAIL_ON_SKIP_ENV = "GROUPSYNC_FAIL_ON_SKIP"

_skips: list[str] = []


def _enabled() -> bool:
    return os.environ.get(FAIL_ON_SKIP_ENV, "").strip() == "1"


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    # A skip's longrepr is (path, line, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _record(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append(f"{report.nodeid}: {_reason(report)}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record(report)  # a whole module skipped at import (pytest.skip(allow_module_level=True))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _enabled() and _skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _enabled() and _skips:
        terminalreporter.write_line(
            f"{FAIL_ON_SKIP_ENV}=1: {len(_skips)} test(s) skipped, which fails this run:", red=True
        )
        for line in _skips:
            terminalreporter.write_line(f"  SKIPPED {line}", red=True)
