"""Attributes: setattr (mode, owner, size, times), readlink, xattrs, statfs.

Any change copies the object up first (metadata only where metacopy allows
it); a change that is going to fail (removexattr of a missing name) copies
nothing. The union's and the kernel's own bookkeeping xattrs are never shown
and cannot be set through the union.
"""
import errno
import os
import stat

from ..sys import libc
from . import whiteout
from .copyplan import require
from .files import Handle
from .inodes import Node
from .stack import UPPER, Stack, err


def setattr(stack: Stack, ino, *, mode=None, uid=None, gid=None, size=None, atime_ns=None,
            mtime_ns=None, fh=None) -> Node:
    node = stack.node(ino)
    stack.require_upper()
    require(stack, needs=((node, size is None),), touches=(node,))
    handle = stack.handles.get(fh) if fh is not None else None
    if node.unlinked and handle is None and node.handles:
        handle = node.handles[0]
    if isinstance(handle, Handle) and node.data_layer is None:
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


def _times(st, atime_ns, mtime_ns):
    return (st.st_atime_ns if atime_ns is None else atime_ns,
            st.st_mtime_ns if mtime_ns is None else mtime_ns)


def readlink(stack: Stack, ino) -> bytes:
    node = stack.node(ino)
    if node.kind != stat.S_IFLNK:
        raise err(errno.EINVAL)
    return os.readlink(node.name, dir_fd=stack.dirfd(node.parent, node.layer))


def _xattr_path(stack: Stack, node: Node) -> bytes:
    """A path naming node itself for the xattr calls (which take no dirfd);
    they must not follow it (follow_symlinks=False)."""
    if node.parent is None:     # the root: its layer's root, by name from that fd
        return whiteout.entry_path(stack.layers[node.layer].fd, b".")
    return whiteout.entry_path(stack.dirfd(node.parent, node.layer), node.name)


def getxattr(stack: Stack, ino, name: bytes) -> bytes:
    node = stack.node(ino)
    if whiteout.is_private_xattr(name):
        raise err(errno.ENODATA)
    return os.getxattr(_xattr_path(stack, node), name, follow_symlinks=False)


def listxattr(stack: Stack, ino) -> list:
    node = stack.node(ino)
    names = os.listxattr(_xattr_path(stack, node), follow_symlinks=False)
    return [n for n in map(os.fsencode, names) if not whiteout.is_private_xattr(n)]


def setxattr(stack: Stack, ino, name: bytes, value: bytes, flags: int = 0) -> None:
    node = stack.node(ino)
    if whiteout.is_private_xattr(name):
        raise err(errno.EPERM)
    stack.require_upper()
    require(stack, needs=((node, True),), touches=(node,))
    os.setxattr(_xattr_path(stack, node), name, value, flags, follow_symlinks=False)


def removexattr(stack: Stack, ino, name: bytes) -> None:
    node = stack.node(ino)
    if whiteout.is_private_xattr(name):
        raise err(errno.EPERM)
    stack.require_upper()
    # a failed removal copies nothing up
    os.getxattr(_xattr_path(stack, node), name, follow_symlinks=False)
    require(stack, needs=((node, True),), touches=(node,))
    os.removexattr(_xattr_path(stack, node), name, follow_symlinks=False)


def statfs(stack: Stack):
    return os.statvfs(whiteout.fd_path(stack.top_layer().fd))
