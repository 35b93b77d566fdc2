"""A mount's configuration: the MountConfig record, `-o` strings
(fuse-overlayfs-compatible) parsed into it, and its one serialized form.

Pure data, no side effects: validate.py checks a config against the disk.
A config travels to a server process as JSON (`to_json`/`from_json`); paths
that are not valid UTF-8 survive the trip (surrogateescape, as os gives them).
"""
import json
from dataclasses import asdict, dataclass, field, fields

from ..fs import idmap, redirect

# Generic mount(8) flags: accepted, and passed to the kernel where they mean something.
GENERIC_FLAGS = {
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
    "diratime", "nodiratime", "sync", "async", "dirsync", "mand", "nomand", "silent",
    "loud", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
    "nofail", "defaults", "allow_other", "allow_root", "default_permissions",
    "iversion", "noiversion",
}
# Flags the kernel's FUSE mount takes from us.
KERNEL_FLAGS = {"ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                "relatime", "strictatime", "lazytime", "sync", "async", "dirsync",
                "diratime", "nodiratime"}
# fuse-overlayfs options that make no difference here: accepted and ignored,
# so that a command line written for fuse-overlayfs works unchanged.
FUSE_OVERLAYFS_IGNORED = {
    "context", "timeout", "threaded", "fast_ino", "writeback", "plugins", "fsync",
    "x-systemd.automount",
    "max_read", "fsname", "subtype", "xino", "nfs_export", "index",
    "uuid", "comment",
}
# fuse-overlayfs's ownership and permission options (unionfs.fs.idmap;
# docs/rootless.md): kept as given, checked at parse time.
ID_OPTIONS = {"uidmapping", "gidmapping", "squash_to_root", "squash_to_uid", "squash_to_gid",
              "xattr_permissions", "noacl", "static_nlink"}
WHITEOUT_FORMATS = ("kernel", "userxattr", "oci")
REDIRECT_MODES = ("", "on", "follow", "nofollow", "off")     # "": off, as before
# `mount -o x-foo` style comments are always ignored.
IGNORED_PREFIXES = ("x-", "comment=")


class OptionError(ValueError):
    """A wrong option: a usage error (exit status 2)."""


@dataclass
class MountConfig:
    lowers: list = field(default_factory=list)
    upper: str | None = None
    work: str | None = None
    mountpoint: str | None = None
    source: str = "unionfs"
    subtype: str = "unionfs"        # the mount's type is fuse.SUBTYPE
    foreground: bool = False
    debug: bool = False
    volatile: bool = False
    metacopy: bool = False
    whiteout_format: str | None = None      # None: what the server may write (fs.profile)
    flags: list = field(default_factory=list)   # kernel mount flags to pass on
    # fuse-overlayfs's id options as given, {name: text after "=" or None};
    # the server builds unionfs.fs.idmap.IdOptions from them (idmap.from_options)
    id_options: dict = field(default_factory=dict)
    xattrs: bool = True         # False: noxattrs=1, every xattr request is EOPNOTSUPP
    # directory renames as the kernel's redirect_dir= (fs.redirect; docs/redirect.md)
    redirect_dir: str = "off"

    def to_json(self) -> str:
        """The config as one line of JSON (never a raw newline: it frames messages)."""
        return json.dumps(asdict(self), ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "MountConfig":
        """The inverse of to_json; unknown or missing fields are a ValueError."""
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"not a mount configuration: {text[:200]!r}")
        for name, value in data.items():
            kind = _FIELD_TYPES[name]
            if kind is list:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            elif kind is dict:
                ok = isinstance(value, dict) and all(
                    k in ID_OPTIONS and (v is None or isinstance(v, str))
                    for k, v in value.items())
            else:
                ok = isinstance(value, kind) or (value is None and name in _OPTIONAL)
            if not ok:
                raise ValueError(f"mount configuration field {name!r}: {value!r}")
        return cls(**data)


_FIELD_TYPES = {"lowers": list, "upper": str, "work": str, "mountpoint": str, "source": str,
                "subtype": str,
                "foreground": bool, "debug": bool, "volatile": bool, "metacopy": bool,
                "whiteout_format": str, "flags": list, "id_options": dict,
                "xattrs": bool, "redirect_dir": str}
_OPTIONAL = {"upper", "work", "mountpoint", "whiteout_format"}


def shown(text) -> str:
    """A path or option as a message shows it: as it is, with only the
    characters that would break the line escaped (messages are one line)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace")
                   .decode("ascii") for c in text)


def split_lowerdir(value: str) -> list:
    """The layers of `lowerdir=`, top first, as the kernel reads the option:
    `:` separates layers (`\\:` is a colon in a name), `::` starts the
    data-only layers (served here as ordinary lowers), and an empty element
    is an error, as it is for the kernel."""
    if not value:
        raise OptionError("lowerdir= needs at least one directory")
    layers, current, i = [], [], 0
    groups = [layers]
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            current.append(value[i + 1])
            i += 2
            continue
        if c == ":":
            if not current:
                raise OptionError(f"lowerdir={shown(value)}: an empty layer")
            layers.append("".join(current))
            current = []
            if value[i + 1:i + 2] == ":":       # "::": data-only layers follow
                layers = []
                groups.append(layers)
                i += 1
        else:
            current.append(c)
        i += 1
    if not current:
        raise OptionError(f"lowerdir={shown(value)}: an empty layer")
    layers.append("".join(current))
    return [path for group in groups for path in group]


def split_options(text: str) -> list:
    """Split `a=1,b,c=x:y` into items; empty items (`,,`) are skipped."""
    return [item for item in text.split(",") if item.strip()]


def apply_options(cfg: MountConfig, text: str) -> MountConfig:
    for item in split_options(text):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key == "lowerdir":
            cfg.lowers.extend(split_lowerdir(value))
        elif key in ("upperdir", "workdir"):
            if not value:
                raise OptionError(f"{key}= needs a directory")
            if key == "upperdir":
                cfg.upper = value
            else:
                cfg.work = value
        elif key == "volatile":
            cfg.volatile = True
        elif key == "subtype" and eq:
            if not value or len(value) > 64 or not all(c.isalnum() or c in "._-" for c in value):
                raise OptionError(f"subtype= must be a name of letters, digits, '.', '_' or "
                                  f"'-', not '{shown(value)}'")
            cfg.subtype = value
        elif key == "metacopy":
            if value not in ("on", "off"):
                raise OptionError(f"metacopy= must be 'on' or 'off', not '{shown(value)}'")
            cfg.metacopy = value == "on"
        elif key == "whiteout":
            if value not in WHITEOUT_FORMATS:
                raise OptionError("whiteout= must be 'kernel', 'userxattr' or 'oci', "
                                  f"not '{shown(value)}'")
            _set_format(cfg, value)
        elif key == "userxattr" and not eq:
            _set_format(cfg, "userxattr")
        elif key == "noxattrs":
            if value not in ("", "0", "1"):
                raise OptionError(f"noxattrs= must be 0 or 1, not '{shown(value)}'")
            cfg.xattrs = value == "0"
        elif key in ID_OPTIONS:
            cfg.id_options[key] = value if eq else None
            check_id_options(cfg.id_options)
        elif key == "debug":
            cfg.debug = True
        elif key == "redirect_dir":
            if value not in REDIRECT_MODES:
                raise OptionError("redirect_dir= must be 'on', 'follow', 'nofollow' or 'off', "
                                  f"not '{shown(value)}'")
            cfg.redirect_dir = value or "off"
        elif key == "index" and value not in ("", "off"):
            raise OptionError(f"index={value} is not supported (only off)")
        elif key in GENERIC_FLAGS and not eq:
            if key in KERNEL_FLAGS:
                cfg.flags.append(key)
        elif key in FUSE_OVERLAYFS_IGNORED or item.startswith(IGNORED_PREFIXES):
            pass
        else:
            raise OptionError(f"unknown option '{shown(item)}'")
    refused = cfg.whiteout_format and redirect.refused_with(cfg.redirect_dir,
                                                           cfg.whiteout_format)
    if refused:
        raise OptionError(refused)
    return cfg


def _set_format(cfg: MountConfig, fmt: str) -> None:
    if cfg.whiteout_format not in (None, fmt):
        raise OptionError(f"conflicting marker formats: {cfg.whiteout_format} and {fmt}")
    cfg.whiteout_format = fmt


def check_id_options(values: dict):
    """The IdOptions of these raw options (with the default overflow ids),
    or a usage error saying what is wrong."""
    try:
        return idmap.from_options(values)
    except idmap.IdOptionError as e:
        raise OptionError(str(e)) from None
