"""pyfuse3 adapter: translates requests into calls on the Union façade and back.

Translation only: bytes and ints in, EntryAttributes out. Every handler maps
OSError to FUSEError(errno); anything else is logged with its traceback and
answered EIO, so a bug never takes the server down. An operation that needs
copy-ups first raises Deferred; `_call` hands that to the copier (worker
threads, per-node locks: fuse.copier) and calls the operation again.

Concurrency contract: handlers run on the trio event loop, one request at a
time between awaits; the filesystem (fs.union) is synchronous and is only
called from here, so its tables need no locks. The only awaits are the
copier's.
"""
import errno
import functools
import json
import logging
from time import perf_counter_ns

import pyfuse3

from ..fs.union import Caller, Deferred, Union
from .copier import Copier
from .entries import set_node_id
from .stats import Counters, Events

log = logging.getLogger("unionfs")

# Reading this xattr of the root (never listed) reports the server's tables
# and counters; reading WHICH_XATTR of any object says where it comes from
# (WHICH_XATTR/NAME of a directory: where its entry NAME comes from, or what
# hides it).
STATS_XATTR = b"user.unionfs.stats"
WHICH_XATTR = b"user.unionfs.which"

ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0
# A missing name is answered with an entry of node id 0 (a negative entry),
# which the kernel caches as long as a positive one: exec's PATH search, the
# dynamic loader and imports probe many missing names, each a LOOKUP again
# after an ENOENT. Every change of names goes through this mount, and the
# kernel replaces a negative dentry itself when it creates, renames or links
# onto it, so nothing needs invalidating (as for positive entries, changes
# made to the layers behind the mount are not seen).
NEGATIVE_TIMEOUT = ENTRY_TIMEOUT
# An operation is retried after each round of copies it asked for; a few
# rounds are normal (a rename that raced another rename), hundreds a bug.
MAX_DEFERRALS = 100


def translate_errors(fn):
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        start = perf_counter_ns()
        error = None
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as e:
            error = e.errno
            raise
        except OSError as e:
            error = e.errno or errno.EIO
            raise pyfuse3.FUSEError(error) from None
        except Exception as e:
            log.exception("internal error in %s", op)
            error = errno.EIO
            if self.events:
                self.events.publish({"type": "error", "op": op,
                                     "message": f"{type(e).__name__}: {e}"})
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.counters.request(op, perf_counter_ns() - start, error)
            changed = self.u.changed_attrs()
            if changed:
                _invalidate_attrs(changed)
    return wrapper


def _invalidate_attrs(inodes):
    """A copy-up changes attributes the kernel has cached (ctime, a
    directory's nlink once merged): drop them. Attribute-only invalidation
    takes no inode lock, so it is safe inside any request."""
    for ino in set(inodes):
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError:
            pass        # the kernel no longer knows the inode: nothing cached


def caller(ctx) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask)


def attributes(attrs) -> pyfuse3.EntryAttributes:
    """A reply's attributes: what stat will show (st_ino included)."""
    st = attrs.st
    a = pyfuse3.EntryAttributes()
    a.st_ino = attrs.ino
    a.generation = 0
    a.entry_timeout = ENTRY_TIMEOUT
    a.attr_timeout = ATTR_TIMEOUT
    a.st_mode = st.st_mode
    a.st_nlink = attrs.nlink
    a.st_uid = st.st_uid
    a.st_gid = st.st_gid
    a.st_rdev = st.st_rdev
    a.st_size = st.st_size
    a.st_blksize = st.st_blksize
    a.st_blocks = st.st_blocks
    a.st_atime_ns = st.st_atime_ns
    a.st_mtime_ns = st.st_mtime_ns
    a.st_ctime_ns = st.st_ctime_ns
    return a


def entry_attributes(node, attrs) -> pyfuse3.EntryAttributes:
    """The reply naming an entry: the node's id, and its attributes."""
    a = attributes(attrs)
    set_node_id(a, node.ino)
    return a


def entry(node_attrs) -> pyfuse3.EntryAttributes:
    return entry_attributes(*node_attrs)


def negative_entry() -> pyfuse3.EntryAttributes:
    """The reply to a lookup of a missing name: node id 0, cached by the kernel
    for NEGATIVE_TIMEOUT (no FORGET follows: the kernel holds no node)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = NEGATIVE_TIMEOUT
    a.attr_timeout = 0
    return a


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, union: Union, copy_threads: int = 4, xattrs: bool = True):
        super().__init__()
        self.u = union
        # noxattrs=1: xattrs are off (EOPNOTSUPP, not ENOSYS: the kernel would
        # stop asking, and the server's own stats xattr must stay readable)
        self.xattrs = xattrs
        # POSIX ACLs enforced by the kernel (read in pyfuse3's init), as
        # fuse-overlayfs and the kernel's overlayfs do, unless `noacl` (ACLs
        # live in xattrs: none without them)
        self.enable_acl = xattrs and not union.id_options.noacl
        self.counters = Counters()
        self.negative_entries = 0       # lookups answered with a negative entry
        self.events = Events()
        self._copier = Copier(union, copy_threads, self.counters, self.events)

    def init(self) -> None:
        # the kernel's INIT: the mount is live, the server is idle
        self._copier.prestart()

    def stats(self) -> dict:
        """The server's tables and counters, as the control API reports them."""
        return {**self.u.stats(), **self.counters.snapshot(),
                "negative_entries": self.negative_entries,
                "copies_in_flight": len(self.u.in_flight)}

    async def _call(self, fn, *args, **kwargs):
        """fn(*args), after the copy-ups it asks for (see the module doc)."""
        for _ in range(MAX_DEFERRALS):
            try:
                return fn(*args, **kwargs)
            except Deferred as d:
                await self._copier.settle(d)
        raise RuntimeError(f"{fn.__name__} still deferred after {MAX_DEFERRALS} rounds")

    # ---- handlers -----------------------------------------------------------

    @translate_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return entry(self.u.lookup(parent_inode, name))
        except FileNotFoundError:
            self.negative_entries += 1
            return negative_entry()

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.u.forget(ino, count)

    @translate_errors
    async def getattr(self, inode, ctx=None):
        node, attrs = self.u.getattr(inode)
        return attributes(attrs)

    @translate_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        node, attrs = await self._call(self.u.setattr, inode, fh=fh, **kw)
        return attributes(attrs)

    @translate_errors
    async def readlink(self, inode, ctx):
        return self.u.readlink(inode)

    @translate_errors
    async def opendir(self, inode, ctx):
        return self.u.opendir(inode)

    @translate_errors
    async def readdir(self, fh, start_id, token):
        for next_id, name, node, attrs in self.u.readdir(fh, start_id):
            if node is None:    # name, type and inode number only: node id 0
                entry = attributes(attrs)
                set_node_id(entry, 0)
                if not pyfuse3.readdir_reply(token, name, entry, next_id):
                    break
                continue
            if not pyfuse3.readdir_reply(token, name, entry_attributes(node, attrs), next_id):
                self.u.entry_unsent(node)
                break
            if next_id > 2:     # the kernel takes no reference for . and ..
                self.u.entry_sent(node)

    @translate_errors
    async def releasedir(self, fh):
        self.u.releasedir(fh)

    @translate_errors
    async def fsyncdir(self, fh, datasync):
        pass

    @translate_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return entry(await self._call(self.u.mkdir, parent_inode, name, mode, caller(ctx)))

    @translate_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return entry(await self._call(self.u.mknod, parent_inode, name, mode, rdev,
                                      caller(ctx)))

    @translate_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return entry(await self._call(self.u.symlink, parent_inode, name, target,
                                      caller(ctx)))

    @translate_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return entry(await self._call(self.u.link, inode, new_parent_inode, new_name))

    @translate_errors
    async def unlink(self, parent_inode, name, ctx):
        await self._call(self.u.unlink, parent_inode, name)

    @translate_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self._call(self.u.rmdir, parent_inode, name)

    @translate_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._call(self.u.rename, parent_inode_old, name_old, parent_inode_new,
                         name_new, flags)

    @translate_errors
    async def open(self, inode, flags, ctx):
        fh = await self._call(self.u.open, inode, flags, caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @translate_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, node, attrs = await self._call(self.u.create, parent_inode, name, mode, flags,
                                           caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry_attributes(node, attrs)

    @translate_errors
    async def read(self, fh, off, size):
        return self.u.read(fh, off, size)

    @translate_errors
    async def write(self, fh, off, buf):
        return self.u.write(fh, off, buf)

    @translate_errors
    async def flush(self, fh):
        # Declined for good: the kernel takes ENOSYS as "no FLUSH ever"
        # (fc->no_flush) and close() still succeeds. unionfs has nothing to do
        # at close: writes reach the layer's file in WRITE (an error is that
        # write's), durable mode syncs in the copy-up and in FSYNC, and the
        # kernel keeps POSIX locks itself (no GETLK/SETLK here).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @translate_errors
    async def fsync(self, fh, datasync):
        self.u.fsync(fh, datasync)

    @translate_errors
    async def release(self, fh):
        self.u.release(fh)

    @translate_errors
    async def getxattr(self, inode, name, ctx):
        if name == STATS_XATTR and inode == pyfuse3.ROOT_INODE:
            return json.dumps(self.stats()).encode()
        if name.startswith(WHICH_XATTR):
            # WHICH_XATTR + b"/" + NAME asks about a child that may not exist
            child = name[len(WHICH_XATTR) + 1:] if name[len(WHICH_XATTR):][:1] == b"/" else b""
            if child or name == WHICH_XATTR:
                return json.dumps(self.u.which_node(inode, child)).encode()
        self._check_xattrs()
        return self.u.getxattr(inode, name)

    @translate_errors
    async def listxattr(self, inode, ctx):
        self._check_xattrs()
        return self.u.listxattr(inode)

    @translate_errors
    async def setxattr(self, inode, name, value, ctx):
        self._check_xattrs()
        await self._call(self.u.setxattr, inode, name, value)

    @translate_errors
    async def removexattr(self, inode, name, ctx):
        self._check_xattrs()
        await self._call(self.u.removexattr, inode, name)

    def _check_xattrs(self):
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @translate_errors
    async def access(self, inode, mode, ctx):
        # Mounted with default_permissions (serve.server, daemon.client), the
        # kernel checks access(2) itself and never sends ACCESS. Should it
        # ever, ENOSYS tells it to stop asking and grant (fc->no_access).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @translate_errors
    async def statfs(self, ctx):
        sv = self.u.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = sv.f_bsize
        s.f_frsize = sv.f_frsize
        s.f_blocks = sv.f_blocks
        s.f_bfree = sv.f_bfree
        s.f_bavail = sv.f_bavail
        s.f_files = sv.f_files
        s.f_ffree = sv.f_ffree
        s.f_favail = sv.f_favail
        s.f_namemax = sv.f_namemax
        return s
