"""Attributes: setattr (mode, owner, size, times), readlink, xattrs, statfs.

Any change copies the object up first (metadata only where metacopy allows
it); a change that is going to fail (removexattr of a missing name) copies
nothing. The union's and the kernel's own bookkeeping xattrs, and
fuse-overlayfs's and containers/storage's (`idmap.is_private`), are never
shown and cannot be set through the union. Under id options, owners and
modes go through fs.owners (the mapping, squashing, the override xattr).
"""
import errno
import os
import stat

from ..sys import libc
from . import idmap, whiteout
from .copyplan import require
from .files import Handle
from .inodes import Node
from .lookup import object_path
from .stack import UPPER, Stack, err


def setattr(stack: Stack, ino, *, mode=None, uid=None, gid=None, size=None, atime_ns=None,
            mtime_ns=None, fh=None) -> Node:
    node = stack.node(ino)
    stack.require_upper()
    require(stack, needs=((node, size is None),), touches=(node,))
    handle = stack.handles.get(fh) if fh is not None else None
    if node.unlinked and handle is None and node.handles:
        handle = node.handles[0]
    by_fd = isinstance(handle, Handle) and node.data_layer is None
    if stack.owners is not None and (mode is not None or uid is not None or gid is not None):
        mode, uid, gid = _set_owner(stack, node, handle.fd if by_fd else None, mode, uid, gid)
    if by_fd:
        _setattr_fd(handle.fd, mode, uid, gid, size, atime_ns, mtime_ns)
    else:
        _setattr_path(stack, node, mode, uid, gid, size, atime_ns, mtime_ns)
    return node


def _setattr_fd(fd, mode, uid, gid, size, atime_ns, mtime_ns):
    if uid is not None or gid is not None:
        os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
    if mode is not None:
        os.fchmod(fd, stat.S_IMODE(mode))
    if size is not None:
        os.ftruncate(fd, size)
    if atime_ns is not None or mtime_ns is not None:
        os.utime(fd, ns=_times(os.fstat(fd), atime_ns, mtime_ns))


def _setattr_path(stack: Stack, node, mode, uid, gid, size, atime_ns, mtime_ns):
    if node.parent is None:
        dfd, name = stack.layers[UPPER].fd, b"."
    else:
        dfd, name = stack.upper_dirfd(node.parent), node.name
    is_link = node.kind == stat.S_IFLNK
    if uid is not None or gid is not None:
        os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid,
                 dir_fd=dfd, follow_symlinks=False)
    if mode is not None and not is_link:
        os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd)
    if size is not None:
        if node.kind != stat.S_IFREG:
            raise err(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL)
        fd = libc.openat2(dfd, name, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    if atime_ns is not None or mtime_ns is not None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=_times(st, atime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)


def _set_owner(stack: Stack, node: Node, fd, mode, uid, gid) -> tuple:
    """A chown or chmod under id options: the new ids as stored; in an
    upper with an override, a directory or regular file gets its override
    xattr rewritten (the id or mode not changed kept as it was) and no real
    chown or chmod; else a real chown, whose refusal is ignored when owners
    are squashed. Returns the (mode, uid, gid) left to apply for real."""
    owners = stack.owners
    uid, gid = owners.stored_ids(uid, gid)
    if fd is not None:
        path, st = fd, os.fstat(fd)
    else:
        path = object_path(stack, node)
        st = os.fstat(path) if isinstance(path, int) else os.stat(path, follow_symlinks=False)
    if owners.uses_override(st.st_mode):
        old_uid, old_gid, old_mode, _ = owners.stored(st, UPPER, lambda: path)
        owners.write_override(path, old_uid if uid is None else uid,
                              old_gid if gid is None else gid,
                              stat.S_IMODE(old_mode if mode is None else mode))
        return None, None, None
    if uid is not None or gid is not None:
        ids = (-1 if uid is None else uid, -1 if gid is None else gid)
        special = node.kind not in (stat.S_IFDIR, stat.S_IFREG)
        if isinstance(path, int):
            owners.chown(os.fchown, path, *ids, special=special)
        else:
            owners.chown(os.chown, path, *ids, follow_symlinks=False, special=special)
    return mode, None, None


def _times(st, atime_ns, mtime_ns):
    return (st.st_atime_ns if atime_ns is None else atime_ns,
            st.st_mtime_ns if mtime_ns is None else mtime_ns)


def readlink(stack: Stack, ino) -> bytes:
    node = stack.node(ino)
    if node.kind != stat.S_IFLNK:
        raise err(errno.EINVAL)
    return os.readlink(node.name, dir_fd=stack.dirfd(node.parent, node.layer))


def _stored_name(stack: Stack, name: bytes, layer: int) -> bytes | None:
    """The name a caller's xattr has in a layer (None: refused, or hidden)."""
    if whiteout.is_private_xattr(name):
        return None
    owners = stack.owners
    if owners is None or not owners.any_override:
        return None if idmap.is_private(name) else name
    return idmap.stored_xattr_name(name, owners.overrides[layer])


def getxattr(stack: Stack, ino, name: bytes) -> bytes:
    node = stack.node(ino)
    stored = _stored_name(stack, name, node.layer)
    if stored is None:
        raise err(errno.ENODATA)
    return whiteout.xattr_get(object_path(stack, node), stored)


def listxattr(stack: Stack, ino) -> list:
    node = stack.node(ino)
    names = map(os.fsencode, whiteout.xattr_list(object_path(stack, node)))
    owners = stack.owners
    if owners is None or not owners.any_override:
        return [n for n in names if not (whiteout.is_private_xattr(n) or idmap.is_private(n))]
    layer_override = owners.overrides[node.layer]
    shown = (idmap.shown_xattr_name(n, layer_override) for n in names
             if not whiteout.is_private_xattr(n))
    return [n for n in shown if n is not None]


def setxattr(stack: Stack, ino, name: bytes, value: bytes, flags: int = 0) -> None:
    node = stack.node(ino)
    stored = _stored_name(stack, name, UPPER if stack.writable else node.layer)
    if stored is None:
        raise err(errno.EPERM)
    stack.require_upper()
    require(stack, needs=((node, True),), touches=(node,))
    whiteout.xattr_set(object_path(stack, node), stored, value, flags)


def removexattr(stack: Stack, ino, name: bytes) -> None:
    node = stack.node(ino)
    stored = _stored_name(stack, name, UPPER if stack.writable else node.layer)
    if stored is None:
        raise err(errno.EPERM)
    stack.require_upper()
    # a failed removal copies nothing up
    here = _stored_name(stack, name, node.layer)
    if here is None:
        raise err(errno.ENODATA)
    whiteout.xattr_get(object_path(stack, node), here)
    require(stack, needs=((node, True),), touches=(node,))
    whiteout.xattr_remove(object_path(stack, node), stored)


def statfs(stack: Stack):
    return os.statvfs(whiteout.fd_path(stack.top_layer().fd))
