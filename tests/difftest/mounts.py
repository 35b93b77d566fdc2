"""Mount a Stack with kernel overlayfs or a FUSE union, and always unmount.

Each mount is a context manager; leaving it (normally or by exception)
unmounts, falling back to aborting the FUSE connection and a lazy unmount so
a wedged server can never leave a test hanging or a mount behind. A watchdog
aborts a FUSE connection that outlives its deadline, which turns a hung
request into ENOTCONN instead of a hung test.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from unionfs.sys import mountinfo

# unionfs-oci: unionfs told to write OCI-form markers (`-o whiteout=oci`), as it
# does when it cannot write the kernel form (not root)
# unionfs-metacopy: `-o metacopy=on` (metadata-only copy-up, the kernel's format)
TARGETS = ("unionfs", "unionfs-oci", "unionfs-metacopy", "fuse-overlayfs", "kernel")


class MountError(RuntimeError):
    pass


def is_mounted(mnt):
    return mountinfo.is_mountpoint(os.path.realpath(mnt))


def _fuse_abort(conn_minor):
    try:
        with open(f"/sys/fs/fuse/connections/{conn_minor}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass


def unmount(mnt, fuse_conn=None):
    """Unmount `mnt` for sure: umount, retry, abort FUSE, lazy umount."""
    for attempt in range(20):
        if not is_mounted(mnt):
            return
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if r.returncode == 0:
            break
        time.sleep(0.05 * (attempt + 1))
    if is_mounted(mnt):
        if fuse_conn is not None:
            _fuse_abort(fuse_conn)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def kernel_options(lowers, upper, work, metacopy=False):
    # metacopy=on needs redirect_dir=on in the kernel; only used to read an upper back
    features = ("redirect_dir=on,index=off,metacopy=on" if metacopy
                else "redirect_dir=off,index=off,metacopy=off")
    return (f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work},"
            + features)


@contextlib.contextmanager
def kernel_overlay(lowers, upper, work, mnt, metacopy=False):
    opts = kernel_options(lowers, upper, work, metacopy)
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MountError(f"kernel overlay mount failed: {r.stderr.strip()}")
    try:
        yield
    finally:
        unmount(mnt)


@contextlib.contextmanager
def tmpfs(path):
    """A private tmpfs at `path` (a layer on a filesystem of its own)."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "difftest", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MountError(f"tmpfs mount failed: {r.stderr.strip()}")
    try:
        yield
    finally:
        unmount(path)


def _unionfs_command():
    here = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "unionfs"
    return str(here) if here.exists() else (shutil.which("unionfs") or "unionfs")


def fuse_command(target, lowers, upper, work, mnt):
    if target.startswith("unionfs"):
        cmd = [_unionfs_command(), "mount"]
        for lower in lowers:
            cmd += ["--lower", str(lower)]
        if target == "unionfs-oci":
            cmd += ["-o", "whiteout=oci"]
        elif target == "unionfs-metacopy":
            cmd += ["-o", "metacopy=on"]
        return cmd + ["--upper", str(upper), "--work", str(work), str(mnt)]
    if target == "fuse-overlayfs":
        return ["fuse-overlayfs", "-o",
                f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}",
                str(mnt)]
    raise ValueError(target)


class ServerLog:
    """What a FUSE server wrote; filled in when its mount context exits."""
    def __init__(self):
        self.text = ""

    def errors(self):
        """Log lines that show a server-side failure (tracebacks, internal errors)."""
        if "Traceback" in self.text or "ERROR" in self.text:
            return self.text.strip().splitlines()[-40:]
        return []


def _wait_mounted(mnt, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(mnt):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def fuse_union(target, lowers, upper, work, mnt, deadline=120.0, server_log=None):
    """Mount with a FUSE union. unionfs serves in the foreground (-f) so that its
    log can be checked for tracebacks; fuse-overlayfs daemonizes itself."""
    cmd = fuse_command(target, lowers, upper, work, mnt)
    log_path = f"{mnt}.server.log"
    proc = None
    if target.startswith("unionfs"):
        cmd.insert(2, "-f")
        env = dict(os.environ)
        if os.environ.get("UNIONFS_DIFF_PYTHONPATH"):
            # serve a pinned copy of the package (replay --snapshot), not the working tree
            env["PYTHONPATH"] = os.environ["UNIONFS_DIFF_PYTHONPATH"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        ok = _wait_mounted(mnt, proc, 60)
        failure = "" if ok else open(log_path, errors="replace").read()[-2000:]
    else:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            ok = r.returncode == 0 and is_mounted(mnt)
            failure = (r.stderr or r.stdout).strip()[-2000:]
        except subprocess.TimeoutExpired:
            ok, failure = False, "did not return in 60 s"
    if not ok:
        unmount(mnt)
        if proc is not None:
            proc.kill()
            proc.wait()
        raise MountError(f"{target} mount failed: {' '.join(cmd)}: {failure}")
    conn = os.minor(os.stat(mnt).st_dev)
    watchdog = threading.Timer(deadline, _fuse_abort, args=(conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        unmount(mnt, fuse_conn=conn)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)    # the server's stacks, into its log
                time.sleep(1)
                proc.kill()
                proc.wait()
            if server_log is not None:
                server_log.text += open(log_path, errors="replace").read()
                if proc.returncode not in (0, None):
                    server_log.text += f"\nERROR: server exit status {proc.returncode}\n"


@contextlib.contextmanager
def mount_target(target, stack, deadline=120.0, server_log=None):
    """Mount a Stack with `target` (unionfs | fuse-overlayfs | kernel)."""
    if target == "kernel":
        with kernel_overlay(stack.lowers, stack.upper, stack.work, stack.mnt):
            yield
    else:
        with fuse_union(target, stack.lowers, stack.upper, stack.work, stack.mnt, deadline,
                        server_log):
            yield
