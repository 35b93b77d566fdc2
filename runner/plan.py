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
                 "uid", "gid", "groups", "user", "net", "volumes", "keep", "rootless", "id_maps",
                 "mounts", "image", "container")
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
        "groups": (),        # supplementary gids
        "user": None,        # (user, group) still to look up in the container's
                             # /etc/passwd and /etc/group (runner.users), once mounted
        "net": "none",
        "volumes": (),
        "keep": False,
        "rootless": None,    # None: decided by the caller's capabilities
        "id_maps": None,     # rootless: (uid_map, gid_map) of the caller's subordinate
                             # ids (runner.subids), () for the caller's id alone;
                             # None: the host's /etc/subuid and /etc/subgid decide
        "mounts": None,      # the container's mounts (runner.mounts); None: from the above
        "image": None,       # for describe(): the image the layers are (text)
        "container": None,   # for describe(): the container whose upper is used (text)
    }

    def __init__(self, **values):
        super().__init__(**values)
        if self.rootless is None:
            # Not real root (CAP_SYS_ADMIN in the initial user namespace): the
            # container gets a user namespace of its own.
            object.__setattr__(self, "rootless", not is_privileged())
        if self.id_maps is None:
            maps = ()
            if self.rootless and self.rootfs is None:
                from .subids import available_maps
                maps = available_maps() or ()
            object.__setattr__(self, "id_maps", maps)
        if self.mounts is None:
            object.__setattr__(self, "mounts",
                               container_mounts(self.rootless, self.net, self.volumes))

    def describe(self):
        """What the run will do, one line per step (`unionfs run --dry-run`)."""
        import shlex
        if self.rootfs is not None:
            lines = [f"root: {self.rootfs}, as it is (no union)"]
        else:
            if self.container:
                upper = f"the upper of {self.container}"
            elif self.upper:
                upper = f"upper {self.upper}, work {self.work}"
            else:
                upper = "a throwaway upper" + (", kept" if self.keep else "")
            layers = f"the image {self.image}: " if self.image else ""
            lines = [f"root: a union of {layers}{', '.join(self.lowers)} (top first) with "
                     f"{upper}, served by a unionfs server process at "
                     "$TMPDIR/unionfs-run-*/root"]
        namespaces = "mount, pid, uts, ipc" + (", net" if self.net == "none" else "")
        if self.rootless and self.id_maps:
            ranges = ", ".join(f"{inside}-{inside + count - 1} are {outside}-"
                               f"{outside + count - 1}" for inside, outside, count
                               in self.id_maps[0][1:])
            lines.append("the runner enters a user namespace of its own first: uid 0 is the "
                         f"caller's, {ranges} (its subordinate uids; gids alike), and serves "
                         "the union from inside it")
        elif self.rootless:
            namespaces += f", user (the caller's uid is uid {self.uid} inside)"
        lines.append(f"namespaces: {namespaces}")
        lines += [op.describe() for op in self.mounts]
        if self.user is not None:
            spec = ":".join(str(p) for p in self.user if p is not None)
            who = f"user {spec} (looked up in the container's /etc/passwd and /etc/group)"
        else:
            who = f"uid {self.uid}, gid {self.gid}"
            if self.groups:
                who += f", groups {','.join(map(str, self.groups))}"
        lines.append(f"hostname {self.hostname}; no_new_privs; the default capabilities; "
                     f"{who}; cwd {self.cwd}")
        lines.append(f"command: {shlex.join(self.argv)}")
        return lines

    @property
    def environ(self):
        return dict(self.env)


def parse_env(items, host_env=None, base=None):
    """KEY=VALUE items (KEY alone takes the host's value, as docker does).

    They override `base`, an image's Env (KEY=VALUE strings), if given; PATH
    is the default one only when neither sets it. Without `base` HOME is
    /root; with one HOME is left to the user's lookup (runner.users)."""
    host_env = os.environ if host_env is None else host_env
    if base is None:
        env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    else:
        env = {}
        for item in base:
            key, sep, value = item.partition("=")
            if key and sep:
                env[key] = value
        env.setdefault("PATH", DEFAULT_PATH)
    if "TERM" in host_env and "TERM" not in env:
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
    """`-u`: (uid, gid, lookup). UID[:GID] numbers are final (lookup None);
    a name, or a user without a group, is `lookup` = (user, group) for the
    container's /etc/passwd and /etc/group (runner.users), and uid/gid are
    placeholders until then."""
    if spec is None:
        return 0, 0, None
    from .users import needs_lookup, parse_spec
    try:
        user, group = parse_spec(spec)
    except ValueError as e:
        raise PlanError(str(e)) from None
    if not needs_lookup(user, group):
        return user, group, None
    return (user if isinstance(user, int) else 0), (group if isinstance(group, int) else 0), \
        (user, group)


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
    """--lower values (or an image's layers' lowerdir()s) -> layer directories,
    top first, checked."""
    return tuple(_check_layer_path(_existing_dir(d, "--lower"), "--lower") for d in specs)


def build_plan(argv, lowers=(), upper=None, work=None, rootfs=None, hostname="unionfs",
               env=(), workdir="/", user=None, net="none", volumes=(), keep=False,
               host_env=None, rootless=None, base_env=None, image=None, container=None):
    """Check every option and return a Plan, or raise PlanError.

    For an image: `lowers` are its layers' dirs, `base_env` its Env (which
    `env` overrides), `image`/`container` texts for describe()."""
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
    if any(not isinstance(a, str) or "\0" in a for a in argv):
        raise PlanError("bad command: an argument holds a NUL byte")
    uid, gid, lookup = parse_user(user)
    environ = parse_env(env, host_env, base_env)
    if lookup is None and not any(key == "HOME" for key, _ in environ):
        environ += (("HOME", "/root" if uid == 0 else "/"),)
    kwargs = {}
    if rootless is not None:
        kwargs["rootless"] = rootless
    return Plan(
        argv=tuple(argv), lowers=lowers, upper=upper, work=work, rootfs=rootfs,
        hostname=hostname, env=environ, cwd=os.path.normpath(workdir),
        uid=uid, gid=gid, user=lookup, net=net,
        volumes=tuple(parse_volume(v) for v in volumes), keep=keep, image=image,
        container=container, **kwargs)
