"""The runner's early fork: start the union server's process before click is imported.

A server spends most of its start-up importing pyfuse3 and trio (~100 ms,
more than the runner's whole start-up). `unionfs.cli.main` calls
`maybe_start()` first thing when its command is `run`: if the command line
asks for a layer stack or an image, a server process is spawned now
(unionfs.serve.process.start_spare) and imports while the runner loads its
own modules and checks the options. Nothing is mounted or created until the
runner has a valid plan and its state dir; runner.union then takes the spare
and gives it its mount, and owns it as any server it spawned. This is one
run's process, not a daemon: nothing is kept between runs, and nothing is
started unless this very command needs it.

Not taken (a usage error, --help, --dry-run, an interrupt, the runner called
in-process), the spare is killed and reaped (process.discard_spare, from the
command's exit paths and atexit); should the runner die first, the spare
gets SIGTERM (PR_SET_PDEATHSIG). A spare that is gone when taken only costs
the speed-up: the runner spawns a server the ordinary way. With a daemon
listening no spare is started: the daemon's pre-started servers serve runs
too (runner.union).

Only os and sys here (and unionfs.serve.process and unionfs.daemon.paths,
which import no more): this runs before anything else.
"""
import os
import sys


def is_console_run(argv=None):
    """True in the `unionfs run ...` console-script process."""
    argv = sys.argv if argv is None else argv
    return len(argv) > 1 and os.path.basename(argv[0]) == "unionfs" and argv[1] == "run"


# Options of `unionfs run` that take a value as the next argument (for the
# guess below; the `--opt=value` and `-eVALUE` forms are one argument anyway).
VALUE_OPTIONS = frozenset({
    "--lower", "--upper", "--work", "--rootfs", "--name", "--entrypoint", "--pull", "--creds",
    "--platform", "--store", "--hostname", "-e", "--env", "-w", "--workdir", "-u", "--user",
    "--net", "-v", "--volume"})


def wanted(args, environ=None):
    """Will `unionfs run ARGS` mount a union with a unionfs server?

    Yes for a layer stack (`--lower`) and for an image (a first argument that
    is not an option: the server is forked now all the same, and given the
    image's layers once the runner knows them). A quick look at the
    options, no parsing: a wrong guess only costs (or fails to gain) speed,
    since the plan is checked as always and a spare nobody takes is
    discarded.
    """
    environ = os.environ if environ is None else environ
    if environ.get("UNIONFS_RUN_MOUNT_PROGRAM"):
        return False
    lower = False
    args = iter(args)
    for arg in args:
        if arg == "--":
            following = next(args, None)    # the image, unless --lower came first
            return lower or (following is not None and not following.startswith("-"))
        if arg in ("--help", "--dry-run") or arg.startswith("--rootfs"):
            return False
        if arg == "--lower" or arg.startswith("--lower="):
            lower = True
        if not arg.startswith("-"):
            return True             # the image (or, after --lower, the command)
        if arg in VALUE_OPTIONS:
            next(args, None)
    return lower


def maybe_start():
    """Spawn the server-to-be if this process is `unionfs run` on a layer stack
    or an image."""
    if is_console_run() and wanted(sys.argv[2:]) and not daemon_listening():
        from unionfs.serve import process
        process.start_spare()


def daemon_listening():
    """Does a daemon's mount socket exist? Then runner.union hands the mount
    to one of its pre-started servers, and a spare of our own would only
    take CPU from the start-up (a stale socket only costs that speed-up)."""
    if os.environ.get("UNIONFS_NO_DAEMON") == "1":
        return False
    from unionfs.daemon import paths
    try:
        return os.path.exists(paths.mount_socket(paths.default_socket()))
    except paths.NoRuntimeDir:
        return False
