"""Fixtures of the runner's tests: a busybox rootfs, and a private TMPDIR that
must be empty afterwards (no state dir, no mount, no process left by a run)."""
import os
import signal
import subprocess

import pytest

from runner_rootfs import UNIONFS, build_rootfs, mounts_matching, processes_mentioning
from unionfs.sys import mountinfo


@pytest.fixture(scope="module")
def lower(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("these runner tests run as root (FUSE allow_other, namespaces)")
    return build_rootfs(str(tmp_path_factory.mktemp("rootfs") / "lower"))


@pytest.fixture
def state_base(tmp_path, lower):
    """A private TMPDIR for the runner; afterwards nothing may remain of any run."""
    base = tmp_path / "state"
    base.mkdir()
    yield str(base)
    leftovers = os.listdir(base)
    mounts = mounts_matching(str(base))
    processes = processes_mentioning(str(base))
    for pid, _ in processes:
        os.kill(pid, signal.SIGKILL)
    for entry in reversed(mountinfo.mounts()):
        if entry.mount_point.startswith(str(base) + "/"):
            subprocess.run(["umount", "-l", entry.mount_point], check=False)
    assert not processes, f"processes left behind: {processes}"
    assert not mounts, f"mounts left behind: {mounts}"
    assert not leftovers, f"state left behind: {leftovers}"


@pytest.fixture
def start_runner(state_base):
    """Start `unionfs run ARGS` in the background; killed at teardown if still running."""
    started = []

    def start(args, **kwargs):
        kwargs.setdefault("env", dict(os.environ, TMPDIR=state_base))
        process = subprocess.Popen([UNIONFS, "run", *args], **kwargs)
        started.append(process)
        return process
    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

