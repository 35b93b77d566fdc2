"""The command line: the `unionfs` group, its table of subcommands, and `fuse-unionfs`.

Every subcommand lives in a module of its own, imported only when it is the
one asked for, so that a command loads nothing it does not need (click
itself is not imported by `fuse-unionfs`). An entry whose module (or
attribute) is missing is simply absent: `unionfs --help` does not list it and
`unionfs NAME` says there is no such command. User errors print one line
and exit 2 (usage) or 1 (everything else).

`unionfs run --lower ...` forks its union server's process first thing,
before click is imported, so that the server's ~100 ms of imports overlap the
runner's start-up (runner.prestart).
"""
import sys

IMAGE_COMMANDS = ("pull", "push", "load", "save", "commit", "images", "image", "ps", "rm")
DAEMON_COMMANDS = ("daemon", "stats", "which", "events")
COMMANDS = {
    "mount": "unionfs.cli.mount:mount",
    "umount": "unionfs.cli.mount:umount",
    "run": "unionfs.cli.run:run",
    "bench": "bench.cli:bench",
    **{name: f"unionfs.cli.image:{name}" for name in IMAGE_COMMANDS},
    **{name: f"unionfs.cli.daemon:{name}" for name in DAEMON_COMMANDS},
}


def load_command(name):
    """The click command for `name`, or None if it is not installed."""
    import importlib
    module_name, _, attr = COMMANDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Absent only if the missing module is the command's own (or its
        # package): a module it imports that is missing is a real error.
        if e.name is None or not (module_name == e.name
                                  or module_name.startswith(e.name + ".")):
            raise
        return None
    return getattr(module, attr, None)


def is_installed(name):
    """Does the command's module exist? (Found without importing it.)"""
    import importlib.util
    module_name = COMMANDS[name].partition(":")[0]
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # its package is missing
        return False


def command_group():
    """The `unionfs` click group (click is imported here, not at load)."""
    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx):
            return sorted(name for name in COMMANDS if is_installed(name))

        def get_command(self, ctx, name):
            return load_command(name) if name in COMMANDS else None

    @click.group(cls=LazyGroup)
    @click.version_option(package_name="unionfs")
    def unionfs():
        """unionfs: a layered (union) filesystem in userspace."""
    return unionfs


def main(args=None):
    """The `unionfs` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["run"]:
        try:
            from runner import prestart
        except ModuleNotFoundError:  # the runner is not installed
            pass
        else:
            prestart.maybe_start()
    command_group().main(args=argv, prog_name="unionfs")


def mount_and_exit(cfg):
    """`unionfs mount` and `fuse-unionfs`: mount `cfg` and exit with its status;
    a problem is one line on stderr and status 1. A mount that returns once
    live goes through the daemon when one answers (its pre-started servers
    are ready; unionfs.daemon.client), else gets a server of its own
    (unionfs.serve.process.start). UNIONFS_NO_DAEMON=1 skips the daemon."""
    import os

    from ..serve.validate import MountError
    if not cfg.foreground and os.environ.get("UNIONFS_NO_DAEMON") != "1":
        from ..daemon import client
        from ..daemon.fusemount import FuseMountError
        try:
            if client.mount(cfg) is not None:
                sys.exit(0)
        except MountError as e:
            print(f"unionfs: {e}", file=sys.stderr)
            sys.exit(1)
        except (client.DaemonError, FuseMountError) as e:
            print(e, file=sys.stderr)
            sys.exit(1)
        except OSError as e:
            print(f"unionfs: {e.strerror}: {e.filename or cfg.mountpoint}", file=sys.stderr)
            sys.exit(1)
    from ..serve.process import ServerError, start
    try:
        status = start(cfg)
    except MountError as e:
        print(f"unionfs: {e}", file=sys.stderr)
        sys.exit(1)
    except ServerError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    sys.exit(status)


def fuse_main(argv=None):
    """The `fuse-unionfs` console script (fuse-overlayfs's command line)."""
    from .fuse import fuse_main
    fuse_main(argv)
