"""Test helper: a tiny rootfs from Debian's busybox-static, and runner helpers.

`build_rootfs(dir)` makes bin/busybox plus one symlink per applet (from
`busybox --list-full`, so no chroot is needed), a few files in /etc and a
`data/` tree the tests delete and overwrite. Nothing here mocks anything.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.startup import BUSYBOX, build_busybox_rootfs

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")


def build_rootfs(root):
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    build_busybox_rootfs(root)
    os.makedirs(os.path.join(root, "data/sub"), exist_ok=True)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/greeting": "hello from the lower layer\n",
        "data/doomed": "delete me\n",
        "data/sub/keep": "keep me\n",
        "data/plain.txt": "not a program\n",
    }
    for rel, text in files.items():
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    os.chmod(os.path.join(root, "data/plain.txt"), 0o644)
    return root


def snapshot(root):
    """{relative path: (mode, size, mtime_ns, link target or None)} of a tree."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            target = os.readlink(path) if os.path.islink(path) else None
            tree[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, target)
    return tree


def run_unionfs(args, **kwargs):
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    return subprocess.run([UNIONFS, "run", *args], **kwargs)


def run_on(lower, state_base, *args, **kwargs):
    """`unionfs run --lower LOWER ARGS` with TMPDIR=state_base."""
    kwargs.setdefault("env", dict(os.environ, TMPDIR=state_base))
    return run_unionfs(["--lower", lower, *args], **kwargs)


def mounts_matching(*needles):
    """Host mount table lines that mention one of `needles`."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    return [line for line in lines if any(n in line for n in needles)]


def processes_mentioning(needle):
    """Pids (not ours) whose command line contains `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append((int(entry), cmdline))
    return found


def wait_or_kill(pid, limit=30.0):
    """The wait status of child `pid`, killing it if it is still there after `limit` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def wait_for_path(path, process, limit=30.0):
    """Wait until `path` exists, while `process` (a Popen) keeps running."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert process.poll() is None, "the runner exited early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
