"""The layer stack of one run: a private state dir, the union mount and its teardown.

The union is served by a separate server process (a FUSE server must never
run inside the process that uses its mount), started through
unionfs.serve.process: usually the spare spawned at the runner's very start
(runner.prestart), else one spawned when mounting. The runner hands it the
mount (layers, mount point, log file) and waits for its "ready"; after
unmounting it waits for the server to exit (SIGTERM, then SIGKILL, if it
does not), so no server outlives a run. Every step of `close()` is
tolerant, so it can run on any path.

Debugging aid: UNIONFS_RUN_MOUNT_PROGRAM=/usr/bin/fuse-overlayfs (or any
program taking `-f -o lowerdir=..,upperdir=..,workdir=.. MNT`) replaces unionfs;
having no "ready" to say, it is watched until the mount table lists the mount.
"""
import os
import select
import signal
import time

from unionfs.serve import process
from unionfs.sys import mountinfo

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
        for opener, events in ((lambda: os.open(mountinfo.MOUNTINFO, os.O_RDONLY),
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


class DaemonServer:
    """The server a daemon gave the mount: not our child, so its exit is
    watched through a pidfd (process.wait_for_exit), not reaped."""

    def __init__(self, pid):
        self.pid = pid

    def stop(self, mountpoint, timeout):
        """As ServerHandle.stop: unmount, then wait for the exit (SIGTERM,
        then SIGKILL, if it does not come)."""
        problem = None
        try:
            process.unmount_listed(mountpoint)
        except OSError as e:
            problem = e
        for signum, limit in ((signal.SIGTERM, timeout), (signal.SIGKILL, process.KILL_TIMEOUT)):
            if process.wait_for_exit(self.pid, limit):
                break
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                break
        return problem


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
        self.server = None      # a process.ServerHandle, or a DaemonServer
        self.mounted = False

    def mount(self):
        os.mkdir(self.mountpoint, 0o755)
        if self.throwaway:
            os.mkdir(self.upper, 0o755)
            os.mkdir(self.work, 0o700)
        program = os.environ.get(MOUNT_PROGRAM_ENV)
        if program:
            return self._mount_with_program(program)
        from unionfs.serve.config import MountConfig
        cfg = MountConfig(lowers=list(self.plan.lowers), upper=self.upper, work=self.work,
                          mountpoint=self.mountpoint, foreground=True)
        if not self.plan.id_maps and self._mount_through_daemon(cfg):
            return self.mountpoint
        os.close(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        # The server is recorded before an interrupt can unwind this frame.
        with signals_blocked():
            self.server = process.take_spare()
            try:
                if self.server is None:
                    raise process.ServerGone("no spare")
                self.server.send_mount(cfg, self.log_path)
            except process.ServerGone:  # gone or broken: only the speed-up is lost
                try:
                    self.server = process.spawn()
                except OSError as e:
                    raise UnionError(f"cannot start unionfs: {e.strerror}") from None
                try:
                    self.server.send_mount(cfg, self.log_path)
                except process.ServerGone:
                    raise UnionError("the union server exited at its start") from None
        try:
            self.server.wait_ready(MOUNT_TIMEOUT)
        except process.ServerError as e:
            raise UnionError(f"mounting the layers failed: {e}") from None
        self.mounted = True
        return self.mountpoint

    def _mount_through_daemon(self, cfg):
        """Hand the mount to a running daemon's pre-started server (as
        `unionfs mount` does); False if no daemon answers. Not with
        subordinate ids: that server must be forked inside their namespace.
        UNIONFS_NO_DAEMON=1 skips the daemon, as it does for `unionfs mount`."""
        if os.environ.get("UNIONFS_NO_DAEMON") == "1":
            return False
        from unionfs.daemon import client, fusemount
        from unionfs.serve.validate import MountError
        try:
            with signals_blocked():
                answer = client.mount(cfg)
                if answer is not None:
                    self.server = DaemonServer(answer["pid"])
                    self.mounted = True
        except (client.DaemonError, fusemount.FuseMountError, MountError) as e:
            raise UnionError(f"mounting the layers failed: {e}") from None
        if answer is None:
            return False
        process.discard_spare()     # started early in case no daemon would answer
        return True

    def _mount_with_program(self, program):
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        argv = mount_program_command(program, self.plan.lowers, self.upper, self.work,
                                     self.mountpoint)
        try:
            with signals_blocked():
                pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ], setsid=True)
                self.server = process.ServerHandle(pid, None)
        except OSError as e:
            raise UnionError(f"cannot start {program}: {e.strerror}") from None
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        delay = 0.0005
        watch = MountWatch(pid)
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.server.status = status
                    raise UnionError(f"mounting the layers failed: {self._log_tail()}")
                if mountinfo.is_mountpoint(self.mountpoint):
                    self.server.ready = self.mounted = True
                    return self.mountpoint
                if time.monotonic() > deadline:
                    raise UnionError(f"the union was not mounted after {MOUNT_TIMEOUT:.0f} s")
                watch.wait(delay)
                delay = min(delay * 2, 0.01)
        finally:
            watch.close()

    def _log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "the server exited without a message"

    def close(self):
        """Unmount, stop the server, remove the state (or keep the upper).

        Safe on every path: before, during or after mount(), and twice.
        Returns a list of one-line problems (empty when all went well).
        """
        problems = []
        if self.server is not None:
            # Unmounts (a server that never got mounted is told SIGTERM first),
            # then waits for the exit, with SIGTERM and SIGKILL for one that stays.
            problem = self.server.stop(self.mountpoint, SERVER_EXIT_TIMEOUT)
            self.server = None
            if problem is not None:
                problems.append(f"unmount {self.mountpoint}: {problem.strerror}")
        self.mounted = False
        try:
            # A server killed mid-start may leave a dead mount; never delete
            # through a mount.
            process.unmount_listed(self.mountpoint)
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
