"""`unionfs run` with a daemon listening: the union is served by one of the
daemon's pre-started servers, and the run's teardown leaves no mount, no
server and no state behind."""
import os
import subprocess
import time

import pytest
from daemonutil import UNIONFS

from mountutil import wait_for
from runner_rootfs import build_rootfs

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def lower(tmp_path_factory):
    return build_rootfs(str(tmp_path_factory.mktemp("run-daemon") / "lower"))


def _run(daemon, state, lower, *argv, **kw):
    env = dict(daemon.env, TMPDIR=state)
    return subprocess.Popen([UNIONFS, "run", "--lower", lower, "--", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _servers_of(daemon, state):
    return [m for m in daemon.mounts() if m["mountpoint"].startswith(state + "/")]


def test_a_run_is_served_by_the_daemons_server(daemon, lower, tmp_path):
    state = str(tmp_path / "state")
    os.mkdir(state)
    run = _run(daemon, state, lower, "sh", "-c", "cat /etc/greeting; sleep 30")
    try:
        wait_for(lambda: _servers_of(daemon, state), timeout=30, what="the run's mount")
        served = _servers_of(daemon, state)[0]
        assert served["layers"]["lowers"] == [lower]
        # the mount is listed before the command has run: read its line
        # before the terminate, which would otherwise race the cat
        greeting = run.stdout.readline()
    finally:
        run.terminate()
        _, err = run.communicate(timeout=60)
    assert greeting == "hello from the lower layer\n", err


def test_the_runs_teardown_ends_the_daemons_server(daemon, lower, tmp_path):
    state = str(tmp_path / "state")
    os.mkdir(state)
    run = _run(daemon, state, lower, "sh", "-c", "echo hi > /data/new; sleep 30")
    wait_for(lambda: _servers_of(daemon, state), timeout=30, what="the run's mount")
    pid = _servers_of(daemon, state)[0]["pid"]
    run.terminate()
    run.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the daemon's server outlived the run"
    assert os.listdir(state) == []
    wait_for(lambda: not _servers_of(daemon, state), timeout=10, what="the daemon to forget it")


def test_a_run_with_a_daemon_starts_no_server_of_its_own(daemon, lower, tmp_path):
    state = str(tmp_path / "state")
    os.mkdir(state)
    run = _run(daemon, state, lower, "sleep", "30")
    try:
        wait_for(lambda: _servers_of(daemon, state), timeout=30, what="the run's mount")
        children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(run.pid)],
                                  capture_output=True, text=True).stdout.splitlines()
        # the keeper is the run's only child: no spare, no server forked
        assert len(children) == 1, children
    finally:
        run.terminate()
        run.communicate(timeout=60)

