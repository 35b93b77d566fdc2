"""POSIX operations on the merged view, synchronous, raising OSError(errno).

Union owns the layers, the node table and the open handles; every operation
the FUSE adapter offers has a method here taking inode numbers and bytes
names. Nothing here knows about pyfuse3 or trio, so the whole filesystem can
be driven on plain temporary directories in tests. The adapter may run the
slow part of a copy-up (copyup.run on a job from copyup_job) in a worker
thread and then call commit_copyup; the core does the same inline otherwise.
"""
import errno
import functools
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass

from ..sys import libc
from . import copyup, profile, whiteout
from .inodes import ROOT_INO, Node, NodeTable, unpack_key
from .layers import ABSENT_ERRNOS, Layer, layer_names, list_names, lower_positive, lstat_at, probe

UPPER = 0
DIRFD_CACHE_SIZE = 4096
# After this many lookups in one directory, its lower layers' listings are
# read once and kept: each further name costs a set lookup instead of an
# lstat per layer (lower layers do not change while mounted). Bounded by the
# total number of names kept.
LISTING_AFTER_PROBES = 8
LISTING_CACHE_NAMES = 200_000
# A metacopy file is a hole; its blocks (512-byte units) hold xattrs at most.
METACOPY_MAX_BLOCKS = 16
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


class Union:
    def __init__(self, lowers, upper=None, work=None, *, whiteout_format=None,
                 durable=True, metacopy=False):
        if not lowers:
            raise ValueError("at least one lower layer is needed")
        self.layers: list[Layer | None] = [None]
        self.work_fd = -1
        self.temp_pool: copyup.TempPool | None = None
        self._dirfds: OrderedDict = OrderedDict()
        self._listings: OrderedDict = OrderedDict()
        self._listed_names = 0
        self.handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        try:
            if upper is not None:
                self.layers[UPPER] = Layer.open(UPPER, upper, writable=True)
            for i, path in enumerate(lowers, start=1):
                self.layers.append(Layer.open(i, path))
            if upper is not None:
                self.work_fd = self._open_workdir(work)
                self.temp_pool = copyup.TempPool(self.work_fd)
                dev = self.layers[UPPER].dev
                same_fs = [(layer.dev, dev) for layer in self.layers if layer.dev == dev]
                if len(same_fs) > 1:    # a lower layer on the upper's filesystem
                    copyup.probe_reflink(self.work_fd, same_fs)
        except BaseException:
            self.close()
            raise
        self.profile = profile.probe(self.work_fd if self.writable else None, whiteout_format)
        self.fmt = self.profile.whiteout_format
        self.origin_xattr = copyup.origin_xattr(self.profile.xattr_ns)
        self.metacopy_xattr = copyup.metacopy_xattr(self.profile.xattr_ns)
        self.durable = durable
        self.metacopy = metacopy
        # inode numbers whose attributes changed behind the kernel's back
        # (a copy-up moves an object); the adapter tells the kernel
        self.attr_changed: list = []
        devs = {layer.dev for layer in self.layers if layer is not None}
        self.nodes = NodeTable(devs.pop() if len(devs) == 1 else None)
        top = self.layers[UPPER] if self.writable else self.layers[1]
        root_st = os.fstat(top.fd)
        root_layers = tuple(i for i, layer in enumerate(self.layers) if layer is not None)
        root = Node(ROOT_INO, (root_st.st_dev, root_st.st_ino), None, b"", stat.S_IFDIR,
                    root_layers[0], root_layers)
        root.lookups = 1
        self.root = self.nodes.add(root)
        self.root_st_ino = self.nodes.ino_for(root.key)

    # ---- set-up -------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self.layers[UPPER] is not None

    def _open_workdir(self, work) -> int:
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
        copyup.clean_workdir(fd)
        return fd

    def close(self):
        for node, li in list(self._dirfds):
            self._drop_dirfd(node, li)
        for h in self.handles.values():
            if isinstance(h, Handle):
                os.close(h.fd)
        self.handles.clear()
        for layer in self.layers:
            if layer is not None:
                layer.close()
        if self.temp_pool is not None:
            self.temp_pool.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1

    # ---- directory fds --------------------------------------------------------

    def dirfd(self, node: Node, li: int) -> int | None:
        """An O_PATH fd of directory node in layer li (cached), None if absent."""
        key = (node, li)
        fd = self._dirfds.get(key)
        if fd is not None:
            self._dirfds.move_to_end(key)
            return fd
        try:
            fd = self.layers[li].open_dir(node.path())
        except OSError as e:
            if e.errno in ABSENT_ERRNOS:
                return None
            raise
        self._dirfds[key] = fd
        if len(self._dirfds) > DIRFD_CACHE_SIZE:
            (old, oli), ofd = self._dirfds.popitem(last=False)
            os.close(ofd)
        return fd

    def _drop_dirfd(self, node: Node, li: int) -> None:
        fd = self._dirfds.pop((node, li), None)
        if fd is not None:
            os.close(fd)

    def _drop_dirfds(self, node: Node) -> None:
        for li in range(len(self.layers)):
            self._drop_dirfd(node, li)
            names = self._listings.pop((node, li), None)
            if names is not None:
                self._listed_names -= len(names)

    # ---- lower directory listings ---------------------------------------------

    def _keep_listing(self, node: Node, li: int, names: frozenset) -> None:
        if li == UPPER:
            return      # the upper changes under us: always ask the disk
        old = self._listings.pop((node, li), None)
        if old is not None:
            self._listed_names -= len(old)
        self._listings[(node, li)] = names
        self._listed_names += len(names)
        while self._listed_names > LISTING_CACHE_NAMES and len(self._listings) > 1:
            _, dropped = self._listings.popitem(last=False)
            self._listed_names -= len(dropped)

    def _names(self, node: Node, li: int):
        """The names in node's directory in lower layer li, once node is busy."""
        if li == UPPER:
            return None
        names = self._listings.get((node, li))
        if names is not None:
            self._listings.move_to_end((node, li))
            return names
        if node.probes < LISTING_AFTER_PROBES:
            return None
        dfd = self.dirfd(node, li)
        if dfd is None:
            return None
        names = layer_names(dfd)
        self._keep_listing(node, li, names)
        return names

    def upper_dirfd(self, node: Node) -> int:
        fd = self.dirfd(node, UPPER)
        if fd is None:
            raise err(errno.EIO, node.path())
        return fd

    # ---- lookup and attributes ----------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise err(errno.ESTALE)
        return node

    def _probe(self, parent: Node, name: bytes):
        if whiteout.is_marker_name(name):
            return None
        parent.probes += 1
        return probe(parent.layers, functools.partial(self.dirfd, parent), name,
                     functools.partial(self._names, parent))

    def _key(self, parent: Node, name: bytes, found) -> tuple:
        if found.layer == UPPER:
            dfd = self.dirfd(parent, UPPER)
            try:
                raw = os.getxattr(whiteout.entry_path(dfd, name), self.origin_xattr,
                                  follow_symlinks=False)
                key = unpack_key(raw)
                if key is not None:
                    return key
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
        st = found.st
        if found.layer != UPPER and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            path = parent.path()
            return (st.st_dev, st.st_ino, (path + b"/" if path else b"") + name)
        return (st.st_dev, st.st_ino)

    def _node_for(self, parent: Node, name: bytes, found) -> Node:
        key = self._key(parent, name, found)
        ino = self.nodes.ino_for(key)
        node = self.nodes.get(ino)
        kind = stat.S_IFMT(found.st.st_mode)
        if node is None or node.kind != kind:
            node = self.nodes.add(Node(ino, key, parent, name, kind, found.layer,
                                       found.layers or (found.layer,)))
            if found.layer == UPPER and kind == stat.S_IFREG:
                node.data_layer = self._metacopy_data_layer(parent, name, found.st)
            return node
        self._name_node(node, parent, name)
        if kind == stat.S_IFDIR:
            new_layers = found.layers or (found.layer,)
            if new_layers != node.layers:
                self._drop_dirfds(node)
            node.layer, node.layers = found.layer, new_layers
        elif found.layer < node.layer:
            node.layer, node.layers = found.layer, (found.layer,)
        return node

    def _metacopy_data_layer(self, parent: Node, name: bytes, st) -> int | None:
        """For an upper metacopy file, the lower layer holding its data."""
        if not st.st_size or st.st_blocks > METACOPY_MAX_BLOCKS:
            return None     # holds data: no metacopy (most big files are ruled out here)
        dfd = self.dirfd(parent, UPPER)
        try:
            os.getxattr(whiteout.entry_path(dfd, name), self.metacopy_xattr,
                        follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise
        data = probe(parent.layers[1:], lambda li: self.dirfd(parent, li), name)
        if data is None or not stat.S_ISREG(data.st.st_mode):
            raise err(errno.EIO, name)      # the kernel too refuses a metacopy without data
        return data.layer

    def lookup(self, parent_ino: int, name: bytes):
        """Resolve name in a directory; counts one lookup. Returns (node, stat)."""
        parent = self.node(parent_ino)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            found = self._probe(parent, name)
            if found is None:
                raise err(errno.ENOENT, name)
            node = self._node_for(parent, name, found)
            node.lookups += 1
            return node, self.stat(node, found)
        node.lookups += 1
        return node, self.stat(node)

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        self.nodes.forget(ino, count)
        if node is not None and self.nodes.get(ino) is not node:
            self._drop_dirfds(node)

    def _stat_raw(self, node: Node) -> os.stat_result:
        if node.parent is None:
            return os.fstat(self.layers[node.layer].fd)
        if not node.unlinked:
            dfd = self.dirfd(node.parent, node.layer)
            if dfd is not None:
                st = lstat_at(dfd, node.name)
                if st is not None:
                    return st
        if node.handles:
            return os.fstat(node.handles[0].fd)
        if node.orphan_st is not None:
            return node.orphan_st
        raise err(errno.ENOENT, node.path())

    def stat(self, node: Node, found=None):
        """(stat_result, nlink) of a node as the union shows it; `found`, a
        fresh probe result for the node, saves a second lstat."""
        if found is not None and found.layer == node.layer and not node.unlinked:
            st = found.st
        else:
            st = self._stat_raw(node)
        if node.unlinked:
            # an upper file may keep names we never looked up; a lower one (or a
            # metacopy, whose open files are on the lower data) has none left
            keeps_names = (node.layer == UPPER and node.data_layer is None
                           and node.kind == stat.S_IFREG)
            nlink = st.st_nlink if keeps_names else 0
        elif node.kind == stat.S_IFDIR and len(node.layers) > 1:
            nlink = 1       # a merged directory, as overlayfs reports it
        else:
            nlink = st.st_nlink
        return st, nlink

    def getattr(self, ino: int):
        node = self.node(ino)
        return node, self.stat(node)

    # ---- copy-up ------------------------------------------------------------

    def _require_upper(self):
        if not self.writable:
            raise err(errno.EROFS)

    def copyup_chain(self, node: Node, meta_only: bool = False) -> list:
        """The nodes that must be copied up for node to live in upper, top-down.

        meta_only: the caller changes metadata only (chmod, chown, utimes,
        xattrs), so a metacopy of node itself is enough when enabled."""
        self._require_upper()
        chain = []
        if node.layer == UPPER and node.data_layer is not None and not meta_only:
            chain.append(node)          # a metacopy whose data must now follow
            node = node.parent
        while node is not None and node.layer != UPPER:
            chain.append(node)
            node = node.parent
        chain.reverse()
        return chain

    def copyup_job(self, node: Node, meta_only: bool = False) -> copyup.CopyJob:
        """Everything copyup.run needs, with fds of its own (safe off the loop)."""
        if node.layer == UPPER:      # completing a metacopy: data from below
            kind, src_layer = copyup.DATA, node.data_layer
        else:
            kind, src_layer = copyup.FULL, node.layer
            if meta_only and self.metacopy and node.kind == stat.S_IFREG:
                kind = copyup.META
        src_dir = self.dirfd(node.parent, src_layer)
        meta_dir = self.upper_dirfd(node.parent) if kind == copyup.DATA else src_dir
        st = lstat_at(meta_dir, node.name) if src_dir is not None else None
        if st is None:
            raise err(errno.ENOENT, node.path())
        dst_dir = self.upper_dirfd(node.parent)
        devs = (self.layers[src_layer].dev, self.layers[UPPER].dev)
        clone_only = kind != copyup.META and stat.S_ISREG(st.st_mode) and st.st_size > 0 \
            and copyup.reflink_expected(devs)
        return copyup.CopyJob(os.dup(src_dir), node.name, os.dup(dst_dir), os.dup(self.work_fd),
                              st, node.key, self.durable, kind, devs, clone_only,
                              self.temp_pool, self.profile.xattr_ns)

    def commit_copyup(self, node: Node, job: copyup.CopyJob) -> None:
        """After a copy: the node lives in upper; reopen read-only handles there."""
        self.attr_changed.append(node.ino)
        if job.kind == copyup.META:
            node.data_layer = node.layer
        elif job.kind == copyup.DATA:
            node.data_layer = None
        if node.kind == stat.S_IFDIR:
            node.layers = (UPPER,) + node.layers
        else:
            node.layers = (UPPER,)
        node.layer = UPPER
        if node.data_layer is not None:
            return      # the data has not moved: readers stay where they are
        for h in node.handles:
            if not h.writable:
                fd = self._open_upper(node, h.flags & OPEN_PASS & ~os.O_TRUNC)
                os.close(h.fd)
                h.fd = fd

    def copy_up(self, node: Node, meta_only: bool = False) -> None:
        for n in self.copyup_chain(node, meta_only):
            job = self.copyup_job(n, meta_only)
            try:
                copyup.run(job)
            except copyup.NotCloned:
                job.clone_only = False
                copyup.run(job)
            self.commit_copyup(n, job)

    # ---- helpers for changing the upper --------------------------------------

    def _open_upper(self, node: Node, flags: int, mode: int = 0) -> int:
        dfd = self.upper_dirfd(node.parent)
        return libc.openat2(dfd, node.name, flags | os.O_NOFOLLOW, mode)

    def _child(self, parent: Node, name: bytes):
        """(found, node-or-None) for an existing child, without counting a lookup."""
        found = self._probe(parent, name)
        if found is None:
            return None, None
        return found, self._node_for(parent, name, found)

    def _check_name(self, name: bytes):
        if whiteout.is_marker_name(name):
            # the on-disk markers' namespace is reserved (OCI format)
            raise err(errno.EINVAL, name)
        if len(name) > 255:
            raise err(errno.ENAMETOOLONG, name)

    def _owner_for(self, parent: Node, caller: Caller, mode: int):
        """Owner and mode of a new object, with setgid directory inheritance."""
        pst = self._stat_raw(parent)
        gid = caller.gid
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        elif (mode & stat.S_ISGID and stat.S_ISREG(mode) and caller.uid != 0
              and gid != caller.gid):
            mode &= ~stat.S_ISGID
        return caller.uid, gid, mode

    def _create(self, parent: Node, name: bytes, kind: int, perm: int, caller: Caller, *,
                target: bytes = b"", rdev: int = 0, open_flags: int | None = None):
        """Create a new object in upper where the union has none.

        Builds it in the workdir and renames it into place when the name holds a
        whiteout (replaced atomically) or a directory must be made opaque; else
        creates it in place. Returns (node, fd-or-None).
        """
        self._require_upper()
        self._check_name(name)
        self.copy_up(parent)
        udfd = self.upper_dirfd(parent)
        ust = lstat_at(udfd, name)
        over_whiteout = ust is not None
        if ust is not None and not whiteout.is_whiteout(udfd, name, ust):
            raise err(errno.EEXIST, name)
        uid, gid, mode = self._owner_for(parent, caller, kind | perm)
        opaque = kind == stat.S_IFDIR and (over_whiteout or self._lower_positive(parent, name))
        via_work = over_whiteout or opaque
        where, wname = (self.work_fd, copyup.temp_name()) if via_work else (udfd, name)
        fd = None
        try:
            fd = self._make(where, wname, kind, mode, uid, gid, target, rdev, open_flags)
            if opaque:
                ofd = libc.openat2(where, wname, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    whiteout.make_opaque(ofd, self.fmt)
                finally:
                    os.close(ofd)
            if via_work:
                if over_whiteout:
                    libc.renameat2(where, wname, udfd, name, libc.RENAME_EXCHANGE)
                    os.unlink(wname, dir_fd=where)      # the old whiteout
                else:
                    libc.renameat2(where, wname, udfd, name, libc.RENAME_NOREPLACE)
        except BaseException:
            if fd is not None:
                os.close(fd)
            if via_work:
                copyup.remove_tree(where, wname)
            raise
        if self.fmt == whiteout.FORMAT_OCI and kind != stat.S_IFDIR:
            whiteout.remove_oci_whiteout(udfd, name)
        st = os.stat(name, dir_fd=udfd, follow_symlinks=False)
        found_layers = (UPPER,)
        if kind == stat.S_IFDIR and not opaque:
            below = self._probe_below(parent, name)
            found_layers = (UPPER,) + below
        node = self.nodes.add(Node(self.nodes.ino_for((st.st_dev, st.st_ino)),
                                   (st.st_dev, st.st_ino), parent, name, kind, UPPER,
                                   found_layers))
        self._drop_dirfds(node)
        return node, fd

    def _probe_below(self, parent: Node, name: bytes) -> tuple:
        found = probe(parent.layers[1:], lambda li: self.dirfd(parent, li), name)
        return found.layers if found is not None and found.layers else ()

    def _make(self, dirfd, name, kind, mode, uid, gid, target, rdev, open_flags):
        perm = stat.S_IMODE(mode)
        fd = None
        if kind == stat.S_IFREG:
            flags = os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            flags |= (open_flags & OPEN_PASS & ~os.O_TRUNC) if open_flags is not None \
                else os.O_WRONLY
            fd = os.open(name, flags, 0o600, dir_fd=dirfd)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, perm)
            if open_flags is None:
                os.close(fd)
                fd = None
            return fd
        if kind == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=dirfd)
        elif kind == stat.S_IFLNK:
            os.symlink(target, name, dir_fd=dirfd)
        else:
            os.mknod(name, kind | 0o600, rdev, dir_fd=dirfd)
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        if kind != stat.S_IFLNK:
            os.chmod(name, perm, dir_fd=dirfd)
        return fd

    def _entry(self, node: Node):
        node.lookups += 1
        return node, self.stat(node)

    # ---- creating -----------------------------------------------------------

    def _ensure_absent(self, parent: Node, name: bytes):
        if self._probe(parent, name) is not None:
            raise err(errno.EEXIST, name)

    def mkdir(self, parent_ino, name, mode, caller=ROOT_CALLER):
        parent = self.node(parent_ino)
        self._ensure_absent(parent, name)
        node, _ = self._create(parent, name, stat.S_IFDIR,
                               stat.S_IMODE(mode) & ~caller.umask, caller)
        return self._entry(node)

    def mknod(self, parent_ino, name, mode, rdev, caller=ROOT_CALLER):
        parent = self.node(parent_ino)
        self._ensure_absent(parent, name)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        node, _ = self._create(parent, name, kind, stat.S_IMODE(mode) & ~caller.umask,
                               caller, rdev=rdev)
        return self._entry(node)

    def symlink(self, parent_ino, name, target, caller=ROOT_CALLER):
        parent = self.node(parent_ino)
        self._ensure_absent(parent, name)
        node, _ = self._create(parent, name, stat.S_IFLNK, 0o777, caller, target=target)
        return self._entry(node)

    def create(self, parent_ino, name, mode, flags, caller=ROOT_CALLER):
        """O_CREAT of a name the kernel found absent: returns (fh, node, stat)."""
        parent = self.node(parent_ino)
        found = self._probe(parent, name)
        if found is not None:
            if flags & os.O_EXCL:
                raise err(errno.EEXIST, name)
            node, _ = self._entry(self._node_for(parent, name, found))
            return self.open(node.ino, flags & ~os.O_CREAT, caller), node, self.stat(node)
        node, fd = self._create(parent, name, stat.S_IFREG,
                                stat.S_IMODE(mode) & ~caller.umask, caller, open_flags=flags)
        fh = self._add_handle(Handle(node, fd, flags))
        return (fh,) + self._entry(node)

    def link(self, ino, new_parent_ino, new_name):
        node = self.node(ino)
        parent = self.node(new_parent_ino)
        if node.kind == stat.S_IFDIR:
            raise err(errno.EPERM)
        self._check_name(new_name)
        self._ensure_absent(parent, new_name)
        self.copy_up(node)
        self.copy_up(parent)
        udfd = self.upper_dirfd(parent)
        src_dir = self.upper_dirfd(node.parent)
        ust = lstat_at(udfd, new_name)
        if ust is not None:       # a whiteout: replace it atomically
            tmp = copyup.temp_name()
            os.link(node.name, tmp, src_dir_fd=src_dir, dst_dir_fd=self.work_fd,
                    follow_symlinks=False)
            libc.renameat2(self.work_fd, tmp, udfd, new_name, libc.RENAME_EXCHANGE)
            os.unlink(tmp, dir_fd=self.work_fd)
        else:
            os.link(node.name, new_name, src_dir_fd=src_dir, dst_dir_fd=udfd,
                    follow_symlinks=False)
            if self.fmt == whiteout.FORMAT_OCI:
                whiteout.remove_oci_whiteout(udfd, new_name)
        self._name_node(node, parent, new_name)
        return self._entry(node)

    # ---- removing -----------------------------------------------------------

    def _remove_upper_entry(self, parent: Node, name: bytes, needs_whiteout: bool,
                            is_dir: bool) -> None:
        udfd = self.upper_dirfd(parent)
        present = lstat_at(udfd, name) is not None
        if present and needs_whiteout and self.fmt == whiteout.FORMAT_KERNEL:
            # move it out and leave a whiteout in one step
            tmp = copyup.temp_name()
            libc.renameat2(udfd, name, self.work_fd, tmp, libc.RENAME_WHITEOUT)
            copyup.remove_tree(self.work_fd, tmp)
            return
        if present:
            if is_dir:
                tmp = copyup.temp_name()
                libc.renameat2(udfd, name, self.work_fd, tmp, libc.RENAME_NOREPLACE)
                copyup.remove_tree(self.work_fd, tmp)
            else:
                os.unlink(name, dir_fd=udfd)
        if needs_whiteout:
            whiteout.make_whiteout(udfd, name, self.fmt)

    def _lower_positive(self, parent: Node, name: bytes) -> bool:
        return lower_positive(parent.layers, lambda li: self.dirfd(parent, li), name, UPPER)

    def unlink(self, parent_ino, name):
        parent = self.node(parent_ino)
        found, node = self._child(parent, name)
        if node is None:
            raise err(errno.ENOENT, name)
        if node.kind == stat.S_IFDIR:
            raise err(errno.EISDIR, name)
        self._require_upper()
        self.copy_up(parent)
        if node.kind != stat.S_IFREG:
            node.orphan_st = found.st     # FIFOs, devices: the kernel opens them, not us
        needs_whiteout = found.layer != UPPER or self._lower_positive(parent, name)
        self._remove_upper_entry(parent, name, needs_whiteout, is_dir=False)
        self._unname(node, parent, name)

    # ---- names of a node ------------------------------------------------------

    def _name_node(self, node: Node, parent: Node, name: bytes) -> None:
        """parent/name names node, and becomes the name we use for it."""
        if node.parent is None:
            return
        if node.kind != stat.S_IFDIR and (node.parent is not parent or node.name != name) \
                and not node.unlinked:
            if node.aliases is None:
                node.aliases = set()
            node.aliases.add((node.parent, node.name))
        node.parent, node.name, node.unlinked = parent, name, False
        if node.aliases:
            node.aliases.discard((parent, name))

    def _unname(self, node: Node, parent: Node, name: bytes) -> None:
        """parent/name no longer names node: fall back on another of its names."""
        if node.aliases:
            node.aliases.discard((parent, name))
        if node.parent is not parent or node.name != name:
            return
        while node.aliases:
            other_parent, other_name = node.aliases.pop()
            found = self._probe(other_parent, other_name)
            if found is not None and self._key(other_parent, other_name, found) == node.key:
                node.parent, node.name = other_parent, other_name
                return
        node.unlinked = True
        if node.kind == stat.S_IFDIR:
            self._drop_dirfds(node)

    def _merged_names(self, node: Node) -> list:
        names = list_names(lambda li: self.dirfd(node, li), node.layers)
        return [n for n in names if self._probe(node, n) is not None]

    def rmdir(self, parent_ino, name):
        parent = self.node(parent_ino)
        found, node = self._child(parent, name)
        if node is None:
            raise err(errno.ENOENT, name)
        if node.kind != stat.S_IFDIR:
            raise err(errno.ENOTDIR, name)
        if self._merged_names(node):
            raise err(errno.ENOTEMPTY, name)
        self._require_upper()
        self.copy_up(parent)
        needs_whiteout = found.layer != UPPER or self._lower_positive(parent, name)
        self._remove_upper_entry(parent, name, needs_whiteout, is_dir=True)
        self._unname(node, parent, name)

    # ---- rename -------------------------------------------------------------

    def _dir_in_lower(self, found) -> bool:
        return stat.S_ISDIR(found.st.st_mode) and (found.layer != UPPER or len(found.layers) > 1)

    def rename(self, old_parent_ino, old_name, new_parent_ino, new_name, flags=0):
        if flags & ~(libc.RENAME_NOREPLACE | libc.RENAME_EXCHANGE) or \
                flags == libc.RENAME_NOREPLACE | libc.RENAME_EXCHANGE:
            raise err(errno.EINVAL)
        old_parent = self.node(old_parent_ino)
        new_parent = self.node(new_parent_ino)
        self._check_name(new_name)
        src_found, src = self._child(old_parent, old_name)
        if src is None:
            raise err(errno.ENOENT, old_name)
        dst_found, dst = self._child(new_parent, new_name)
        exchange = bool(flags & libc.RENAME_EXCHANGE)
        if exchange and dst is None:
            raise err(errno.ENOENT, new_name)
        if dst is not None and flags & libc.RENAME_NOREPLACE:
            raise err(errno.EEXIST, new_name)
        if dst is src and not exchange:
            return      # the same file under both names: nothing to do
        self._require_upper()
        if self._dir_in_lower(src_found) or (exchange and self._dir_in_lower(dst_found)):
            raise err(errno.EXDEV)
        src_is_dir = src.kind == stat.S_IFDIR
        if dst is not None and not exchange:
            dst_is_dir = dst.kind == stat.S_IFDIR
            if src_is_dir and not dst_is_dir:
                raise err(errno.ENOTDIR, new_name)
            if dst_is_dir and not src_is_dir:
                raise err(errno.EISDIR, new_name)
            if dst_is_dir and self._merged_names(dst):
                raise err(errno.ENOTEMPTY, new_name)
        if src_is_dir and self._is_ancestor(src, new_parent):
            raise err(errno.EINVAL)
        self.copy_up(old_parent)
        self.copy_up(new_parent)
        self.copy_up(src)
        old_dfd = self.upper_dirfd(old_parent)
        new_dfd = self.upper_dirfd(new_parent)
        # a directory arriving where lower layers hold the name must hide them
        if src_is_dir and self._lower_positive(new_parent, new_name):
            self._make_opaque(old_dfd, old_name, src)
        if exchange:
            self.copy_up(dst)
            if dst.kind == stat.S_IFDIR and self._lower_positive(old_parent, old_name):
                self._make_opaque(new_dfd, new_name, dst)
            libc.renameat2(old_dfd, old_name, new_dfd, new_name, libc.RENAME_EXCHANGE)
            self._unname(src, old_parent, old_name)
            self._unname(dst, new_parent, new_name)
            self._name_node(src, new_parent, new_name)
            self._name_node(dst, old_parent, old_name)
            return
        src_needs_whiteout = self._lower_positive(old_parent, old_name)
        dst_ust = lstat_at(new_dfd, new_name)
        if dst_ust is not None and stat.S_ISDIR(dst_ust.st_mode):
            # the upper target may hold whiteouts of its (empty) merged view
            tmp = copyup.temp_name()
            libc.renameat2(new_dfd, new_name, self.work_fd, tmp, libc.RENAME_NOREPLACE)
            copyup.remove_tree(self.work_fd, tmp)
        elif dst_ust is not None and src_is_dir:
            # a whiteout under the target name: a directory cannot replace it
            os.unlink(new_name, dir_fd=new_dfd)
        rflags = libc.RENAME_WHITEOUT if (src_needs_whiteout and
                                          self.fmt == whiteout.FORMAT_KERNEL) else 0
        libc.renameat2(old_dfd, old_name, new_dfd, new_name, rflags)
        if src_needs_whiteout and not rflags:
            whiteout.make_whiteout(old_dfd, old_name, self.fmt)
        if self.fmt == whiteout.FORMAT_OCI and not src_is_dir:
            whiteout.remove_oci_whiteout(new_dfd, new_name)
        if dst is not None:
            self._unname(dst, new_parent, new_name)
        self._unname(src, old_parent, old_name)
        self._name_node(src, new_parent, new_name)

    def _make_opaque(self, dirfd: int, name: bytes, node: Node) -> None:
        fd = libc.openat2(dirfd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            whiteout.make_opaque(fd, self.fmt)
        finally:
            os.close(fd)
        node.layers = (UPPER,)

    def _is_ancestor(self, node: Node, other: Node) -> bool:
        while other is not None:
            if other is node:
                return True
            other = other.parent
        return False

    # ---- attributes ---------------------------------------------------------

    def setattr(self, ino, *, mode=None, uid=None, gid=None, size=None, atime_ns=None,
                mtime_ns=None, fh=None):
        node = self.node(ino)
        self._require_upper()
        self.copy_up(node, meta_only=size is None)
        handle = self.handles.get(fh) if fh is not None else None
        if node.unlinked and handle is None and node.handles:
            handle = node.handles[0]
        if handle is not None and isinstance(handle, Handle) and node.data_layer is None:
            self._setattr_fd(handle.fd, node, mode, uid, gid, size, atime_ns, mtime_ns)
        else:
            self._setattr_path(node, mode, uid, gid, size, atime_ns, mtime_ns)
        return node, self.stat(node)

    def _setattr_fd(self, fd, node, mode, uid, gid, size, atime_ns, mtime_ns):
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.fchmod(fd, stat.S_IMODE(mode))
        if size is not None:
            os.ftruncate(fd, size)
        if atime_ns is not None or mtime_ns is not None:
            os.utime(fd, ns=self._times(os.fstat(fd), atime_ns, mtime_ns))

    def _setattr_path(self, node, mode, uid, gid, size, atime_ns, mtime_ns):
        if node.parent is None:
            dfd, name = self.layers[UPPER].fd, b"."
        else:
            dfd, name = self.upper_dirfd(node.parent), node.name
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
            os.utime(name, ns=self._times(st, atime_ns, mtime_ns), dir_fd=dfd,
                     follow_symlinks=False)

    @staticmethod
    def _times(st, atime_ns, mtime_ns):
        return (st.st_atime_ns if atime_ns is None else atime_ns,
                st.st_mtime_ns if mtime_ns is None else mtime_ns)

    def readlink(self, ino) -> bytes:
        node = self.node(ino)
        if node.kind != stat.S_IFLNK:
            raise err(errno.EINVAL)
        dfd = self.dirfd(node.parent, node.layer)
        return os.readlink(node.name, dir_fd=dfd)

    # ---- xattrs -------------------------------------------------------------

    def _xattr_path(self, node: Node) -> bytes:
        """A path naming node itself for the xattr calls (which take no dirfd);
        they must not follow it (follow_symlinks=False)."""
        if node.parent is None:     # the root: its layer's root, by name from that fd
            return whiteout.entry_path(self.layers[node.layer].fd, b".")
        return whiteout.entry_path(self.dirfd(node.parent, node.layer), node.name)

    def getxattr(self, ino, name: bytes) -> bytes:
        node = self.node(ino)
        if whiteout.is_private_xattr(name):
            raise err(errno.ENODATA)
        return os.getxattr(self._xattr_path(node), name, follow_symlinks=False)

    def listxattr(self, ino) -> list:
        node = self.node(ino)
        names = os.listxattr(self._xattr_path(node), follow_symlinks=False)
        return [n for n in map(os.fsencode, names) if not whiteout.is_private_xattr(n)]

    def setxattr(self, ino, name: bytes, value: bytes, flags: int = 0):
        node = self.node(ino)
        if whiteout.is_private_xattr(name):
            raise err(errno.EPERM)
        self._require_upper()
        self.copy_up(node, meta_only=True)
        os.setxattr(self._xattr_path(node), name, value, flags, follow_symlinks=False)

    def removexattr(self, ino, name: bytes):
        node = self.node(ino)
        if whiteout.is_private_xattr(name):
            raise err(errno.EPERM)
        self._require_upper()
        # a failed removal copies nothing up
        os.getxattr(self._xattr_path(node), name, follow_symlinks=False)
        self.copy_up(node, meta_only=True)
        os.removexattr(self._xattr_path(node), name, follow_symlinks=False)

    # ---- files --------------------------------------------------------------

    def _add_handle(self, h) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        if isinstance(h, Handle):
            h.node.handles.append(h)
        return fh

    @staticmethod
    def needs_copyup_for_open(flags: int) -> bool:
        # as the kernel: O_RDONLY|O_APPEND can never write, so it does not copy up
        return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)

    def open(self, ino, flags, caller=ROOT_CALLER) -> int:
        node = self.node(ino)
        if node.kind == stat.S_IFDIR and flags & (os.O_WRONLY | os.O_RDWR):
            raise err(errno.EISDIR)
        if self.needs_copyup_for_open(flags):
            self._require_upper()
            self.copy_up(node)
            if flags & os.O_TRUNC and caller.uid != 0:
                self._kill_suid(node)
        oflags = (flags & OPEN_PASS) | os.O_CLOEXEC
        if node.data_layer is not None:     # a metacopy: its data is still below
            fd = libc.openat2(self.dirfd(node.parent, node.data_layer), node.name,
                              oflags | os.O_NOFOLLOW)
        elif node.layer == UPPER:
            fd = self._open_upper(node, oflags)
        else:
            fd = libc.openat2(self.dirfd(node.parent, node.layer), node.name,
                              oflags | os.O_NOFOLLOW)
        return self._add_handle(Handle(node, fd, flags))

    def _kill_suid(self, node: Node) -> None:
        """Truncation by an unprivileged caller clears set-id bits, as the
        kernel's do_truncate would; our own truncation runs as root."""
        st = self._stat_raw(node)
        mode = stat.S_IMODE(st.st_mode)
        kill = stat.S_ISUID
        if mode & stat.S_IXGRP:
            kill |= stat.S_ISGID
        if mode & kill:
            os.chmod(node.name, mode & ~kill, dir_fd=self.upper_dirfd(node.parent))

    def handle(self, fh) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise err(errno.EBADF)
        return h

    def read(self, fh, off, size) -> bytes:
        return os.pread(self.handles[fh].fd, size, off)

    def write(self, fh, off, buf) -> int:
        return os.pwrite(self.handles[fh].fd, buf, off)

    def fsync(self, fh, datasync):
        fd = self.handle(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if isinstance(h, Handle):
            os.close(h.fd)
            self.nodes.release_handle(h.node, h)

    # ---- directories --------------------------------------------------------

    def opendir(self, ino) -> int:
        node = self.node(ino)
        return self._add_handle(DirHandle(node, None))

    def readdir(self, fh, start: int):
        """Yield (next_offset, name, node, stat) from a snapshot taken at offset 0."""
        h = self.handle(fh)
        node = h.node
        dirfd_of = functools.partial(self.dirfd, node)
        names_of = functools.partial(self._names, node)
        if h.names is None or start == 0:
            h.names = [b".", b".."] + list_names(dirfd_of, node.layers,
                                                 functools.partial(self._keep_listing, node))
        layers = node.layers
        for i in range(start, len(h.names)):
            name = h.names[i]
            if i < 2:
                dot = node if i == 0 else (node.parent or node)
                yield i + 1, name, dot, self.stat(dot)
                continue
            found = probe(layers, dirfd_of, name, names_of)
            if found is None:
                continue
            child = self._node_for(node, name, found)
            yield i + 1, name, child, self.stat(child, found)

    def releasedir(self, fh):
        self.handles.pop(fh, None)

    # ---- file system --------------------------------------------------------

    def stats(self) -> dict:
        """Sizes of the server's tables: all bounded (by the kernel's references,
        the open files and the fd cache), whatever the size of the tree."""
        return {"pid": os.getpid(), "nodes": len(self.nodes), "handles": len(self.handles),
                "dirfds": len(self._dirfds), "listed_names": self._listed_names}

    def statfs(self):
        top = self.layers[UPPER] if self.writable else self.layers[1]
        return os.statvfs(whiteout.fd_path(top.fd))
