"""The container's mounts as data: operation records, and the loop that carries them out.

`container_mounts(rootless, net, volumes)` turns the options into a list of
records (pure: nothing touches the kernel), kept in the Plan. Each record
says what it does in one line (`describe()`, for `unionfs run --dry-run`),
and `carry_out(ops, root)` performs them in PID 1 of the container, in two
passes:

1. `prepare`: every host source (device nodes, volumes, the /sys fallback)
   is cloned as a detached mount (open_tree) while the host's tree is still
   the root;
2. `apply`, in list order. The records before SwitchRoot work below the new
   root (proc and sysfs must be mounted while the host's are visible to a
   user namespace); their targets are opened one component at a time without
   following a symlink. Those after it resolve every path inside the new
   root, so a symlink in an image cannot aim a mount, a mkdir or a new file
   at a host path.

(The idea of an operation list comes from bubblewrap's SetupOp and mkosi's
sandbox; the code is this project's own.)
"""
import os

from unionfs.sys import libc

from .records import Record

# Host device nodes bind-mounted into the container's fresh /dev. Binding (not
# mknod) works the same with and without a user namespace.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
MS_FLAGS = {"ro": libc.MS_RDONLY, "nosuid": libc.MS_NOSUID, "nodev": libc.MS_NODEV,
            "noexec": libc.MS_NOEXEC, "strictatime": libc.MS_STRICTATIME}
ATTR_FLAGS = {"ro": libc.MOUNT_ATTR_RDONLY, "nosuid": libc.MOUNT_ATTR_NOSUID,
              "nodev": libc.MOUNT_ATTR_NODEV, "noexec": libc.MOUNT_ATTR_NOEXEC}
SPECIAL = ("nosuid", "nodev", "noexec")


class Setup:
    """What the operations share while the root is built."""

    def __init__(self, root, warn):
        self.root = root
        self.warn = warn            # warn(message): one line for the user
        self.root_fd = None         # O_PATH fd of the root mount, until the switch
        self.switched = False
        self.trees = {}             # HostBind -> its detached mounts' fds (the same
                                    # bind may be asked for twice)

    def target(self, path):
        """Where to mount `path` of the container: before the switch an fd path
        below the root (each directory created if missing, none followed if a
        symlink); after it the path itself."""
        if self.switched:
            return path, None
        fd = os.dup(self.root_fd)
        for name in path.strip("/").split("/"):
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                            dir_fd=fd)
            os.close(fd)
            fd = child
        return f"/proc/self/fd/{fd}", fd

    def close(self):
        for fd in [*(fd for fds in self.trees.values() for fd in fds), self.root_fd]:
            if fd is not None:
                os.close(fd)
        self.trees = {}
        self.root_fd = None


def _options(flags, data=None):
    return ",".join([*flags, *([data] if data else [])])


def _mkdirs(path, mode=0o755):
    try:
        os.makedirs(path, mode, exist_ok=True)
    except FileExistsError:
        pass


def _touch(path):
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


class Operation(Record):
    __slots__ = ()

    def prepare(self, setup):
        """Before anything is mounted, with the host's tree as the root."""

    def apply(self, setup):
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError


class RootMount(Operation):
    """The root must be a mount point of its own for pivot_root."""

    __slots__ = ()

    def apply(self, setup):
        libc.mount(setup.root, setup.root, None, libc.MS_BIND | libc.MS_REC)
        setup.root_fd = os.open(setup.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def describe(self):
        return "bind the root onto itself, recursively (pivot_root needs a mount point)"


class Mount(Operation):
    """A new filesystem instance: proc, sysfs, tmpfs, devpts."""

    __slots__ = ("fstype", "target", "flags", "data")
    _defaults = {"flags": (), "data": None}

    def apply(self, setup):
        where, fd = setup.target(self.target)
        try:
            if fd is None:
                _mkdirs(where)
            flags = 0
            for flag in self.flags:
                flags |= MS_FLAGS[flag]
            libc.mount(self.fstype, where, self.fstype, flags, self.data)
        finally:
            if fd is not None:
                os.close(fd)

    def describe(self):
        return f"mount {self.fstype} on {self.target} ({_options(self.flags, self.data)})"


class HostBind(Operation):
    """A host file or directory bind-mounted into the container."""

    __slots__ = ("source", "target", "flags", "is_dir", "recursive")
    _defaults = {"flags": (), "is_dir": True, "recursive": False}

    def prepare(self, setup):
        flags = libc.OPEN_TREE_CLONE | libc.OPEN_TREE_CLOEXEC
        if self.recursive:
            flags |= libc.AT_RECURSIVE
        setup.trees.setdefault(self, []).append(libc.open_tree(self.source, flags))

    def apply(self, setup):
        tree = setup.trees[self].pop(0)
        try:
            attributes = 0
            for flag in self.flags:
                attributes |= ATTR_FLAGS[flag]
            if attributes:
                libc.set_mount_attributes(tree, attributes)
            if setup.switched:
                if self.is_dir:
                    _mkdirs(self.target)
                else:
                    _mkdirs(os.path.dirname(self.target))
                    _touch(self.target)
                libc.move_mount(tree, self.target)
            else:
                _, fd = setup.target(self.target)  # a directory, as /sys
                try:
                    libc.move_mount(tree, "", target_fd=fd)
                finally:
                    os.close(fd)
        finally:
            os.close(tree)

    def describe(self):
        kind = ["recursive" if self.recursive else "", "" if self.is_dir else "file"]
        details = _options([*self.flags, *filter(None, kind)])
        return f"bind host {self.source} on {self.target}" + (f" ({details})" if details else "")


class SwitchRoot(Operation):
    """pivot_root into the root (chroot, with a warning, where that is impossible)."""

    __slots__ = ()

    def apply(self, setup):
        os.fchdir(setup.root_fd)
        os.close(setup.root_fd)
        setup.root_fd = None
        try:
            libc.pivot_root(".", ".")
        except OSError as e:
            setup.warn(f"pivot_root impossible ({e.strerror}); using chroot, which is weaker "
                       "isolation (the host's mounts stay reachable from inside)")
            os.chroot(".")
        else:
            libc.umount2(".", libc.MNT_DETACH)  # the old root, stacked on top of the new
        os.chdir("/")
        setup.switched = True

    def describe(self):
        return "switch to the root: pivot_root and detach the host's (chroot where impossible)"


class Symlink(Operation):
    __slots__ = ("path", "target")

    def apply(self, setup):
        os.symlink(self.target, self.path)

    def describe(self):
        return f"symlink {self.path} -> {self.target}"


def container_mounts(rootless, net, volumes):
    """The operations that build the container's root, in order (pure)."""
    if rootless and net == "host":
        # Without its own network namespace a user namespace may not mount sysfs.
        sysfs = HostBind(source="/sys", target="/sys", flags=("ro", *SPECIAL), recursive=True)
    else:
        sysfs = Mount(fstype="sysfs", target="/sys", flags=("ro", *SPECIAL))
    devpts = "newinstance,ptmxmode=0666,mode=0620" + ("" if rootless else ",gid=5")
    return (
        RootMount(),
        Mount(fstype="proc", target="/proc", flags=SPECIAL),
        sysfs,
        SwitchRoot(),
        Mount(fstype="tmpfs", target="/dev", flags=("nosuid", "strictatime"),
              data="mode=755,size=65536k"),
        *(HostBind(source=f"/dev/{name}", target=f"/dev/{name}", is_dir=False)
          for name in DEVICES),
        Mount(fstype="devpts", target="/dev/pts", flags=("nosuid", "noexec"), data=devpts),
        Symlink(path="/dev/ptmx", target="pts/ptmx"),
        Mount(fstype="tmpfs", target="/dev/shm", flags=("nosuid", "nodev"), data="mode=1777"),
        *(Symlink(path=f"/dev/{name}", target=target) for name, target in (
            ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))),
        Mount(fstype="tmpfs", target="/tmp", flags=("nosuid", "nodev"), data="mode=1777"),
        *(HostBind(source=v.source, target=v.target, flags=("ro",) if v.read_only else (),
                   is_dir=v.is_dir, recursive=True) for v in volumes),
    )


def carry_out(ops, root, warn):
    """Build the container's root at `root` (in the container's mount namespace)."""
    setup = Setup(root, warn)
    try:
        for op in ops:
            op.prepare(setup)
        for op in ops:
            op.apply(setup)
    finally:
        setup.close()
