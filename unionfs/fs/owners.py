"""Owners and modes between the layers and the union (fuse-overlayfs's id options).

Owns, for one mount: the attributes the union shows for an object (its
layer's `override_stat` xattr, then the id mapping and squashing, and
static_nlink's directory link count), the owner stored for a new object or
a chown, and writing owners and modes to the upper (a real chown/chmod, or
the upper's override xattr). The rules themselves are fs.idmap's; what each
request does with them is docs/rootless.md's table.

`Owners.build` gives None when there is nothing to translate (no option
that changes owners, no layer with an override, no static_nlink): callers
test `stack.owners is None` and keep the fast path as it was.
"""
import errno
import os
import stat

from . import idmap, whiteout

# A chown the disk refuses for these reasons is reported as done when owners
# are squashed (fuse-overlayfs ignores every chown error in that mode).
CHOWN_ERRNOS = (errno.EPERM, errno.EINVAL, errno.EACCES)
# An xattr the kernel refuses on symlinks and special files (user.*), or a
# filesystem without xattrs.
XATTR_REFUSED = (errno.EPERM, errno.ENOTSUP)


class ShownStat:
    """An lstat result with the owner, mode and device the union shows."""
    __slots__ = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                 "st_rdev", "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns",
                 "st_ctime_ns", "st_atime", "st_mtime", "st_ctime")

    def __init__(self, st, uid, gid, mode, rdev):
        self.st_ino, self.st_dev, self.st_nlink = st.st_ino, st.st_dev, st.st_nlink
        self.st_size, self.st_blksize, self.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        self.st_atime_ns, self.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        self.st_ctime_ns = st.st_ctime_ns
        self.st_atime, self.st_mtime, self.st_ctime = st.st_atime, st.st_mtime, st.st_ctime
        self.st_uid, self.st_gid, self.st_mode, self.st_rdev = uid, gid, mode, rdev


def read_override(path, name: bytes):
    """The decoded override xattr `name` of the object at path (or an fd),
    None if it has none. EINVAL if it does not decode (fuse-overlayfs fails
    stat of such an object the same way)."""
    try:
        raw = whiteout.xattr_get(path, name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
    try:
        return idmap.decode_override(raw)
    except idmap.OverrideError as e:
        raise OSError(errno.EINVAL, str(e)) from None


class Owners:
    def __init__(self, options: idmap.IdOptions, overrides: tuple):
        self.options = options
        self.overrides = overrides      # per layer index: its override xattr name, or None
        self.upper_override = overrides[0] if overrides else None
        self.maps = not options.owners_unchanged
        self.squashed = options.squashed
        self.static_nlink = options.static_nlink
        self.any_override = any(overrides)

    @classmethod
    def build(cls, options: idmap.IdOptions | None, overrides) -> "Owners | None":
        options = options or idmap.IdOptions()
        overrides = tuple(overrides)
        if options.owners_unchanged and not any(overrides) and not options.static_nlink:
            return None
        return cls(options, overrides)

    # ---- reading ------------------------------------------------------------

    def stored(self, st, layer: int, path_of) -> tuple:
        """(uid, gid, mode, rdev) of an object as stored: its disk stat
        with its layer's override applied. path_of() names the object (a
        path not to follow, or an fd), asked for only when an override
        may apply."""
        name = self.overrides[layer] if layer < len(self.overrides) else None
        if name is not None and idmap.applies_to(st.st_mode):
            ov = read_override(path_of(), name)
            if ov is not None:
                return idmap.apply_override(st.st_mode, st.st_rdev, ov)
        return st.st_uid, st.st_gid, st.st_mode, st.st_rdev

    def show(self, st, nlink: int, layer: int, path_of) -> tuple:
        """(the stat as shown, its link count) for an object's lstat `st`."""
        uid, gid, mode, rdev = self.stored(st, layer, path_of)
        if self.maps:
            uid, gid = self.options.shown_owner(uid, gid)
        if self.static_nlink and stat.S_ISDIR(mode):
            nlink = 1
        return ShownStat(st, uid, gid, mode, rdev), nlink

    def shown_ids(self, uid: int, gid: int) -> tuple:
        return self.options.shown_owner(uid, gid) if self.maps else (uid, gid)

    # ---- writing ------------------------------------------------------------

    def stored_ids(self, uid, gid) -> tuple:
        """A caller's (or a chown's) ids as they are to be stored; None stays None."""
        return self.options.stored_owner(uid, gid) if self.maps else (uid, gid)

    def uses_override(self, mode: int) -> bool:
        """Does an object of this (disk) type keep its owner and mode in the
        upper's override xattr rather than for real?"""
        return self.upper_override is not None and idmap.applies_to(mode)

    def write_override(self, path, uid: int, gid: int, mode: int) -> None:
        """Record owner and mode in the upper's override xattr of the object
        at path (an fd, or a path not to follow). A failure fails the
        operation, unless owners are squashed."""
        try:
            whiteout.xattr_set(path, self.upper_override, idmap.encode_override(uid, gid, mode))
        except OSError as e:
            if not (self.squashed and e.errno in XATTR_REFUSED + (errno.EACCES,)):
                raise

    def chown(self, fn, *args, special: bool = False, **kwargs) -> None:
        """A real chown (fn(*args)); refused ones are reported as done when
        owners are squashed, and for symlinks and special files in an upper
        with an override (the server cannot chown there, and they carry no
        override: they show the server's ids, as with fuse-overlayfs)."""
        try:
            fn(*args, **kwargs)
        except OSError as e:
            if e.errno not in CHOWN_ERRNOS or not (
                    self.squashed or (special and self.upper_override is not None)):
                raise



class OverrideSetupError(ValueError):
    """The upper's override cannot be set up at mount: one line."""


def _root_xattrs(path: bytes) -> dict:
    """{name: value} of the override names a layer root carries."""
    try:
        names = set(map(os.fsencode, os.listxattr(path)))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return {}
        raise
    found = {}
    for name in idmap.LAYER_OVERRIDE_ORDER:
        if name in names:
            try:
                found[name] = os.getxattr(path, name)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EPERM, errno.EACCES):
                    raise
    return found


def layer_overrides(root_paths, xattr_permissions: int) -> tuple:
    """The override xattr name of each layer (index 0 the upper, None where
    a layer is absent), decided at mount from each root's xattrs
    (docs/rootless.md). With xattr_permissions the upper is written with
    its override name, and its root gets a value if it has none (the top
    lower root's, else 0:0:0555); failing that, the mount fails."""
    roots = [None if p is None else _root_xattrs(p) for p in root_paths]
    names = [None if r is None else idmap.layer_override_name(r) for r in roots]
    upper = roots[0]
    if upper is not None and xattr_permissions:
        name = idmap.upper_override_name(xattr_permissions, upper)
        names[0] = name
        if not upper.get(name):
            seed = idmap.upper_root_seed(xattr_permissions, [r for r in roots[1:] if r])
            try:
                os.setxattr(root_paths[0], name, seed)
            except OSError as e:
                raise OverrideSetupError(
                    f"xattr_permissions={xattr_permissions}: cannot write "
                    f"{name.decode()} on the upper's root: {e.strerror}") from None
    return tuple(names)
