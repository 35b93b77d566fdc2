"""`fuse-unionfs`: fuse-overlayfs's command line (mount -t fuse.fuse-unionfs,
/etc/fstab, podman's mount_program), parsed by hand: `-o` may come before or
after the positional arguments, and click is not needed."""
import sys

FUSE_USAGE = """\
usage: fuse-unionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B[,upperdir=U,workdir=W][,OPTS] [-f] [-d]

A drop-in for fuse-overlayfs's command line (mount -t fuse.fuse-unionfs, /etc/fstab,
podman's mount_program). It returns once the mount is live; a unionfs daemon, if one
answers, serves it (unionfs daemon), else a server of its own does.

layers:
  lowerdir=A:B:C        read-only layers, top first (':' separates, '\\:' is a colon,
                        '::' starts data-only layers)
  upperdir=U            the writable layer (without it: read-only, EROFS on writes)
  workdir=W             scratch space on U's filesystem (W/work is emptied at mount)
behaviour:
  volatile              no fsync of copy-ups
  metacopy=on|off       copy metadata only on chmod/chown/utimes/xattr changes
  whiteout=kernel|oci   the marker format written in the upper (default: what the
                        server may write: the kernel's, userxattr in a user namespace,
                        OCI .wh. files otherwise)
  userxattr             keep markers and bookkeeping in user.* xattrs
  redirect_dir=on|follow|nofollow|off   rename lower directories by a redirect (on),
                        follow redirects without making them (follow), refuse them
                        (nofollow); default off: the kernel's (docs/redirect.md)
ownership (fuse-overlayfs's meaning; see docs/rootless.md):
  uidmapping=C:H:N[:C:H:N...]   gidmapping=...   owners shown and stored through maps
  squash_to_root  squash_to_uid=N  squash_to_gid=N   show every owner as one id
  xattr_permissions=1|2   keep owners and modes in an override_stat xattr
  noacl   static_nlink   noxattrs=1
mount flags: rw ro dev nodev suid nosuid exec noexec atime noatime relatime
  strictatime lazytime sync async dirsync ...; nodev and noatime unless told otherwise,
  as fuse-overlayfs; x-* and comment= are ignored, and so are fuse-overlayfs's options
  that change nothing here.
  subtype=NAME          the mount's type is fuse.NAME (default fuse.fuse-unionfs)
other: -f  stay in the foreground;  -d  log every request (implies -f);
  -V, --version;  -h, --help.  The manual page: man fuse-unionfs.
"""


def _version() -> str:
    from importlib.metadata import version
    return version("unionfs")


def parse(argv):
    """argv -> MountConfig; exits for --help and --version; OptionError if wrong."""
    from ..serve.config import MountConfig, OptionError, apply_options
    # fuse-overlayfs's defaults: type fuse.fuse-overlayfs (here fuse.fuse-unionfs,
    # so `findmnt -t` and `umount -t` find it), source its name, nodev, noatime
    cfg = MountConfig(source="fuse-unionfs", subtype="fuse-unionfs")
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
    if not {"dev", "nodev"} & set(cfg.flags):
        cfg.flags.append("nodev")
    if not {"atime", "noatime", "relatime", "strictatime"} & set(cfg.flags):
        cfg.flags.append("noatime")
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
