"""Fixtures of the daemon tier: a daemon in a directory of the test's own,
stopped at the end, with every mount it handed out unmounted and every
server it started gone."""
import os
import subprocess
import tempfile

import pytest
from daemonutil import Daemon

from mountutil import force_unmount, wait_for


@pytest.fixture
def daemon_dir():
    # world-traversable (plain users reach the socket), removed at the end
    root = tempfile.mkdtemp(prefix="unionfs-daemon-")
    os.chmod(root, 0o755)
    yield root
    subprocess.run(["rm", "-rf", root])


@pytest.fixture
def make_daemon(daemon_dir):
    """make_daemon(pool=2, group=None): a started Daemon; at the end its mounts
    are unmounted, it is stopped, and every server it started is gone."""
    made = []
    before = Daemon(daemon_dir).pooled_pids()

    def make(**kw):
        d = Daemon(daemon_dir, **kw).start()
        made.append(d)
        return d
    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            for m in d.mounts():
                force_unmount(m["mountpoint"])
            d.stop()
    # unclaimed pool servers exit when the daemon's end of their channel closes
    wait_for(lambda: not (Daemon(daemon_dir).pooled_pids() - before), timeout=10,
             what="the daemon's servers to exit")


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()
