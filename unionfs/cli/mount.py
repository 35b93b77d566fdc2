"""`unionfs mount` and `unionfs umount`."""
import sys

import click

from . import mount_and_exit


@click.command("mount")
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
def mount(lowers, upper, work, options, foreground, debug, mountpoint):
    """Mount a layer stack at MOUNTPOINT; returns once the mount is live."""
    from ..serve.config import MountConfig, OptionError, apply_options
    cfg = MountConfig(lowers=list(lowers), upper=upper, work=work, mountpoint=mountpoint,
                      foreground=foreground, debug=debug)
    try:
        for text in options:
            apply_options(cfg, text)
    except OptionError as e:
        print(f"unionfs mount: {e}", file=sys.stderr)   # one line, unlike click's usage
        sys.exit(2)
    mount_and_exit(cfg)


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
def umount(mountpoint):
    """Unmount a unionfs mount; returns once its server has exited."""
    from ..serve.process import ServerError, unmount_and_wait
    try:
        unmount_and_wait(mountpoint)
    except ServerError as e:
        click.echo(str(e), err=True)
        sys.exit(1)
