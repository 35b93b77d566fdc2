"""PID 1 of the container: start the command, forward signals, reap, report.

A forked Python process, not a new interpreter (saves ~50 ms of start-up).
The command is started with posix_spawn (a vfork and an exec: no second copy
of the Python process). PID 1 forwards SIGINT/SIGTERM/SIGHUP to it, reaps
every zombie re-parented to it, and returns the command's status (128+N if
signal N killed it). When PID 1 exits the kernel kills whatever is left in
the namespace.
"""
import os
import signal

NOT_FOUND_ERRNOS = (2, 20)  # ENOENT, ENOTDIR: as for a shell, 127


class CommandError(Exception):
    """The command could not be started; carries the shell-style status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def find_program(name, path):
    """Candidate paths for `name`, in execvp's order (PATH only without a '/')."""
    if "/" in name:
        return [name]
    return [os.path.join(d or ".", name) for d in path.split(":")]


def spawn_command(argv, env, reset_signals):
    """posix_spawn argv searching env's PATH; raise CommandError (127/126) like a shell."""
    name = argv[0]
    denied = None
    for candidate in find_program(name, env.get("PATH", os.defpath)):
        try:
            os.stat(candidate)  # a failed spawn would use up a pid: look first
            return os.posix_spawn(candidate, argv, env, setsigmask=(),
                                  setsigdef=reset_signals, setpgroup=0)
        except OSError as e:
            if e.errno in NOT_FOUND_ERRNOS:
                continue
            denied = denied or e
            if "/" in name:
                break
    if denied is not None:
        raise CommandError(f"{name}: cannot execute: {denied.strerror}", 126)
    raise CommandError(f"{name}: command not found in the container", 127)


def give_terminal(terminal, group):
    """Make `group` the terminal's foreground process group, as a shell does for a job.

    Then Ctrl-C, Ctrl-Z and terminal reads reach the command alone, never the
    runner (which would take Ctrl-C as "stop the container"). SIGCONT wakes
    the command if it touched the terminal before it owned it.
    """
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(terminal, group)
        os.killpg(group, signal.SIGCONT)
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, previous)


def run_command(spawn, forwarded_signals, terminal=None):
    """Start the command with `spawn()` and watch it; return its status.

    The command runs in a process group of its own; with a `terminal` fd
    that group gets the terminal. Call with `forwarded_signals` blocked: a
    signal that arrives before the command exists is then delivered to it
    instead of being lost.
    """
    command = spawn()
    if terminal is not None:
        give_terminal(terminal, command)

    def forward(signum, frame):
        try:
            os.kill(command, signum)
        except ProcessLookupError:
            pass
    for signum in forwarded_signals:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded_signals)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1  # cannot happen while the command is unreaped
        if pid == command:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)
