"""fuse-overlayfs's ownership and permission options, as pure rules.

Owns: parsing `uidmapping=`/`gidmapping=`, `squash_to_root`, `squash_to_uid=`,
`squash_to_gid=`, `xattr_permissions=`, `noacl` and `static_nlink` into an
`IdOptions`; mapping owners between what the layers store and what the union
shows; the `override_stat` xattr (names, value format, which layer uses which
name) and the xattr names the union keeps to itself in that mode.

No I/O: callers read /proc/sys/kernel/overflow{u,g}id and the layers' xattrs
and hand the bytes in. What each request handler does with these rules, and
where fuse-overlayfs itself differs or has bugs we do not copy, is in
docs/rootless.md.
"""
import re
import stat
from dataclasses import dataclass, field

# Ids are 32-bit; (uid_t)-1 is "no change" to chown and never a real owner.
NO_ID = (1 << 32) - 1
DEFAULT_OVERFLOW_ID = 65534
# What the kernel shows for an id it cannot map in a user namespace;
# fuse-overlayfs uses the same ids for owners outside its mapping.
OVERFLOW_UID_FILE = "/proc/sys/kernel/overflowuid"
OVERFLOW_GID_FILE = "/proc/sys/kernel/overflowgid"

_DECIMAL = re.compile(r"[0-9]+\Z")
_OCTAL = re.compile(r"[0-7]+\Z")


class IdOptionError(ValueError):
    """A malformed id or permission option: one line, a usage error."""


# ---- uidmapping= / gidmapping= ---------------------------------------------

@dataclass(frozen=True)
class IdRange:
    """`stored` ids in the layers show as `shown` ids through the union."""
    stored: int
    shown: int
    count: int

    def show(self, stored_id: int) -> int | None:
        if self.stored <= stored_id < self.stored + self.count:
            return self.shown + (stored_id - self.stored)
        return None

    def store(self, shown_id: int) -> int | None:
        if self.shown <= shown_id < self.shown + self.count:
            return self.stored + (shown_id - self.shown)
        return None


@dataclass(frozen=True)
class IdMap:
    """One option's ranges in the order given. No ranges: the identity. With
    ranges, an id outside all of them is the overflow id, in both directions.
    Where ranges overlap the last one listed wins (fuse-overlayfs keeps its
    list in reverse and takes the first match)."""
    ranges: tuple = ()

    @property
    def identity(self) -> bool:
        return not self.ranges

    def shown(self, stored_id: int, overflow: int) -> int:
        if not self.ranges:
            return stored_id
        for r in reversed(self.ranges):
            found = r.show(stored_id)
            if found is not None:
                return found
        return overflow

    def stored(self, shown_id: int, overflow: int) -> int:
        if not self.ranges:
            return shown_id
        for r in reversed(self.ranges):
            found = r.store(shown_id)
            if found is not None:
                return found
        return overflow


def _number(token: str, option: str, text: str) -> int:
    if not _DECIMAL.match(token):
        raise IdOptionError(f"{option}={text}: {token!r} is not a decimal number")
    value = int(token)
    if value >= NO_ID:
        raise IdOptionError(f"{option}={text}: {token} is not below {NO_ID}")
    return value


def parse_idmap(text: str, option: str = "uidmapping") -> IdMap:
    """`stored:shown:count[:stored:shown:count...]`, the ranges separated by
    `:` like their fields. Empty fields are skipped, so a leading `:` (as
    podman writes it) or `::` is fine; an empty value is the identity. A
    count of 0 is accepted and matches nothing (as in fuse-overlayfs). Refused,
    where fuse-overlayfs quietly wraps around: signs, blanks, non-decimal
    digits, ids >= 2^32-1 and ranges that run past it."""
    tokens = [t for t in text.split(":") if t]
    if len(tokens) % 3:
        raise IdOptionError(f"{option}={text}: not a list of "
                            "container-id:host-id:count triples")
    ranges = []
    for i in range(0, len(tokens), 3):
        stored, shown, count = (_number(t, option, text) for t in tokens[i:i + 3])
        if max(stored, shown) + count > NO_ID:
            raise IdOptionError(f"{option}={text}: range {stored}:{shown}:{count} "
                                f"runs past {NO_ID - 1}")
        ranges.append(IdRange(stored, shown, count))
    return IdMap(tuple(ranges))


def parse_id(text: str, option: str) -> int:
    """The value of `squash_to_uid=` or `squash_to_gid=`."""
    return _number(text, option, text)


def parse_overflow_id(content: str, path: str = OVERFLOW_UID_FILE) -> int:
    """The content of /proc/sys/kernel/overflow[ug]id. fuse-overlayfs refuses
    to start when it cannot read it or reads 0; so does this."""
    value = content.strip()
    if not _DECIMAL.match(value) or not 0 < int(value) < NO_ID:
        raise IdOptionError(f"{path}: {value!r} is not an overflow id")
    return int(value)


# ---- the whole set of options ------------------------------------------------

@dataclass(frozen=True)
class IdOptions:
    uid_map: IdMap = field(default_factory=IdMap)
    gid_map: IdMap = field(default_factory=IdMap)
    squash_uid: int | None = None       # squash_to_uid=, or 0 from squash_to_root
    squash_gid: int | None = None
    xattr_permissions: int = 0          # 0 off, 1 security.*, 2 user.containers.*
    noacl: bool = False
    static_nlink: bool = False
    overflow_uid: int = DEFAULT_OVERFLOW_ID
    overflow_gid: int = DEFAULT_OVERFLOW_ID

    @property
    def squashed(self) -> bool:
        """Owners are squashed: a chown the disk refuses is then reported as
        done (fuse-overlayfs ignores every chown error in this mode)."""
        return self.squash_uid is not None or self.squash_gid is not None

    @property
    def owners_unchanged(self) -> bool:
        """Nothing to translate: the fast path."""
        return self.uid_map.identity and self.gid_map.identity and not self.squashed

    def shown_owner(self, stored_uid: int, stored_gid: int) -> tuple:
        """What stat shows for an object stored with these ids (after any
        override_stat). Squashing wins over the mapping, per id."""
        uid = (self.squash_uid if self.squash_uid is not None
               else self.uid_map.shown(stored_uid, self.overflow_uid))
        gid = (self.squash_gid if self.squash_gid is not None
               else self.gid_map.shown(stored_gid, self.overflow_gid))
        return uid, gid

    def stored_owner(self, uid: int | None, gid: int | None) -> tuple:
        """What to store for a caller's ids (create, mkdir, mknod, symlink) or
        a chown's new ids; None (not changed) stays None. Squashing plays no
        part here: squashed mounts still store the mapped caller's ids."""
        return (None if uid is None else self.uid_map.stored(uid, self.overflow_uid),
                None if gid is None else self.gid_map.stored(gid, self.overflow_gid))

    def dir_nlink(self, nlink: int) -> int:
        """static_nlink: every directory reports 1 link."""
        return 1 if self.static_nlink else nlink


def parse_xattr_permissions(text: str) -> int:
    if text not in ("0", "1", "2"):
        raise IdOptionError(f"xattr_permissions={text}: must be 0, 1 or 2")
    return int(text)


def from_options(values: dict, overflow_uid: int = DEFAULT_OVERFLOW_ID,
                 overflow_gid: int = DEFAULT_OVERFLOW_ID) -> IdOptions:
    """Build the rules from raw `-o` items: `values` maps an option name to its
    text after `=` (None for a flag), for any of uidmapping, gidmapping,
    squash_to_root, squash_to_uid, squash_to_gid, xattr_permissions, noacl,
    static_nlink. squash_to_uid=/squash_to_gid= win over squash_to_root."""
    def text(name):
        value = values[name]
        if value is None:
            raise IdOptionError(f"{name} needs a value ({name}=...)")
        return value

    squash_root = "squash_to_root" in values
    squash_uid = parse_id(text("squash_to_uid"), "squash_to_uid") \
        if "squash_to_uid" in values else (0 if squash_root else None)
    squash_gid = parse_id(text("squash_to_gid"), "squash_to_gid") \
        if "squash_to_gid" in values else (0 if squash_root else None)
    for flag in ("squash_to_root", "noacl", "static_nlink"):
        if values.get(flag) is not None:
            raise IdOptionError(f"{flag} takes no value")
    return IdOptions(
        uid_map=parse_idmap(text("uidmapping"), "uidmapping") if "uidmapping" in values
        else IdMap(),
        gid_map=parse_idmap(text("gidmapping"), "gidmapping") if "gidmapping" in values
        else IdMap(),
        squash_uid=squash_uid, squash_gid=squash_gid,
        xattr_permissions=parse_xattr_permissions(text("xattr_permissions"))
        if "xattr_permissions" in values else 0,
        noacl="noacl" in values, static_nlink="static_nlink" in values,
        overflow_uid=overflow_uid, overflow_gid=overflow_gid)


# ---- override_stat: owner and mode kept in an xattr ---------------------------

OVERRIDE_PRIVILEGED = b"security.fuseoverlayfs.override_stat"  # xattr_permissions=1
OVERRIDE_CONTAINERS = b"user.containers.override_stat"         # =2; containers/storage
OVERRIDE_LEGACY = b"user.fuseoverlayfs.override_stat"          # =2 before fuse-overlayfs 1.14
# A layer whose root directory carries one of these keeps the owners and modes
# of its directories and regular files in that xattr; the first found wins.
LAYER_OVERRIDE_ORDER = (OVERRIDE_PRIVILEGED, OVERRIDE_CONTAINERS, OVERRIDE_LEGACY)
# The upper root's value when neither it nor any lower root has one.
DEFAULT_ROOT_OVERRIDE = b"0:0:0555"
# The real mode bits directories and regular files get in the upper, so that
# the server (and whoever shares the storage) can always read and traverse them.
BACKING_MODE_BITS = 0o755

_TYPES = (("dir", stat.S_IFDIR), ("file", stat.S_IFREG), ("symlink", stat.S_IFLNK),
          ("pipe", stat.S_IFIFO), ("socket", stat.S_IFSOCK), ("block", stat.S_IFBLK),
          ("char", stat.S_IFCHR))
_TYPE_NAMES = {kind: name for name, kind in _TYPES}
_DEVICE = re.compile(r"-*([0-9]+)-([0-9]+)")


def layer_override_name(root_xattrs) -> bytes | None:
    """The override xattr a layer uses, from the names its root dir carries."""
    for name in LAYER_OVERRIDE_ORDER:
        if name in root_xattrs:
            return name
    return None


def upper_override_name(xattr_permissions: int, upper_root_xattrs) -> bytes | None:
    """The name the upper is written with: =1 the security name; =2
    user.containers.override_stat, unless the upper already uses
    user.fuseoverlayfs.override_stat (written by an older fuse-overlayfs)."""
    if xattr_permissions == 1:
        return OVERRIDE_PRIVILEGED
    if xattr_permissions == 2:
        if OVERRIDE_CONTAINERS not in upper_root_xattrs and OVERRIDE_LEGACY in upper_root_xattrs:
            return OVERRIDE_LEGACY
        return OVERRIDE_CONTAINERS
    return None


def upper_root_seed(xattr_permissions: int, lower_roots) -> bytes:
    """The value to give the upper root when it has no override yet: the top
    lower root's own (for =1 its security name, for =2 the containers name,
    else the legacy one), else DEFAULT_ROOT_OVERRIDE. `lower_roots`: one dict
    {xattr name: value} per lower layer's root, top layer first."""
    names = (OVERRIDE_PRIVILEGED,) if xattr_permissions == 1 else \
        (OVERRIDE_CONTAINERS, OVERRIDE_LEGACY)
    for root in lower_roots:
        for name in names:
            if root.get(name):
                return root[name]
    return DEFAULT_ROOT_OVERRIDE


@dataclass(frozen=True)
class Override:
    uid: int
    gid: int
    perm: int                   # 07777 bits
    kind: int | None = None     # S_IFMT of the shown type; None: the object's own
    rdev: tuple | None = None   # (major, minor) for block and char


class OverrideError(ValueError):
    """A malformed override_stat value: stat of that object fails (EINVAL)."""


def applies_to(disk_mode: int) -> bool:
    """Only directories and regular files on disk are overridden."""
    return stat.S_ISDIR(disk_mode) or stat.S_ISREG(disk_mode)


def _owner_field(text: str, value: bytes) -> int:
    if text == "-1":        # fuse-overlayfs < 1.14 wrote -1 for the id a chown left
        return NO_ID
    if not _DECIMAL.match(text) or int(text) > NO_ID:
        raise OverrideError(f"bad owner {text!r} in override_stat {value!r}")
    return int(text)


def decode_override(value: bytes) -> Override:
    """`uid:gid:mode[:type]`: decimal ids, octal mode (with or without a
    leading 0; file-type bits in it, which fuse-overlayfs writes, are
    dropped), type one of dir file symlink pipe socket block-MAJ-MIN
    char-MAJ-MIN (matched by prefix, as fuse-overlayfs and containers/storage
    do)."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise OverrideError(f"override_stat {value!r} is not ASCII") from None
    parts = text.split(":", 3)
    if len(parts) < 3:
        raise OverrideError(f"override_stat {value!r} is not uid:gid:mode[:type]")
    uid, gid = _owner_field(parts[0], value), _owner_field(parts[1], value)
    if not _OCTAL.match(parts[2]):
        raise OverrideError(f"bad mode {parts[2]!r} in override_stat {value!r}")
    perm = int(parts[2], 8) & 0o7777
    kind = rdev = None
    if len(parts) == 4:
        for name, k in _TYPES:
            if parts[3].startswith(name):
                kind = k
                break
        else:
            raise OverrideError(f"bad type {parts[3]!r} in override_stat {value!r}")
        if kind in (stat.S_IFBLK, stat.S_IFCHR):
            m = _DEVICE.match(parts[3][len(_TYPE_NAMES[kind]):])
            if not m:
                raise OverrideError(f"bad device {parts[3]!r} in override_stat {value!r}")
            rdev = (int(m.group(1)), int(m.group(2)))
    return Override(uid, gid, perm, kind, rdev)


def encode_override(uid: int, gid: int, mode: int, kind: int | None = None,
                    rdev: tuple | None = None) -> bytes:
    """`uid:gid:0MODE`, as containers/storage writes it (podman 4.x's reads
    exactly three fields in places), with `:type` only when `kind` is given:
    a value for an object whose disk type is its shown type needs none.
    File-type bits in `mode` are dropped."""
    text = "%d:%d:%04o" % (uid, gid, mode & 0o7777)
    if kind is not None:
        name = _TYPE_NAMES[kind]
        if kind in (stat.S_IFBLK, stat.S_IFCHR):
            name += "-%d-%d" % (rdev or (0, 0))
        text += ":" + name
    return text.encode("ascii")


def apply_override(disk_mode: int, disk_rdev: int, ov: Override) -> tuple:
    """(st_uid, st_gid, st_mode, st_rdev) as stored, before the id mapping."""
    kind = ov.kind if ov.kind is not None else stat.S_IFMT(disk_mode)
    rdev = disk_rdev if ov.rdev is None else _makedev(*ov.rdev)
    return ov.uid, ov.gid, kind | ov.perm, rdev


def _makedev(major: int, minor: int) -> int:
    # glibc's encoding, as os.makedev computes it (kept pure here)
    return (((major & 0xfffff000) << 32) | ((major & 0xfff) << 8)
            | ((minor & 0xffffff00) << 12) | (minor & 0xff))


def backing_mode(mode: int) -> int:
    """The real mode of a directory or regular file created or copied up in an
    upper written with xattr_permissions (its shown mode is in the xattr).
    Other types keep their own mode: they carry no override."""
    return mode | BACKING_MODE_BITS if applies_to(mode) else mode


# ---- xattr names the union keeps to itself in override mode -------------------

# Never shown, never settable through the mount (EPERM), whatever the mode:
# they would let a container forge its own owners.
OVERRIDE_PRIVATE_PREFIXES = (b"security.fuseoverlayfs.", b"user.fuseoverlayfs.",
                             b"user.containers.")
# In a layer using user.containers.override_stat, a security.* xattr set through
# the union is kept under this prefix (fuse-overlayfs >= 1.14), out of the
# disk's own security policy.
ENCODED_PREFIX = b"user.containers.override_"
XATTR_NAME_MAX = 255


def is_private(name: bytes) -> bool:
    return name.startswith(OVERRIDE_PRIVATE_PREFIXES)


def stored_xattr_name(name: bytes, layer_override: bytes | None) -> bytes | None:
    """The name under which a caller's xattr is kept in a layer; None: refused
    (EPERM on set, ENODATA on get)."""
    if layer_override == OVERRIDE_CONTAINERS and name.startswith(b"security."):
        encoded = ENCODED_PREFIX + name
        return encoded if len(encoded) <= XATTR_NAME_MAX else None
    if is_private(name):
        return None
    return name


def shown_xattr_name(stored: bytes, layer_override: bytes | None) -> bytes | None:
    """The name a stored xattr is listed under; None: hidden."""
    if layer_override == OVERRIDE_CONTAINERS:
        if stored.startswith(ENCODED_PREFIX + b"security."):
            return stored[len(ENCODED_PREFIX):]
        if stored.startswith(b"security."):
            return None     # the disk's own, not the container's
    if is_private(stored):
        return None
    return stored
