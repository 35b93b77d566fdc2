"""One run, start to finish: mount the stack, start the sandbox, wait, tear down.

Signals to the runner (SIGINT/SIGTERM/SIGHUP) go to the container's PID 1,
which forwards them to the command; a second signal, or
sandbox.GRACE_SECONDS without an exit, kills the whole PID namespace. The
timer lives in the keeper, not here: the runner may run inside a process
that owns SIGALRM (a test runner, the benchmark). Teardown (unmount, server
exit, state removal) runs in a `finally`, so it happens on every path the
runner survives.
"""
import os
import signal
import sys

from . import sandbox
from .union import UnionError, UnionStack, signals_blocked


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class RunError(RuntimeError):
    """The run could not be carried out (one line)."""


def foreground_terminal():
    """fd 0 if it is our controlling terminal and we are its foreground job, else None."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return 0
    except OSError:
        pass
    return None


def take_back_terminal(terminal):
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(terminal, os.getpgrp())
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, previous)


def execute(plan, announce=None, container=None):
    """Run `plan`; return the command's exit status (shell convention).

    `announce(message)` receives notices for the user (kept upper dir).
    `container`, if given (runner.image.ContainerRun), is opened first (it
    gives the upper and work dirs: `open()` -> {"upper": .., "work": ..,
    "container": ..}) and closed with the status (None if the command never
    ran) after the teardown; both with signals held back, so that a
    container never exists without its run.
    """
    keeper = None
    keeper_reaped = False
    forwarded = []
    interrupted = []
    status = None

    def on_signal(signum, frame):
        if keeper is None:
            if interrupted:
                return  # already on the way out; never cut the teardown short
            interrupted.append(signum)
            raise Interrupted(signum)
        if keeper_reaped:
            return  # its pid may belong to someone else by now
        if forwarded:
            os.kill(keeper, sandbox.KILL_SIGNAL)
            return
        forwarded.append(signum)
        os.kill(keeper, signum)  # the keeper kills PID 1 after its grace period

    previous = {}
    stack = None
    terminal = None
    opened = False
    try:
        # inside the try: a signal right after its handler is set is an Interrupted too
        for signum in sandbox.FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
        if plan.rootless and plan.id_maps:
            _enter_subid_namespace(plan)
        if container is not None:
            with signals_blocked(sandbox.FORWARDED_SIGNALS):
                changes = container.open()
                opened = True
            plan = plan.replace(**changes)
        if plan.rootfs is not None:
            root = plan.rootfs
        else:
            with signals_blocked(sandbox.FORWARDED_SIGNALS):  # no state dir without owner
                stack = UnionStack(plan)
            root = stack.mount()
        if plan.user is not None:
            plan = _look_up_user(plan, root)
        sys.stdout.flush()
        sys.stderr.flush()
        terminal = foreground_terminal()
        signal.pthread_sigmask(signal.SIG_BLOCK, sandbox.BLOCKED_AROUND_FORK)
        try:
            keeper = sandbox.start(plan, root, terminal)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sandbox.BLOCKED_AROUND_FORK)
        _, wait_status = os.waitpid(keeper, 0)
        keeper_reaped = True
        status = sandbox.exit_code_of(wait_status)
        return status
    except Interrupted as e:
        return 128 + e.signum
    except UnionError as e:
        raise RunError(str(e)) from None
    finally:
        if terminal is not None:
            take_back_terminal(terminal)
        if stack is not None:
            with signals_blocked(sandbox.FORWARDED_SIGNALS):
                problems = stack.close()
            for problem in problems:
                sandbox.say(problem)
            if plan.keep and stack.throwaway and not problems and announce:
                announce(f"kept the upper layer in {stack.upper} (work dir {stack.work})")
        if opened:
            with signals_blocked(sandbox.FORWARDED_SIGNALS):
                for problem in container.close(status if keeper_reaped else None):
                    sandbox.say(problem)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _look_up_user(plan, root):
    """The plan with its user's uid, gid, groups (and HOME) from the container's
    own /etc/passwd and /etc/group, read through the mounted root."""
    from .users import UserError, resolve_in_root
    try:
        uid, gid, groups, home = resolve_in_root(*plan.user, root)
    except UserError as e:
        raise RunError(str(e)) from None
    env = plan.env
    if not any(key == "HOME" for key, _ in env):
        env += (("HOME", home or "/"),)
    single_id = plan.rootless and not plan.id_maps
    return plan.replace(uid=uid, gid=gid, groups=() if single_id else groups, user=None,
                        env=env)


def _enter_subid_namespace(plan):
    """The runner (and the union server it forks from now on) moves into a
    user namespace with the caller's subordinate ids (runner.subids). The
    spare server started at the runner's start lives outside it: it goes."""
    from unionfs.serve import process

    from .subids import SubidError, enter
    process.discard_spare()
    try:
        enter(*plan.id_maps)
    except (SubidError, OSError) as e:
        raise RunError(str(e) if isinstance(e, SubidError) else
                       f"cannot enter a user namespace: {e.strerror}") from None
