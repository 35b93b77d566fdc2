"""The container's side of a run: namespaces, the new root, and the command's exec.

Process tree (no new interpreter anywhere: Python forks, then one posix_spawn):

    runner --fork--> keeper --fork--> init (PID 1) --posix_spawn--> command

- keeper: unshares the namespaces (a user namespace too when rootless with one id
  mapped; with subordinate ids the runner made it already, runner.subids), makes
  every mount private, forks init, forwards signals to it and exits with its
  status. It exists because unshare(CLONE_NEWPID) only puts *children* in
  the new PID namespace, while the runner must stay in the mount namespace
  where the union is mounted (the host's, or its own with subordinate ids)
  to unmount it afterwards.
- init: builds the root (the plan's mount operations, runner.mounts), then
  runs runner.init's PID 1 loop.
- command: started by init with posix_spawn after init dropped to the
  requested uid/gid and working dir; a failed exec becomes 127 (not found) or
  126 (not executable) with a one-line message.

Both keeper and init die with their parent (PR_SET_PDEATHSIG), so killing the
keeper with SIGKILL takes the whole PID namespace down.

Only os, signal and the small libc module are used here: this is the start-up
path.
"""
import os
import signal

from unionfs.sys import libc

from . import init as pid1
from . import mounts

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Sent by the runner to the keeper: kill the container now (PID 1 with SIGKILL,
# which takes the whole PID namespace down); the keeper still reaps it.
KILL_SIGNAL = signal.SIGUSR1
BLOCKED_AROUND_FORK = (*FORWARDED_SIGNALS, KILL_SIGNAL)
# After forwarding a signal the keeper waits this long for the command to
# exit, then kills PID 1.
GRACE_SECONDS = 10
SETUP_FAILED = 1
# The capabilities a container's root keeps (docker's default set): enough to
# own files, switch users and bind low ports; not enough to load modules,
# mount, trace, set the clock or change the hostname.
CONTAINER_CAPABILITIES = frozenset({
    0,   # CHOWN
    1,   # DAC_OVERRIDE
    3,   # FOWNER
    4,   # FSETID
    5,   # KILL
    6,   # SETGID
    7,   # SETUID
    8,   # SETPCAP
    10,  # NET_BIND_SERVICE
    13,  # NET_RAW
    18,  # SYS_CHROOT
    27,  # MKNOD
    29,  # AUDIT_WRITE
    31,  # SETFCAP
})


def say(message):
    os.write(2, f"unionfs run: {message}\n".encode(errors="replace"))


def exit_code_of(status):
    """A wait status as a shell would report it: code, or 128+N for signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def start(plan, root, terminal=None):
    """Fork the keeper; return its pid. Call with BLOCKED_AROUND_FORK blocked.

    `terminal`: an fd of the controlling terminal when the runner is in its
    foreground; the command then gets the terminal (see runner.init).
    """
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        status = _keeper(plan, root, parent, terminal)
    except BaseException as e:  # never return into the runner's code
        say(f"cannot create the container: {_describe(e)}")
        status = SETUP_FAILED
    os._exit(status)


def _describe(error):
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}"
    return str(error) or type(error).__name__


def _die_with_parent(parent):
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(SETUP_FAILED)


def _keeper(plan, root, parent, terminal):
    _die_with_parent(parent)
    host_uid, host_gid = os.geteuid(), os.getegid()
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC
    if plan.net == "none":
        flags |= libc.CLONE_NEWNET
    single_id = plan.rootless and not plan.id_maps  # else the runner made the user ns
    if single_id:
        flags |= libc.CLONE_NEWUSER
        # A process that dropped root without exec'ing is not dumpable, and
        # then may not write its own /proc/self/uid_map.
        libc.prctl(libc.PR_SET_DUMPABLE, 1)
    libc.unshare(flags)
    if single_id:
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{plan.uid} {host_uid} 1")
        _write_file("/proc/self/gid_map", f"{plan.gid} {host_gid} 1")
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    # Only the keeper holds the write end: init sees it hang up once the keeper is gone.
    keeper_alive, keeper_alive_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        try:
            os.close(keeper_alive_w)
            # The keeper is outside our PID namespace: getppid() is 0 whether it
            # lives or not, so its pipe tells whether it died before this.
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
            _exit_if_keeper_gone(keeper_alive)
            status = _init(plan, root, terminal, keeper_alive)
        except BaseException as e:
            say(f"cannot create the container: {_describe(e)}")
            status = SETUP_FAILED
        os._exit(status)
    os.close(keeper_alive)

    def forward(signum, frame):
        if signum in (KILL_SIGNAL, signal.SIGALRM):
            os.kill(child, signal.SIGKILL)
            return
        os.kill(child, signum)
        signal.alarm(GRACE_SECONDS)
    for signum in (*BLOCKED_AROUND_FORK, signal.SIGALRM):
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED_AROUND_FORK)
    _, status = os.waitpid(child, 0)
    return exit_code_of(status)


def _write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _init(plan, root, terminal, keeper_alive):
    """PID 1: build the root, then start and watch the command."""
    if plan.net == "none":
        loopback_up()
    setup_root(plan, root)
    libc.sethostname(plan.hostname)
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    _mkdirs(plan.cwd)
    _limit_capabilities()
    try:
        _drop_privileges(plan)
    except OSError as e:
        say(f"cannot prepare the command: {_describe(e)}")
        return SETUP_FAILED
    _die_with_keeper(keeper_alive)
    return pid1.run_command(lambda: _spawn_command(plan), FORWARDED_SIGNALS, terminal)


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up():
    """Bring `lo` up in the new network namespace (it starts down: 127.0.0.1
    would be unreachable), as docker's and podman's `--network none` do."""
    import fcntl
    import socket
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifreq)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _limit_capabilities():
    """Shrink the bounding set: the command's root gets CONTAINER_CAPABILITIES only."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in CONTAINER_CAPABILITIES:
            libc.prctl(libc.PR_CAPBSET_DROP, cap)


def _mkdirs(path, mode=0o755):
    try:
        os.makedirs(path, mode, exist_ok=True)
    except FileExistsError:
        pass


def setup_root(plan, root):
    """Switch to `root` with the container's mounts: the plan's operations
    (runner.mounts: /proc, /sys, /dev, /tmp, the volumes, the switch itself)."""
    mounts.carry_out(plan.mounts, root, say)


# Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec; the
# command must start with every signal at its default and none blocked.
RESET_SIGNALS = (*BLOCKED_AROUND_FORK, signal.SIGPIPE, signal.SIGXFSZ)


def _die_with_keeper(keeper_alive):
    """After a change of user: the kernel clears PR_SET_PDEATHSIG whenever a
    process's credentials change, so set it again, then make sure the keeper
    did not die before it was set (its pipe would have hung up)."""
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    _exit_if_keeper_gone(keeper_alive)
    os.close(keeper_alive)


def _exit_if_keeper_gone(keeper_alive):
    """Only the keeper holds the pipe's write end: a hang-up means it is gone."""
    import select
    poller = select.poll()
    poller.register(keeper_alive, select.POLLIN)
    if poller.poll(0):
        os._exit(SETUP_FAILED)


def _drop_privileges(plan):
    """PID 1 itself becomes the command's user: it needs no privilege after setup."""
    if not plan.rootless or plan.id_maps:
        os.setgroups(list(plan.groups))  # a user namespace of one gid has no others
    os.setgid(plan.gid)
    os.setuid(plan.uid)
    os.chdir(plan.cwd)


def _spawn_command(plan):
    try:
        return pid1.spawn_command(list(plan.argv), plan.environ, RESET_SIGNALS)
    except pid1.CommandError as e:
        say(str(e))
        os._exit(e.status)
