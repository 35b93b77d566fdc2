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


@pytest.fixture
def make_stack(tmp_path):
    """make_stack(nlowers=2, tag="", root=tmp_path): directories for a union
    (mountutil.Stack); whatever is mounted on them is unmounted at the end."""
    from mountutil import Stack, force_unmount
    made = []

    def make(nlowers=2, tag="", root=None):
        stack = Stack(root or tmp_path, nlowers, tag)
        made.append(stack)
        return stack
    yield make
    for stack in made:
        force_unmount(stack.mnt)


@pytest.fixture
def stack(make_stack):
    """Two lower layers, an upper, a workdir and a mountpoint (mountutil.Stack)."""
    return make_stack()
