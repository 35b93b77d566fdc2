"""The podman tier's harness: which mount programs and modes are tested,
and what a test checks that podman left behind.

The machinery itself (podman on a fresh storage root with a chosen mount
program, as root or as a plain user made for the session, the busybox image)
is bench.podman's, shared with the start-up benchmark; fixtures are in this
directory's conftest.py.

Environment:
  UNIONFS_FUSE_UNIONFS  the fuse-unionfs to test (default: the one next to the
      test interpreter). Rootless runs need one a plain user can execute: an
      interpreter outside /root, e.g. a venv under /opt (docs/rootless.md).
"""
import os

from bench.podman import (  # noqa: F401
    IMAGE,
    Podman,
    PodmanUser,
    build_rootfs_tar,
    fuse_unionfs_program,
    others_can_run,
    program_path,
)

PROGRAMS = ("fuse-overlayfs", "fuse-unionfs")
MODES = ("root", "rootless")


def container_upper(pm: Podman, name: str) -> str:
    """The upper (diff) directory of a container's layer."""
    return pm.run("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).stdout.strip()


def layer_dirs(pm: Podman) -> list:
    """The storage's layer directories and layer links."""
    overlay = os.path.join(pm.root, "overlay")
    return sorted(os.listdir(overlay)) + sorted(os.listdir(os.path.join(overlay, "l")))


def mounts_left(pm: Podman) -> list:
    """Mounts under the storage root, in the namespace podman mounts in (for
    rootless, its pause process's)."""
    where = "/proc/self/mountinfo"
    if pm.user and pm.user.pause_pid():
        where = f"/proc/{pm.user.pause_pid()}/mountinfo"
    try:
        with open(where) as f:
            return [line.split()[4] for line in f if pm.storage in line.split()[4]]
    except OSError:
        return []


def servers_left(pm: Podman) -> list:
    """Processes (not podman itself) whose command line names the storage
    root: mount-program servers, conmon, still running."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(pm.root.encode() in a for a in argv) and not argv[0].endswith(b"podman"):
            found.append((int(entry), b" ".join(argv[:2]).decode(errors="replace")))
    return found
