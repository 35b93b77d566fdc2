"""The layer stack of one run: a private state dir, the union mount and its teardown.

The union is served by a separate server process, the equivalent of
`unionfs mount -f` (a FUSE server must never run inside the process that
uses its mount), forked from the runner rather than exec'd: usually at the
runner's very start (runner.prestart), else when mounting
(`_fork_unionfs_server`). Keeping it in the
foreground lets the runner own its pid: it waits for the mount to go live,
and after unmounting it waits for the server to exit, so no server outlives a
run. Every step of `close()` is tolerant, so it can run on any path.

Debugging aid: UNIONFS_RUN_MOUNT_PROGRAM=/usr/bin/fuse-overlayfs (or any
program taking `-f -o lowerdir=..,upperdir=..,workdir=.. MNT`) replaces unionfs.
"""
import os
import select
import signal
import sys
import time

from unionfs.sys import libc

from . import prestart

MOUNT_PROGRAM_ENV = "UNIONFS_RUN_MOUNT_PROGRAM"
MOUNT_TIMEOUT = 30.0
SERVER_EXIT_TIMEOUT = 10.0
STATE_PREFIX = "unionfs-run-"


class UnionError(RuntimeError):
    """The union could not be mounted or taken down (one line)."""


class signals_blocked:
    """Hold back `signums` for a block (they are delivered when it ends)."""

    def __init__(self, signums=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
        self.signums = signums

    def __enter__(self):
        self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.signums)

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)


def make_state_dir():
    """A fresh 0700 directory for this run (tempfile's import costs ~5 ms)."""
    base = os.environ.get("TMPDIR") or "/tmp"
    for _ in range(1000):
        path = os.path.join(base, f"{STATE_PREFIX}{os.getpid()}-{time.monotonic_ns() % 10**9}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise UnionError(f"cannot create a state directory in {base}")


def mount_program_command(program, lowers, upper, work, mountpoint):
    """The command line of a UNIONFS_RUN_MOUNT_PROGRAM (fuse-overlayfs's syntax)."""
    opts = f"lowerdir={':'.join(lowers)}"
    if upper:
        opts += f",upperdir={upper},workdir={work}"
    return [program, "-f", "-o", opts, mountpoint]


def server_request(lowers, upper, work, mountpoint):
    """What a unionfs server needs to know, as strings (see `serve`)."""
    return [mountpoint, upper or "", work or "", *lowers]


def serve(request):
    """Be `unionfs mount -f --lower L.. [--upper U --work W] MNT`; return its exit status.

    Runs in the server's own process, with stdout and stderr on the log.
    """
    from unionfs.serve.mount import MountError, start
    from unionfs.serve.options import MountConfig
    mountpoint, upper, work, *lowers = request
    cfg = MountConfig(lowers=lowers, upper=upper or None, work=work or None,
                      mountpoint=mountpoint, foreground=True)
    try:
        return start(cfg)
    except MountError as e:
        print(f"unionfs: {e}", file=sys.stderr)
        return 1


def import_server_modules():
    """Everything `serve` imports; ~100 ms, almost all of it pyfuse3 and trio."""
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    import unionfs.fuse.ops  # noqa: F401
    import unionfs.serve.mount  # noqa: F401


def become_server_process():
    """Signals and stdin as a server forked from the runner needs them.

    The caller has called setsid(): the terminal's Ctrl-C is for the
    container, not the server.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def _fork_unionfs_server(request, log_fd):
    """Fork a unionfs server for `request`; return its pid.

    It is a separate process (a FUSE server must never serve its own
    client), but not a new interpreter: Python is already loaded, which saves
    the interpreter's start-up and works even where the interpreter's path is
    not readable by the calling user. `unionfs run` usually has one forked
    already, importing the server's modules while the runner starts up
    (runner.prestart); this is the way when it has not.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    runner = os.getpid()
    pid = os.fork()
    if pid:
        return pid

    def server():
        # Should the runner die without its teardown (SIGKILL), SIGTERM makes
        # the server unmount and exit instead of lingering.
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != runner:
            return 1
        os.setsid()
        become_server_process()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        return serve(request)
    exit_child(server)


def exit_child(body):
    """In a forked child: run body() and leave with its status, whatever
    happens (an error is reported on stderr: the server's log); never return
    into the runner's code."""
    status = 1
    try:
        status = body()
    except BaseException as e:  # noqa: BLE001 - report it, never return
        try:
            os.write(2, f"unionfs server: {e!r}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


class MountWatch:
    """Wake up as soon as the mount table changes or the server exits.

    The mount table's file reports POLLPRI after any change to it, and a pidfd
    POLLIN when its process exits; `wait(timeout)` returns on either, or after
    `timeout` seconds (the only way left where neither can be opened).
    Open it before looking at the mount table, so that no change is missed.
    """

    def __init__(self, pid):
        self.fds = []
        self.poll = select.poll()
        for opener, events in ((lambda: os.open("/proc/self/mountinfo", os.O_RDONLY),
                                select.POLLPRI),
                               (lambda: os.pidfd_open(pid), select.POLLIN)):
            try:
                fd = opener()
            except (OSError, AttributeError):
                continue
            self.fds.append(fd)
            self.poll.register(fd, events)

    def wait(self, timeout):
        self.poll.poll(timeout * 1000)

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def is_mountpoint(path):
    try:
        return os.lstat(path).st_dev != os.lstat(os.path.dirname(path)).st_dev
    except OSError:
        return False


class UnionStack:
    """Mount a Plan's layers at STATE/root; close() undoes everything it did."""

    def __init__(self, plan):
        self.plan = plan
        self.state_dir = make_state_dir()
        self.mountpoint = os.path.join(self.state_dir, "root")
        self.log_path = os.path.join(self.state_dir, "server.log")
        self.throwaway = plan.upper is None
        if self.throwaway:
            self.upper = os.path.join(self.state_dir, "upper")
            self.work = os.path.join(self.state_dir, "work")
        else:
            self.upper, self.work = plan.upper, plan.work
        self.server_pid = None
        self.mounted = False

    def mount(self):
        os.mkdir(self.mountpoint, 0o755)
        if self.throwaway:
            os.mkdir(self.upper, 0o755)
            os.mkdir(self.work, 0o700)
        program = os.environ.get(MOUNT_PROGRAM_ENV)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # The server's pid is recorded before an interrupt can unwind this frame.
            with signals_blocked():
                self.server_pid = self._start_server(program, log_fd)
        except OSError as e:
            raise UnionError(f"cannot start {program or 'unionfs'}: {e.strerror}") from None
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        delay = 0.0005
        watch = MountWatch(self.server_pid)
        try:
            while True:
                pid, status = os.waitpid(self.server_pid, os.WNOHANG)
                if pid:
                    self.server_pid = None
                    raise UnionError(f"mounting the layers failed: {self._log_tail()}")
                if is_mountpoint(self.mountpoint):
                    self.mounted = True
                    return self.mountpoint
                if time.monotonic() > deadline:
                    raise UnionError(f"the union was not mounted after {MOUNT_TIMEOUT:.0f} s")
                watch.wait(delay)
                delay = min(delay * 2, 0.01)
        finally:
            watch.close()

    def _start_server(self, program, log_fd):
        layers = (self.plan.lowers, self.upper, self.work, self.mountpoint)
        if program:
            argv = mount_program_command(program, *layers)
            return os.posix_spawn(argv[0], argv, os.environ, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ], setsid=True)
        request = server_request(*layers)
        return prestart.claim(request, self.log_path) or _fork_unionfs_server(request, log_fd)

    def _log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "the server exited without a message"

    def _unmount(self):
        """Unmount if the mount table lists our mountpoint (even a dead FUSE mount)."""
        if not is_listed_mountpoint(self.mountpoint):
            return
        if os.geteuid() == 0:
            try:
                libc.umount2(self.mountpoint)
            except OSError:
                libc.umount2(self.mountpoint, libc.MNT_DETACH)
        else:
            for flag in ("-u", "-uz"):
                pid = os.posix_spawnp("fusermount3", ["fusermount3", flag, self.mountpoint],
                                      os.environ)
                if os.waitpid(pid, 0)[1] == 0:
                    break

    def _stop_server(self):
        if self.server_pid is None:
            return
        deadline = time.monotonic() + SERVER_EXIT_TIMEOUT
        sent = None
        while True:
            pid, _ = os.waitpid(self.server_pid, os.WNOHANG)
            if pid:
                self.server_pid = None
                return
            now = time.monotonic()
            if now > deadline and sent is None:
                # A server that does not exit after its unmount is a bug; do
                # not leave it behind.
                sent = signal.SIGTERM
                os.kill(self.server_pid, sent)
                deadline = now + 2.0
            elif now > deadline:
                os.kill(self.server_pid, signal.SIGKILL)
                os.waitpid(self.server_pid, 0)
                self.server_pid = None
                return
            time.sleep(0.001)

    def close(self):
        """Unmount, stop the server, remove the state (or keep the upper).

        Safe on every path: before, during or after mount(), and twice.
        Returns a list of one-line problems (empty when all went well).
        """
        problems = []
        if self.server_pid is not None and not self.mounted:
            # Interrupted before the mount went live: stop the server first.
            os.kill(self.server_pid, signal.SIGTERM)
        try:
            self._unmount()
        except OSError as e:
            problems.append(f"unmount {self.mountpoint}: {e.strerror}")
        self._stop_server()
        self.mounted = False
        if is_listed_mountpoint(self.mountpoint):
            # A server killed mid-start may leave a dead mount; never delete
            # through a mount.
            try:
                libc.umount2(self.mountpoint, libc.MNT_DETACH)
            except OSError as e:
                problems.append(f"{self.mountpoint} is still mounted ({e.strerror})")
                return problems
        if self.plan.keep and self.throwaway:
            for leftover in (self.mountpoint, self.log_path):
                try:
                    (os.rmdir if leftover == self.mountpoint else os.unlink)(leftover)
                except OSError:
                    pass
        else:
            _remove_tree(self.state_dir)
        return problems


def _mountinfo_escape(path):
    return (path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
            .replace("\n", "\\012"))


def is_listed_mountpoint(path):
    """True if the mount table has a mount at `path` (works for dead FUSE mounts too)."""
    wanted = _mountinfo_escape(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ", 5)[4] == wanted for line in f)


def _remove_tree(path):
    """rm -rf without following symlinks (shutil costs ~5 ms to import)."""
    for parent, dirs, files in os.walk(path, topdown=False):
        for name in files + dirs:
            entry = os.path.join(parent, name)
            try:
                if name in dirs and not os.path.islink(entry):
                    os.rmdir(entry)
                else:
                    os.unlink(entry)
            except PermissionError:
                # Containers may leave 0500 directories behind; the owner can fix that.
                try:
                    os.chmod(parent, 0o700)
                    (os.rmdir if name in dirs and not os.path.islink(entry) else os.unlink)(entry)
                except OSError:
                    pass
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass
