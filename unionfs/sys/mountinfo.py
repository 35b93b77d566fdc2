"""The mount table: one reader of /proc/self/mountinfo, with the kernel's escapes undone.

The kernel writes a space, tab, newline and backslash in a path as `\\040`,
`\\011`, `\\012` and `\\134` (and, in filesystem options such as overlayfs'
`workdir=`, a comma as `\\054`), so a line splits on spaces and an option
list on commas before anything is unescaped. Paths are bytes in the kernel;
here they are str decoded with os.fsdecode (surrogateescape), as os.listdir
gives them. Standard library only: the runner reads the table at start-up.
"""
import os

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = frozenset(b"01234567")


class Mount:
    """One line of the mount table."""

    __slots__ = ("mount_id", "parent_id", "device", "root", "mount_point", "mount_options",
                 "optional", "fstype", "source", "super_options")

    def __init__(self, mount_id, parent_id, device, root, mount_point, mount_options,
                 optional, fstype, source, super_options):
        self.mount_id = mount_id            # int, unique while mounted
        self.parent_id = parent_id          # int
        self.device = device                # (major, minor) of st_dev
        self.root = root                    # the mounted subtree of its filesystem
        self.mount_point = mount_point      # where, as this process sees it
        self.mount_options = mount_options  # per-mount: ("rw", "nosuid", ...)
        self.optional = optional            # ("shared:1", "master:2", ...)
        self.fstype = fstype                # "tmpfs", "fuse.unionfs", "overlay", ...
        self.source = source                # "tmpfs", "/dev/sda1", "unionfs", ...
        self.super_options = super_options  # the filesystem's: ("rw", "workdir=/w", ...)

    def option(self, key):
        """The value of `key=value` among the filesystem's options (None if absent)."""
        prefix = key + "="
        for item in self.super_options:
            if item.startswith(prefix):
                return item[len(prefix):]
        return None

    def __repr__(self):
        return f"Mount({self.mount_point!r}, {self.fstype!r}, {self.source!r})"


def unescape(raw: bytes) -> str:
    """`\\ooo` octal escapes -> characters, decoded as os.fsdecode does."""
    if b"\\" not in raw:
        return os.fsdecode(raw)
    out, i = bytearray(), 0
    while i < len(raw):
        digits = raw[i + 1:i + 4]
        if raw[i] == 0x5C and len(digits) == 3 and _OCTAL.issuperset(digits):
            out.append(int(digits, 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def _options(raw: bytes) -> tuple:
    return tuple(unescape(item) for item in raw.split(b",") if item)


def parse_line(line: bytes) -> Mount:
    """One mountinfo line (proc(5)): ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - TYPE
    SOURCE SUPER_OPTS."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        separator = fields.index(b"-", 6)
        major, minor = fields[2].split(b":")
        return Mount(int(fields[0]), int(fields[1]), (int(major), int(minor)),
                     unescape(fields[3]), unescape(fields[4]), _options(fields[5]),
                     tuple(f.decode() for f in fields[6:separator]),
                     unescape(fields[separator + 1]), unescape(fields[separator + 2]),
                     _options(fields[separator + 3]) if len(fields) > separator + 3 else ())
    except (ValueError, IndexError):
        raise ValueError(f"not a mountinfo line: {line!r}") from None


def mounts(path=MOUNTINFO) -> list:
    """Every mount this process can see, in the kernel's order (parents first)."""
    with open(path, "rb") as f:
        return [parse_line(line) for line in f.read().splitlines() if line]


def mounts_at(mount_point: str, path=MOUNTINFO) -> list:
    """The mounts stacked at `mount_point` (an absolute, normalized path), bottom first."""
    return [m for m in mounts(path) if m.mount_point == mount_point]


def is_mountpoint(mount_point: str, path=MOUNTINFO) -> bool:
    """Does the table list a mount at `mount_point`? Reads no file below it, so a
    dead FUSE mount (its server gone) counts, and nothing can block on one."""
    return bool(mounts_at(mount_point, path))
