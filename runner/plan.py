"""What a run will do, as pure data: options checked and turned into a Plan.

Nothing here touches the kernel. Every problem found is a PlanError with a
one-line message, raised before anything is mounted or started, so that a bad
option never leaves a mount or a process behind.
"""
import os

from unionfs.sys.capabilities import is_privileged

from .mounts import container_mounts
from .records import Record

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORK_MODES = ("none", "host")


class PlanError(ValueError):
    """A bad option or argument (one line)."""


class Volume(Record):
    """A host path bind-mounted into the container."""

    __slots__ = ("source", "target", "read_only", "is_dir")
    # source: absolute host path; target: absolute path inside the container
    _defaults = {"read_only": False, "is_dir": True}

    def __init__(self, source, target, read_only=False, is_dir=True):
        super().__init__(source=source, target=target, read_only=read_only, is_dir=is_dir)


class Plan(Record):
    """Everything one run will do; built (and checked) by build_plan()."""

    __slots__ = ("argv", "lowers", "upper", "work", "rootfs", "hostname", "env", "cwd",
                 "uid", "gid", "net", "volumes", "keep", "rootless", "mounts")
    _defaults = {
        "lowers": (),        # top layer first
        "upper": None,       # None: a throwaway upper (and work) dir
        "work": None,
        "rootfs": None,      # an already mounted tree, used as is (no union)
        "hostname": "unionfs",
        "env": (),           # ((KEY, VALUE), ...), in order
        "cwd": "/",
        "uid": 0,
        "gid": 0,
        "net": "none",
        "volumes": (),
        "keep": False,
        "rootless": None,    # None: decided by the caller's capabilities
        "mounts": None,      # the container's mounts (runner.mounts); None: from the above
    }

    def __init__(self, **values):
        super().__init__(**values)
        if self.rootless is None:
            # Not real root (CAP_SYS_ADMIN in the initial user namespace): the
            # container gets a user namespace of its own.
            object.__setattr__(self, "rootless", not is_privileged())
        if self.mounts is None:
            object.__setattr__(self, "mounts",
                               container_mounts(self.rootless, self.net, self.volumes))

    def describe(self):
        """What the run will do, one line per step (`unionfs run --dry-run`)."""
        import shlex
        if self.rootfs is not None:
            lines = [f"root: {self.rootfs}, as it is (no union)"]
        else:
            upper = (f"upper {self.upper}, work {self.work}" if self.upper
                     else "a throwaway upper" + (", kept" if self.keep else ""))
            lines = [f"root: a union of {', '.join(self.lowers)} (top first) with {upper}, "
                     "served by a unionfs server process at $TMPDIR/unionfs-run-*/root"]
        namespaces = "mount, pid, uts, ipc" + (", net" if self.net == "none" else "")
        if self.rootless:
            namespaces += f", user (the caller's uid is uid {self.uid} inside)"
        lines.append(f"namespaces: {namespaces}")
        lines += [op.describe() for op in self.mounts]
        lines.append(f"hostname {self.hostname}; no_new_privs; the default capabilities; "
                     f"uid {self.uid}, gid {self.gid}; cwd {self.cwd}")
        lines.append(f"command: {shlex.join(self.argv)}")
        return lines

    @property
    def environ(self):
        return dict(self.env)


def parse_env(items, host_env=None):
    """KEY=VALUE items (KEY alone takes the host's value, as docker does)."""
    host_env = os.environ if host_env is None else host_env
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if "TERM" in host_env:
        env["TERM"] = host_env["TERM"]
    for item in items:
        key, sep, value = item.partition("=")
        if not key or "\0" in item:
            raise PlanError(f"bad -e {item!r}: expected KEY=VALUE")
        if not sep:
            if key not in host_env:
                continue
            value = host_env[key]
        env[key] = value
    return tuple(env.items())


def parse_user(spec):
    """UID[:GID] (numeric; a name would need the image's /etc/passwd)."""
    if spec is None:
        return 0, 0
    uid_text, _, gid_text = spec.partition(":")
    try:
        uid = int(uid_text)
        gid = int(gid_text) if gid_text else 0
    except ValueError:
        raise PlanError(f"bad -u {spec!r}: expected numeric UID[:GID]") from None
    if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1):
        raise PlanError(f"bad -u {spec!r}: out of range")
    return uid, gid


def parse_volume(spec, cwd=None):
    parts = spec.split(":")
    read_only = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        read_only = parts[2] == "ro"
        parts = parts[:2]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise PlanError(f"bad -v {spec!r}: expected SRC:DST[:ro]")
    source, target = parts
    if not os.path.isabs(target):
        raise PlanError(f"bad -v {spec!r}: DST must be an absolute path")
    source = os.path.abspath(os.path.join(cwd or os.getcwd(), source))
    if not os.path.exists(source):
        raise PlanError(f"bad -v {spec!r}: {source} does not exist")
    return Volume(source, os.path.normpath(target), read_only, os.path.isdir(source))


def _existing_dir(path, what):
    full = os.path.abspath(path)
    if not os.path.isdir(full):
        raise PlanError(f"{what} {path}: not a directory")
    return full


def _check_layer_path(path, what):
    # fuse-overlayfs-style option strings cannot carry these characters.
    if any(c in path for c in ":,\n"):
        raise PlanError(f"{what} {path}: ':' ',' and newlines are not supported in layer paths")
    return path


def resolve_lowers(specs):
    """--lower values -> layer directories, top first.

    The door for images: an image reference will be resolved here into its
    unpacked layer directories (another issue); today only directories are.
    """
    return tuple(_check_layer_path(_existing_dir(d, "--lower"), "--lower") for d in specs)


def build_plan(argv, lowers=(), upper=None, work=None, rootfs=None, hostname="unionfs",
               env=(), workdir="/", user=None, net="none", volumes=(), keep=False,
               host_env=None, rootless=None):
    """Check every option and return a Plan, or raise PlanError."""
    if not argv:
        raise PlanError("missing command: unionfs run [OPTIONS] -- CMD [ARG ...]")
    if rootfs is not None and lowers:
        raise PlanError("--rootfs and --lower exclude each other")
    if rootfs is None and not lowers:
        raise PlanError("missing --lower DIR (at least one layer)")
    if (upper is None) != (work is None):
        raise PlanError("--upper and --work go together")
    if rootfs is not None and (upper or keep):
        raise PlanError("--upper/--work/--keep need a layer stack (--lower)")
    if net not in NETWORK_MODES:
        raise PlanError(f"bad --net {net!r}: expected one of {', '.join(NETWORK_MODES)}")
    if not hostname or len(hostname) > 64 or "/" in hostname or "\0" in hostname:
        raise PlanError(f"bad --hostname {hostname!r}")
    if not workdir.startswith("/"):
        raise PlanError(f"bad -w {workdir!r}: must be an absolute path")
    lowers = resolve_lowers(lowers)
    if upper is not None:
        upper = _check_layer_path(_existing_dir(upper, "--upper"), "--upper")
        work = _check_layer_path(_existing_dir(work, "--work"), "--work")
        if upper == work or work.startswith(upper + "/") or upper.startswith(work + "/"):
            raise PlanError("--upper and --work must be separate directories")
    if rootfs is not None:
        rootfs = _existing_dir(rootfs, "--rootfs")
    uid, gid = parse_user(user)
    kwargs = {}
    if rootless is not None:
        kwargs["rootless"] = rootless
    return Plan(
        argv=tuple(argv), lowers=lowers, upper=upper, work=work, rootfs=rootfs,
        hostname=hostname, env=parse_env(env, host_env), cwd=os.path.normpath(workdir),
        uid=uid, gid=gid, net=net, volumes=tuple(parse_volume(v) for v in volumes),
        keep=keep, **kwargs)
