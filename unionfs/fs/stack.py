"""The stack context every operation shares: layers, workdir, profile, tables.

One `Stack` per mount. It opens the layer roots and the workdir, learns what
the server may do there (fs.profile), and holds the state the operations
work on: the node table, the directory caches, the open handles, the nodes
whose copy-up is in flight and the inodes whose cached attributes the kernel
must drop. It is single-threaded state: only the event loop touches it (copy
jobs get fds of their own). Nothing here is an operation; fs.union is the
façade over the modules that are.
"""
import errno
import os
import stat
from dataclasses import dataclass

from ..sys import libc
from . import copyup, owners, redirect, whiteout, workdir
from .dircache import DirCache
from .idmap import IdOptions
from .inodes import ROOT_INO, Node, NodeTable
from .layers import Layer
from .profile import ProfileError
from .profile import probe as probe_profile

UPPER = 0
NAME_MAX = 255
# The open flags we pass on. The kernel's request may carry internal bits
# (exec's __FMODE_EXEC, 0x20) that openat2, unlike open, rejects with EINVAL.
OPEN_PASS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC
             | os.O_DIRECT | os.O_NOATIME | os.O_LARGEFILE | os.O_TRUNC)


def err(code: int, *args) -> OSError:
    return OSError(code, os.strerror(code), *args)


@dataclass
class Caller:
    """Who asks: the request context in plain data."""
    uid: int = 0
    gid: int = 0
    umask: int = 0o022


ROOT_CALLER = Caller()


class Stack:
    def __init__(self, lowers, upper=None, work=None, *, whiteout_format=None,
                 durable=True, metacopy=False, profile=None, id_options=None,
                 redirect_dir="off"):
        if not lowers:
            raise ValueError("at least one lower layer is needed")
        self.redirect_dir = redirect_dir    # fs.redirect's mode: on, follow, nofollow, off
        self.layers: list[Layer | None] = [None]
        self.work_fd = -1
        self.temp_pool: workdir.TempPool | None = None
        self.reflinks = copyup.Reflinks()
        self.handles: dict = {}         # fh -> files.Handle | files.DirHandle
        self.next_fh = 1
        # True: operations copy up themselves (tests, tools); the FUSE adapter
        # sets False and runs the copies the operations ask for (fs.copyplan).
        self.inline_copies = True
        self.in_flight: set = set()     # nodes the adapter is copying up right now
        # inode numbers whose attributes changed behind the kernel's back
        # (a copy-up moves an object); the adapter tells the kernel
        self.attr_changed: list = []
        try:
            if upper is not None:
                self.layers[UPPER] = Layer.open(UPPER, upper, writable=True)
            for i, path in enumerate(lowers, start=1):
                self.layers.append(Layer.open(i, path))
            if upper is not None:
                self.work_fd = _open_workdir(work)
                self.temp_pool = workdir.TempPool(self.work_fd)
                dev = self.layers[UPPER].dev
                same_fs = [(layer.dev, dev) for layer in self.layers if layer.dev == dev]
                if len(same_fs) > 1:    # a lower layer on the upper's filesystem
                    copyup.probe_reflink(self.work_fd, same_fs, self.reflinks)
            # a given profile (tests, a server told what it may do) is not probed
            self.profile = profile or probe_profile(self.work_fd if self.writable else None,
                                                    whiteout_format)
            # the format may have been chosen just now (by what the server may write)
            refused = redirect.refused_with(redirect_dir, self.profile.whiteout_format)
            if refused:
                raise ProfileError(refused)
            # the owner rules (fs.owners; None: nothing to translate)
            self.id_options = id_options or IdOptions()
            roots = [None if layer is None else whiteout.fd_path(layer.fd)
                     for layer in self.layers]
            self.owners = owners.Owners.build(
                self.id_options,
                owners.layer_overrides(roots, self.id_options.xattr_permissions))
        except BaseException:
            self.close()
            raise
        self.fmt = self.profile.whiteout_format
        self.origin_xattr = copyup.origin_xattr(self.profile.xattr_ns)
        self.metacopy_xattr = copyup.metacopy_xattr(self.profile.xattr_ns)
        self.durable = durable
        self.metacopy = metacopy
        self.dirs = DirCache(self.layers)
        devs = {layer.dev for layer in self.layers if layer is not None}
        self.nodes = NodeTable(devs.pop() if len(devs) == 1 else None)
        top = self.layers[UPPER] if self.writable else self.layers[1]
        root_st = os.fstat(top.fd)
        root_layers = tuple(i for i, layer in enumerate(self.layers) if layer is not None)
        self.root = self.nodes.new(self.nodes.key(root_st.st_dev, root_st.st_ino),
                                   self.nodes.st_ino_of(root_st.st_dev, root_st.st_ino),
                                   None, b"", stat.S_IFDIR,
                                   root_layers[0], root_layers, ino=ROOT_INO)
        self.root.lookups = 1
        self.root_st_ino = self.root.st_ino

    @property
    def writable(self) -> bool:
        return self.layers[UPPER] is not None

    def require_upper(self) -> None:
        if not self.writable:
            raise err(errno.EROFS)

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise err(errno.ESTALE)
        return node

    def dirfd(self, node: Node, li: int) -> int | None:
        """An O_PATH fd of directory node in layer li (cached), None if absent."""
        return self.dirs.dirfd(node, li)

    def upper_dirfd(self, node: Node) -> int:
        fd = self.dirs.dirfd(node, UPPER)
        if fd is None:
            raise err(errno.EIO, node.path())
        return fd

    def open_upper(self, node: Node, flags: int, mode: int = 0) -> int:
        """Open node's upper object (never through a symlink)."""
        return libc.openat2(self.upper_dirfd(node.parent), node.name, flags | os.O_NOFOLLOW,
                            mode)

    def top_layer(self) -> Layer:
        return self.layers[UPPER] if self.writable else self.layers[1]

    def close(self) -> None:
        if hasattr(self, "dirs"):
            self.dirs.close()
        for h in self.handles.values():
            fd = getattr(h, "fd", None)
            if fd is not None:
                os.close(fd)
        self.handles.clear()
        for layer in self.layers:
            if layer is not None:
                layer.close()
        if self.temp_pool is not None:
            self.temp_pool.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1


def _open_workdir(work) -> int:
    """Our scratch space is WORK/work, as the kernel's (it cleans it too)."""
    wfd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(b"work", 0o700, dir_fd=wfd)
        except FileExistsError:
            pass
        fd = libc.openat2(wfd, b"work", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    finally:
        os.close(wfd)
    workdir.clean_workdir(fd)
    return fd
