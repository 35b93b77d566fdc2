"""Shared pytest set-up: with UNIONFS_REQUIRE_ALL=1 (set by CI) a skipped test fails."""
import os

import pytest

REQUIRE_ALL = os.environ.get("UNIONFS_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, but UNIONFS_REQUIRE_ALL=1 forbids skips: {reason}"
