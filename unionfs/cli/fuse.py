"""`fuse-unionfs`: fuse-overlayfs's command line (mount -t fuse.fuse-unionfs,
/etc/fstab, podman's mount_program), parsed by hand: `-o` may come before or
after the positional arguments, and click is not needed."""
import sys

FUSE_USAGE = """\
usage: fuse-unionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,upperdir=U,workdir=W][,OPTS] [-f] [-d]

A drop-in for fuse-overlayfs's command line (mount -t fuse.fuse-unionfs, /etc/fstab,
podman's mount_program).
"""


def _version() -> str:
    from importlib.metadata import version
    return version("unionfs")


def parse(argv):
    """argv -> MountConfig; exits for --help and --version; OptionError if wrong."""
    from ..serve.config import MountConfig, OptionError, apply_options
    cfg = MountConfig()
    positional = []
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
            raise OptionError(f"unknown argument '{arg}'")
        else:
            positional.append(arg)
    if len(positional) == 2:
        cfg.source, cfg.mountpoint = positional
    elif len(positional) == 1:
        cfg.mountpoint = positional[0]
    else:
        raise OptionError("expected [SOURCE] MOUNTPOINT")
    return cfg


def fuse_main(argv=None) -> None:
    from ..serve.config import OptionError
    from . import mount_and_exit
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse(argv)
    except OptionError as e:
        print(f"fuse-unionfs: {e} (see fuse-unionfs --help)", file=sys.stderr)
        sys.exit(2)
    mount_and_exit(cfg)
