"""POSIX ACL inheritance for objects the server builds in the workdir.

An object created directly in its upper parent inherits the parent's
default ACL from the upper filesystem itself. One built in the workdir (a
directory that must be opaque, a name made over a whiteout) does not: its
parent there is the workdir. The kernel's overlayfs then applies the
parent's default ACL itself (posix_acl_create); so does this, on the xattr
form of ACLs (`system.posix_acl_default`, `system.posix_acl_access`: a
version word, then (tag, perm, id) entries). Skipped with `noacl`.
"""
import errno
import os
import stat
import struct

DEFAULT_XATTR = "system.posix_acl_default"
ACCESS_XATTR = "system.posix_acl_access"

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def parse(value: bytes) -> list:
    """[(tag, perm, id), ...]; ValueError for anything but version 2 entries."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size \
            or _HEADER.unpack_from(value)[0] != VERSION:
        raise ValueError("not a POSIX ACL in xattr form")
    return [list(_ENTRY.unpack_from(value, off))
            for off in range(_HEADER.size, len(value), _ENTRY.size)]


def encode(entries) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def create_masq(entries, mode: int) -> tuple:
    """The access ACL and mode of a new object from its parent's default
    ACL and its create mode (the kernel's posix_acl_create_masq). Returns
    (entries, mode, equivalent): equivalent means the mode says it all."""
    entries = [list(e) for e in entries]
    perm = stat.S_IMODE(mode)
    equivalent = True
    group_obj = mask = None
    for e in entries:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= (perm >> 6) & 7
            perm = (perm & ~0o700) | (e[1] << 6)
        elif tag in (USER, GROUP):
            equivalent = False
        elif tag == GROUP_OBJ:
            group_obj = e
        elif tag == OTHER:
            e[1] &= perm & 7
            perm = (perm & ~0o7) | e[1]
        elif tag == MASK:
            mask = e
            equivalent = False
    target = mask if mask is not None else group_obj
    if target is not None:
        target[1] &= (perm >> 3) & 7
        perm = (perm & ~0o70) | (target[1] << 3)
    return entries, (mode & ~0o777) | (perm & 0o777), equivalent


def inherit(parent_path: bytes, path: bytes, mode: int) -> None:
    """Give the object at path (not followed; never a symlink) what it
    inherits from the directory at parent_path: its default ACL (for a
    directory), the access ACL derived from it and the create mode, and the
    mode that follows. Nothing when the parent has no default ACL."""
    try:
        default = os.getxattr(parent_path, DEFAULT_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    try:
        entries = parse(default)
    except ValueError:
        return      # the filesystem's own business: it would refuse it anyway
    access, new_mode, equivalent = create_masq(entries, mode)
    if stat.S_ISDIR(mode):
        os.setxattr(path, DEFAULT_XATTR, default, follow_symlinks=False)
    if not equivalent:
        os.setxattr(path, ACCESS_XATTR, encode(access), follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(new_mode))     # (path names no symlink: see above)
