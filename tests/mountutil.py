"""Test helpers: mount unionfs and the kernel's overlayfs, always unmount.

`unionfs_mount` serves in the foreground in a child process whose log is
checked at teardown: any traceback or internal error fails the test.
"""
import contextlib
import os
import subprocess
import sys
import time

VENV_BIN = os.path.dirname(sys.executable)
UNIONFS = os.path.join(VENV_BIN, "unionfs")
FUSE_UNIONFS = os.path.join(VENV_BIN, "fuse-unionfs")


def node_at(union, path):
    """The node at a /-separated path of an in-process Union (counting lookups)."""
    from unionfs.fs.inodes import ROOT_INO
    ino, node = ROOT_INO, None
    for part in path.split("/"):
        node, _ = union.lookup(ino, part.encode())
        ino = node.ino
    return node


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def force_unmount(mnt):
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


@contextlib.contextmanager
def unionfs_mount(mnt, lowers, upper=None, work=None, options=(), check_log=True, env=None):
    """Serve unionfs at mnt in the foreground; yields the server Popen.

    env: variables added to the server's environment."""
    args = [UNIONFS, "mount", "-f"]
    for low in lowers:
        args += ["--lower", str(low)]
    if upper is not None:
        args += ["--upper", str(upper), "--work", str(work)]
    for opt in options:
        args += ["-o", opt]
    args.append(str(mnt))
    log_path = f"{mnt}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                env=None if env is None else {**os.environ, **env})
    try:
        wait_for(lambda: os.path.ismount(mnt) or proc.poll() is not None, what="mount")
        if proc.poll() is not None:
            raise RuntimeError(f"unionfs mount failed: {open(log_path).read()}")
        yield proc
    finally:
        force_unmount(mnt)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = open(log_path, errors="replace").read()
    if check_log and ("Traceback" in text or "ERROR" in text):
        raise AssertionError(f"unionfs server logged errors:\n{text}")


@contextlib.contextmanager
def kernel_mount(mnt, lowers, upper=None, work=None, options=""):
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    if options:
        opts += "," + options
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True,
                   capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class Stack:
    """Directories for one union: lowers l1..ln, upper, work, mountpoint."""

    def __init__(self, root, nlowers=2, tag=""):
        self.root = root
        self.lowers = [root / f"{tag}l{i}" for i in range(1, nlowers + 1)]
        self.upper = root / f"{tag}upper"
        self.work = root / f"{tag}work"
        self.mnt = root / f"{tag}mnt"
        for d in self.lowers + [self.upper, self.work, self.mnt]:
            d.mkdir(parents=True, exist_ok=True)

    def unionfs(self, **kw):
        return unionfs_mount(self.mnt, self.lowers, self.upper, self.work, **kw)

    def open_union(self, upper=True, **kw):
        """The filesystem on these directories in-process, without a mount."""
        from unionfs.fs.union import Union
        lowers = [str(p) for p in self.lowers]
        if not upper:
            return Union(lowers, **kw)
        return Union(lowers, str(self.upper), str(self.work), **kw)

    def kernel(self, **kw):
        return kernel_mount(self.mnt, self.lowers, self.upper, self.work, **kw)
