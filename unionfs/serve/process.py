"""The life of a union server process: start it, hand it a mount, stop it.

A FUSE server never runs in the process that uses its mount, so every
mount but `unionfs mount -f` is served by a process of its own, forked (not
exec'd: Python is loaded already, and the interpreter's path need not be
readable). Starting one and giving it a mount are two steps:

    handle = spawn()      the child imports pyfuse3, trio and the filesystem
                          (~100 ms), then waits on its end of a socketpair
    handle.mount(cfg)     sends the request, one line of JSON (the MountConfig's
                          to_json, a log file, whether to detach); the child
                          validates, mounts and answers {"ready": true} once the
                          kernel has the mount, or {"error": "one line"}
    handle.stop(mnt)      unmounts, waits for the exit; SIGTERM, then SIGKILL,
                          for a server that does not go

so a process can be started ahead of time and given its mount later (the
runner's early fork: `start_spare()` before click is imported, `take_spare()`
once the plan is known). The channel is an AF_UNIX socketpair so that file
descriptors can be passed over it later (SCM_RIGHTS). A spawned child dies
with its parent (PR_SET_PDEATHSIG: SIGTERM) unless the mount asks it to
detach (`unionfs mount`'s daemon); one never given a mount exits when its
channel closes, or is killed and reaped by `discard()`.

Only os, sys and .child (itself only os and sys) are imported here at load: the
runner imports this module before anything else.
"""
import os
import sys

from . import child
from .config import shown

READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0
KILL_TIMEOUT = 2.0

# Parent ends of the channels of living children: a child closes the others'
# (else a later child would keep an earlier one's channel open, and the
# earlier one would never see its EOF).
_channels = set()
_spare = None


class ServerError(Exception):
    """A server that could not mount, or could not be stopped: one line, saying
    who says it ("unionfs: ...", "unionfs server: ...")."""


class ServerGone(ServerError):
    """The server exited before it was given its mount."""


class ServerHandle:
    """A spawned server process, owned by the process that spawned it."""

    def __init__(self, pid, channel):
        self.pid = pid
        self.channel = channel      # our end of the socketpair (fd)
        self.status = None          # wait status, once reaped
        self.ready = False

    # ---- giving it a mount ------------------------------------------------

    def send_mount(self, cfg, log_path=None, detach=False):
        """Send the mount request; ServerGone if the server is gone already."""
        import json
        request = json.dumps({"config": cfg.to_json(), "log": log_path, "detach": detach},
                             ensure_ascii=True) + "\n"
        data = request.encode()
        try:
            while data:
                data = data[os.write(self.channel, data):]
        except OSError:  # EPIPE, ECONNRESET: it died (or was killed) while waiting
            self.discard()
            raise ServerGone("unionfs: the server exited before it was given its mount") from None

    def wait_ready(self, timeout=READY_TIMEOUT):
        """Wait for the answer to the mount request; ServerError with the server's line."""
        import json
        import select
        poll = select.poll()
        poll.register(self.channel, select.POLLIN)
        if not poll.poll(timeout * 1000):
            raise ServerError(f"unionfs: the union was not mounted after {timeout:.0f} s")
        line = child.read_line(self.channel)
        self._close_channel()
        if line is None:
            self._reap()
            raise ServerError(f"unionfs: the server exited ({_describe(self.status)}) "
                              "before mounting")
        answer = json.loads(line)
        if "error" in answer:
            raise ServerError(answer["error"])
        self.ready = True

    def mount(self, cfg, log_path=None, detach=False, timeout=READY_TIMEOUT):
        self.send_mount(cfg, log_path, detach)
        self.wait_ready(timeout)

    # ---- ending it --------------------------------------------------------

    def stop(self, mountpoint=None, timeout=EXIT_TIMEOUT):
        """Unmount `mountpoint` if the table lists it, then wait for the exit.

        Returns the unmount's OSError (the exit is waited for all the same),
        or None.
        """
        if not self.ready and self.status is None:
            self.terminate()  # never got mounted: nothing to unmount first
        problem = None
        if mountpoint is not None:
            try:
                unmount_listed(mountpoint)
            except OSError as e:
                problem = e
        self.wait_exit(timeout)
        return problem

    def terminate(self):
        if self.status is None:
            try:
                os.kill(self.pid, 15)  # SIGTERM: the server unmounts and exits
            except ProcessLookupError:
                pass

    def wait_exit(self, timeout=EXIT_TIMEOUT):
        """Reap the server; SIGTERM after `timeout` s, SIGKILL 2 s later."""
        self._close_channel()
        for signum, limit in ((15, timeout), (9, KILL_TIMEOUT), (None, None)):
            if self._reap(limit):
                return
            if signum is not None:
                try:
                    os.kill(self.pid, signum)
                except ProcessLookupError:
                    pass

    def discard(self):
        """Kill and reap a server that has no mount (idempotent)."""
        self._close_channel()
        if self.status is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self._reap()

    def _reap(self, timeout=None):
        """True once reaped; waits at most `timeout` s (None: for ever)."""
        if self.status is not None:
            return True
        if timeout is not None and not wait_for_exit(self.pid, timeout):
            return False
        try:
            self.status = os.waitpid(self.pid, 0)[1]
        except ChildProcessError:
            self.status = 0
        return True

    def _close_channel(self):
        if self.channel is not None:
            _channels.discard(self.channel)
            os.close(self.channel)
            self.channel = None


def wait_for_exit(pid, timeout):
    """True if process `pid` exits (or is a zombie) within `timeout` s; any process,
    not only a child (pidfd)."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        return bool(poll.poll(timeout * 1000))
    finally:
        os.close(fd)


def _describe(status):
    if status is None:
        return "still running"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


# ---- spawning -------------------------------------------------------------

def spawn(die_with_parent=True):
    """Fork a server process; return its handle (see the module's docstring)."""
    import _socket
    ours, theirs = _socket.socketpair(_socket.AF_UNIX,
                                      _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    ours, theirs = ours.detach(), theirs.detach()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ours)
        for fd in _channels:
            os.close(fd)
        _channels.clear()
        child.main(theirs, parent if die_with_parent else None)  # never returns
    os.close(theirs)
    _channels.add(ours)
    return ServerHandle(pid, ours)


def start_spare():
    """Spawn a server to be given a mount later by take_spare() (one at a time)."""
    global _spare
    if _spare is None:
        import atexit
        _spare = spawn()
        atexit.register(discard_spare)
    return _spare


def take_spare():
    """The spare server (now the caller's), or None."""
    global _spare
    handle, _spare = _spare, None
    return handle


def discard_spare():
    """Kill and reap a spare nobody took (idempotent)."""
    handle = take_spare()
    if handle is not None:
        handle.discard()


# ---- serving in this process, unmounting ------------------------------------

def start(cfg):
    """`unionfs mount` and `fuse-unionfs`: in the foreground (cfg.foreground) serve
    here until unmounted; else start a detached server and return once its
    mount is live. The exit status; validate.MountError or ServerError (one line)."""
    if cfg.foreground:
        return serve_here(cfg)
    handle = spawn()
    try:
        handle.mount(cfg, detach=True)
    except ServerError:
        handle.stop()  # it exits after its answer: reap it
        raise
    return 0


def serve_here(cfg):
    """`unionfs mount -f`: validate and serve in this very process; the exit status.
    Raises validate.MountError (one line)."""
    import logging

    from .server import serve
    from .validate import validate
    validate(cfg)
    logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.WARNING,
                        format="unionfs: %(levelname)s %(message)s")
    return serve(cfg, lambda error: None)


def unmount(mountpoint, lazy=False):
    """umount2 (MNT_DETACH if `lazy`); where the kernel refuses it (EPERM: a user's
    FUSE mount) `fusermount3 -u [-z]`. Raises OSError with a one-line reason."""
    import errno

    from ..sys import libc
    try:
        libc.umount2(mountpoint, libc.MNT_DETACH if lazy else 0)
        return
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawnp("fusermount3", ["fusermount3", "-uz" if lazy else "-u",
                                              mountpoint], os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_end, 1), (os.POSIX_SPAWN_DUP2, write_end, 2)])
    except OSError as e:
        os.close(read_end)
        raise OSError(e.errno, f"fusermount3: {e.strerror}", mountpoint) from None
    finally:
        os.close(write_end)
    with os.fdopen(read_end, errors="replace") as f:
        output = f.read().strip()
    if os.waitpid(pid, 0)[1] != 0:
        raise OSError(errno.EPERM, output.splitlines()[-1] if output else "fusermount3 failed",
                      mountpoint)


def unmount_listed(mountpoint):
    """Unmount if the mount table lists `mountpoint` (even a dead FUSE mount);
    lazily if it is busy."""
    from ..sys import mountinfo
    if not mountinfo.is_mountpoint(mountpoint):
        return
    try:
        unmount(mountpoint)
    except OSError:
        unmount(mountpoint, lazy=True)


def server_pid(mountpoint):
    """The pid of the server of a unionfs mount (from the root's stats xattr)."""
    import json
    try:
        return json.loads(os.getxattr(mountpoint, "user.unionfs.stats"))["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


UNIONFS_TYPES = ("fuse.unionfs", "fuse.fuse-unionfs")


def unmount_and_wait(mountpoint, timeout=EXIT_TIMEOUT):
    """`unionfs umount`: unmount, then return once the server has exited (its
    layers are free). The server need not be ours. Only a unionfs mount is
    unmounted; a bind mount of one (elsewhere, or of a subdirectory) is
    unmounted alone, and its server, still serving the union, is not waited
    for. ServerError (one line)."""
    from ..sys import mountinfo
    mnt = os.path.realpath(mountpoint)
    stacked = mountinfo.mounts_at(mnt)
    if not stacked:
        raise ServerError(f"unionfs: {shown(mnt)} is not mounted")
    top = stacked[-1]
    if top.fstype not in UNIONFS_TYPES:
        raise ServerError(f"unionfs: {shown(mnt)} is not a unionfs mount (it is {top.fstype})")
    pid = server_pid(mnt) if top.root == "/" else None
    try:
        unmount(mnt)
    except OSError as e:
        raise ServerError(f"unionfs: cannot unmount {shown(mnt)}: {e.strerror}") from None
    if any(m.device == top.device for m in mountinfo.mounts()):
        return      # the union is still mounted elsewhere: its server goes on
    if pid is not None and not wait_for_exit(pid, timeout):
        raise ServerError(f"unionfs: the server of {shown(mnt)} (pid {pid}) did not exit")
