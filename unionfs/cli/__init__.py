"""Command line: `unionfs mount|umount|run|bench` and the `fuse-unionfs` drop-in.

Subcommands that pull in heavy modules (the runner, the benchmark suite) are
loaded lazily, so that `fuse-unionfs` and `unionfs mount` start fast. User
errors print one line and exit 2 (usage) or 1 (everything else).
"""
import importlib
import sys

try:
    from runner import prestart
except ImportError:  # the runner is not installed
    pass
else:
    # `unionfs run` on layers: start the union server's process now, so that
    # its imports overlap ours (runner/prestart.py). Does nothing otherwise.
    prestart.maybe_start()

import click  # noqa: E402 - after the server's process is started

# unionfs.options (with dataclasses) is imported where it is used: `unionfs run`
# does not need it.

LAZY_COMMANDS = {
    "run": "runner.cli:run",
    "bench": "bench.cli:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                return None     # that part is not installed
        return super().get_command(ctx, name)


def _version() -> str:
    from importlib.metadata import version
    return version("unionfs")


@click.group(cls=LazyGroup)
@click.version_option(package_name="unionfs")
def main():
    """unionfs: a layered (union) filesystem in userspace."""


def _start(cfg) -> None:
    from ..serve.mount import MountError, start
    try:
        status = start(cfg)
    except MountError as e:
        click.echo(f"unionfs: {e}", err=True)
        sys.exit(1)
    sys.exit(status)


@main.command("mount")
@click.option("--lower", "lowers", multiple=True, metavar="DIR",
              help="A read-only layer; repeat, top layer first.")
@click.option("--upper", metavar="DIR", help="The writable layer.")
@click.option("--work", metavar="DIR", help="Scratch dir on the upper's filesystem.")
@click.option("-o", "options", multiple=True, metavar="OPTS",
              help="Comma-separated options, fuse-overlayfs style "
                   "(lowerdir=A:B,upperdir=U,workdir=W,volatile,whiteout=oci,ro,...).")
@click.option("-f", "--foreground", is_flag=True, help="Serve in the foreground.")
@click.option("--debug", is_flag=True, help="Log every request (implies nothing else).")
@click.argument("mountpoint", type=click.Path())
def mount_cmd(lowers, upper, work, options, foreground, debug, mountpoint):
    """Mount a layer stack at MOUNTPOINT; returns once the mount is live."""
    from ..serve.options import MountConfig, OptionError, apply_options
    cfg = MountConfig(lowers=list(lowers), upper=upper, work=work, mountpoint=mountpoint,
                      foreground=foreground, debug=debug)
    try:
        for text in options:
            apply_options(cfg, text)
    except OptionError as e:
        raise click.UsageError(str(e)) from None
    _start(cfg)


@main.command("umount")
@click.argument("mountpoint", type=click.Path())
def umount_cmd(mountpoint):
    """Unmount a unionfs mount (the server then exits)."""
    from ..serve.mount import MountError, unmount
    try:
        unmount(mountpoint)
    except MountError as e:
        click.echo(f"unionfs: {e}", err=True)
        sys.exit(1)


FUSE_USAGE = """\
usage: fuse-unionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,upperdir=U,workdir=W][,OPTS] [-f] [-d]

A drop-in for fuse-overlayfs's command line (mount -t fuse.fuse-unionfs, /etc/fstab,
podman's mount_program).
"""


def fuse_main(argv=None) -> None:
    """`fuse-unionfs`: fuse-overlayfs's argument conventions, parsed by hand
    because `-o` may come before or after the positional arguments."""
    from ..serve.options import MountConfig, OptionError, apply_options
    argv = sys.argv[1:] if argv is None else argv
    cfg = MountConfig()
    positional = []
    try:
        it = iter(argv)
        for arg in it:
            if arg in ("-h", "--help"):
                print(FUSE_USAGE, end="")
                sys.exit(0)
            elif arg in ("-V", "--version"):
                print(f"fuse-unionfs: version {_version()}")
                print("unionfs: a fuse-overlayfs-compatible union filesystem")
                sys.exit(0)
            elif arg == "-f":
                cfg.foreground = True
            elif arg == "-d":
                cfg.debug = cfg.foreground = True
            elif arg == "-o":
                value = next(it, None)
                if value is None:
                    raise OptionError("-o needs an argument")
                apply_options(cfg, value)
            elif arg.startswith("-o"):
                apply_options(cfg, arg[2:])
            elif arg.startswith("-") and arg != "-":
                raise OptionError(f"unknown argument {arg!r}")
            else:
                positional.append(arg)
        if len(positional) == 2:
            cfg.source, cfg.mountpoint = positional
        elif len(positional) == 1:
            cfg.mountpoint = positional[0]
        else:
            raise OptionError("expected [SOURCE] MOUNTPOINT")
    except OptionError as e:
        print(f"fuse-unionfs: {e}", file=sys.stderr)
        print(FUSE_USAGE.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    _start(cfg)
