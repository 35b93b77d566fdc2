"""podman (as root) with fuse-unionfs as its mount program, through the daemon:
the container's root is served by one of the daemon's pooled servers."""
import os

import pytest
from daemonutil import wait_listed

from bench.podman import IMAGE, Podman, build_rootfs_tar


class DaemonPodman(Podman):
    """podman whose mount program finds the test's daemon."""

    def __init__(self, daemon, *args, **kw):
        super().__init__(*args, **kw)
        self.daemon = daemon

    def env(self):
        return {**super().env(), "UNIONFS_SOCKET": self.daemon.socket}


@pytest.fixture
def podman(daemon, daemon_dir, tmp_path):
    # podman refuses long runroot paths: keep the storage in the daemon's short dir
    pm = DaemonPodman(daemon, "fuse-unionfs", os.path.join(daemon_dir, "s"))
    pm.load_image(build_rootfs_tar(str(tmp_path / "rootfs.tar")))
    yield pm
    pm.close()


def test_a_podman_container_is_served_through_the_daemon(daemon, podman):
    run = podman.run("run", "-d", *podman.container_flags(), IMAGE, "sleep", "60")
    container = run.stdout.strip()
    try:
        wait_listed(daemon, 1)
        [m] = daemon.mounts()
        with open(f"/proc/{m['pid']}/cmdline", "rb") as f:
            assert b"unionfs.serve.pooled" in f.read()      # a server started ahead
        out = podman.run("exec", container, "sh", "-c",
                         "echo hi > /made; cat /made; rm -rf /data; mkdir /data; ls -a /data")
        assert out.stdout.split() == ["hi", ".", ".."]
        status, stats = daemon.api("GET", f"/v1/mounts/{m['id']}/stats")
        assert status == 200 and stats["requests"]["create"]["count"] >= 1
    finally:
        podman.run("rm", "-f", "-t", "0", container, check=False)
    wait_listed(daemon, 0)
