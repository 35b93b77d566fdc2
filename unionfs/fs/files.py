"""Open handles: files (open, read, write, fsync, release) and directories
(opendir, readdir from a snapshot, releasedir).

A file handle owns one fd of the object's top layer (the lower data of a
metacopy file). Opening for writing (or O_TRUNC) needs the file in the upper
first; a read handle opened before a copy-up is moved to the upper copy when
it lands (fs.copyplan.commit), so it sees later writes. A directory handle
lists the merged names once, at offset 0, and resolves each as it is read.
"""
import errno
import functools
import os
import stat

from ..sys import libc
from . import whiteout
from .copyplan import require
from .inodes import Node
from .layers import list_names
from .layers import probe as probe_layers
from .lookup import node_for
from .stack import OPEN_PASS, ROOT_CALLER, UPPER, Stack, err


class Handle:
    __slots__ = ("node", "fd", "flags", "writable")

    def __init__(self, node, fd, flags):
        self.node = node
        self.fd = fd
        self.flags = flags
        self.writable = bool(flags & (os.O_WRONLY | os.O_RDWR))


class DirHandle:
    __slots__ = ("node", "names")

    def __init__(self, node, names):
        self.node = node
        self.names = names


def add_handle(stack: Stack, h) -> int:
    fh = stack.next_fh
    stack.next_fh += 1
    stack.handles[fh] = h
    if isinstance(h, Handle):
        if h.node.handles:
            h.node.handles.append(h)
        else:
            h.node.handles = [h]
    return fh


def handle(stack: Stack, fh, kind=Handle):
    """The open handle fh (of the given kind), or EBADF."""
    h = stack.handles.get(fh)
    if h is None or not isinstance(h, kind):
        raise err(errno.EBADF)
    return h


def needs_copyup(flags: int) -> bool:
    # as the kernel: O_RDONLY|O_APPEND can never write, so it does not copy up
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def open_node(stack: Stack, node: Node, flags, caller=ROOT_CALLER) -> int:
    if node.kind == stat.S_IFDIR and flags & (os.O_WRONLY | os.O_RDWR):
        raise err(errno.EISDIR)
    if needs_copyup(flags):
        stack.require_upper()
        require(stack, needs=((node, False),), touches=(node,))
        if flags & os.O_TRUNC and caller.uid != 0:
            _kill_suid(stack, node)
    oflags = (flags & OPEN_PASS) | os.O_CLOEXEC
    if node.data_layer is not None:     # a metacopy: its data is still below
        fd = libc.openat2(stack.dirfd(node.parent, node.data_layer), node.name,
                          oflags | os.O_NOFOLLOW)
    elif node.layer == UPPER:
        fd = stack.open_upper(node, oflags)
    else:
        fd = libc.openat2(stack.dirfd(node.parent, node.layer), node.name,
                          oflags | os.O_NOFOLLOW)
    return add_handle(stack, Handle(node, fd, flags))


def _kill_suid(stack: Stack, node: Node) -> None:
    """Truncation by an unprivileged caller clears set-id bits, as the
    kernel's do_truncate would; our own truncation runs as root."""
    dfd = stack.upper_dirfd(node.parent)
    st = os.stat(node.name, dir_fd=dfd, follow_symlinks=False)
    owners = stack.owners
    override = owners is not None and owners.uses_override(st.st_mode)
    if override:
        path = whiteout.entry_path(dfd, node.name)
        uid, gid, mode, _ = owners.stored(st, UPPER, lambda: path)
        mode = stat.S_IMODE(mode)
    else:
        mode = stat.S_IMODE(st.st_mode)
    kill = stat.S_ISUID
    if mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if not mode & kill:
        return
    if override:
        owners.write_override(path, uid, gid, mode & ~kill)
    else:
        os.chmod(node.name, mode & ~kill, dir_fd=dfd)


def read(stack: Stack, fh, off, size) -> bytes:
    return os.pread(handle(stack, fh).fd, size, off)


def write(stack: Stack, fh, off, buf) -> int:
    return os.pwrite(handle(stack, fh).fd, buf, off)


def fsync(stack: Stack, fh, datasync) -> None:
    fd = handle(stack, fh).fd
    (os.fdatasync if datasync else os.fsync)(fd)


def release(stack: Stack, fh) -> None:
    h = stack.handles.pop(fh, None)
    if isinstance(h, Handle):
        os.close(h.fd)
        stack.nodes.release_handle(h.node, h)


def opendir(stack: Stack, ino) -> int:
    return add_handle(stack, DirHandle(stack.node(ino), None))


def readdir(stack: Stack, fh, start: int):
    """Yield (next_offset, name, node, found) from a snapshot taken at offset 0.

    node is None for an entry that is listed without attributes: a whiteout
    in xattr form in a directory not marked for them, which the kernel's
    readdir lists (it does not look) but its lookup hides; the kernel then
    asks for it by name, and is told it does not exist. Likewise a directory
    whose redirect the mount refuses to follow: its lookup fails with EPERM."""
    h = handle(stack, fh, DirHandle)
    node = h.node
    dirs = stack.dirs
    dirfd_of = functools.partial(dirs.dirfd, node)
    names_of = functools.partial(dirs.names, node)
    marked_of = functools.partial(dirs.marked, node)
    if h.names is None or start == 0:
        h.names = [b".", b".."] + list_names(dirfd_of, node.layers,
                                             functools.partial(dirs.keep_listing, node))
    layers = node.layers
    for i in range(start, len(h.names)):
        name = h.names[i]
        if i < 2:
            yield i + 1, name, node if i == 0 else (node.parent or node), None
            continue
        found = probe_layers(layers, dirfd_of, name, names_of, marked_of)
        if found is None:
            continue
        st = found.st
        if st.st_size == 0 and stat.S_ISREG(st.st_mode) and not marked_of(found.layer) \
                and whiteout.has_whiteout_xattr(dirfd_of(found.layer), name):
            yield i + 1, name, None, found
        else:
            try:
                child = node_for(stack, node, name, found)
            except OSError as e:
                if e.errno != errno.EPERM:
                    raise
                # a redirect the mount does not follow (fs.lookup.follow_redirect):
                # listed as the kernel lists it; its lookup is refused
                yield i + 1, name, None, found
                continue
            yield i + 1, name, child, found


def releasedir(stack: Stack, fh) -> None:
    stack.handles.pop(fh, None)
