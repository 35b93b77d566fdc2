"""Start the union server's process at the very start of `unionfs run`.

The server spends most of its start-up importing pyfuse3 and trio (~100 ms,
more than the runner's whole start-up). `unionfs.cli` calls `maybe_start()`
first thing, before even click is imported: when the command line asks for
a layer stack, it forks a child that imports the server's modules while the
runner loads its own and checks the options. Nothing is mounted or created
until the runner has a valid plan and its state dir: it then `claim()`s the
child, sending it what to mount and where to log, over a pipe; from there on
the child is exactly the server `runner.union` would have forked, owned the
same way. This is one run's process, not a daemon: no state is kept between
runs, and nothing is started unless this very command needs it.

Unclaimed (a usage error, --help, an interrupt, the runner called in-process
without it), the child is killed and reaped by `discard()`, which runs from
the runner's exit paths and from atexit; should the runner die before that,
the child gets SIGTERM (PR_SET_PDEATHSIG). A child that is gone or broken
when claimed only costs the speed-up: `claim()` returns None and the runner
forks a server the ordinary way.

Only os and sys in the runner's process: this runs before anything else.
"""
import os
import sys

# pid and the write end of the request pipe of the child not claimed yet
_pending = None


def is_console_run(argv=None):
    """True in the `unionfs run ...` console-script process."""
    argv = sys.argv if argv is None else argv
    return len(argv) > 1 and os.path.basename(argv[0]) == "unionfs" and argv[1] == "run"


def wanted(args, environ=None):
    """Will `unionfs run ARGS` mount a union with a unionfs server?

    A quick look at the options, no parsing: a wrong guess only costs (or
    fails to gain) speed, since the plan is checked as always and an
    unclaimed child is discarded.
    """
    environ = os.environ if environ is None else environ
    if environ.get("UNIONFS_RUN_MOUNT_PROGRAM"):
        return False
    lower = False
    for arg in args:
        if arg == "--":
            break
        if arg == "--help" or arg.startswith("--rootfs"):
            return False
        if arg == "--lower" or arg.startswith("--lower="):
            lower = True
    return lower


def maybe_start():
    """Fork the server-to-be if this process is `unionfs run` on a layer stack."""
    if _pending is None and is_console_run() and wanted(sys.argv[2:]):
        start()


def start():
    global _pending
    import atexit
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        _child(read_fd, parent)  # never returns
    os.close(read_fd)
    _pending = (pid, write_fd)
    atexit.register(discard)


def claim(request, log_path):
    """Hand `request` (see runner.union.server_request) to the waiting child.

    Returns its pid (the caller now owns it, as a forked server), or None when
    there is no usable child.
    """
    global _pending
    if _pending is None:
        return None
    pid, write_fd = _pending
    _pending = None
    message = "\0".join([log_path, *request]).encode(errors="surrogateescape")
    try:
        while message:
            message = message[os.write(write_fd, message):]
    except OSError:  # the child is gone (EPIPE): start a server the ordinary way
        _kill_and_reap(pid)
        return None
    finally:
        os.close(write_fd)
    return pid


def discard():
    """Kill and reap a child that was not claimed (idempotent)."""
    global _pending
    if _pending is None:
        return
    pid, write_fd = _pending
    _pending = None
    os.close(write_fd)
    _kill_and_reap(pid)


def _kill_and_reap(pid):
    import signal
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _child(read_fd, parent):
    from .union import exit_child
    exit_child(lambda: _serve_when_claimed(read_fd, parent))


def _serve_when_claimed(read_fd, parent):
    os.setsid()  # the terminal's Ctrl-C is for the container, not the server
    import signal

    from . import union  # before PDEATHSIG: runner.libc has prctl
    union.libc.prctl(union.libc.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return 1
    union.become_server_process()
    # Until it is claimed there is no log: keep what the imports print.
    early = os.memfd_create("unionfs-server-early")
    os.dup2(early, 1)
    os.dup2(early, 2)
    failure = None
    try:
        union.import_server_modules()
    except BaseException as e:  # noqa: BLE001 - reported in the log once claimed
        failure = e
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    if not chunks:
        return 0  # not claimed
    log_path, *request = b"".join(chunks).decode(errors="surrogateescape").split("\0")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.lseek(early, 0, os.SEEK_SET)
    while data := os.read(early, 65536):
        os.write(log_fd, data)
    os.close(early)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    if failure is not None:
        raise failure
    return union.serve(request)
