"""pyfuse3 adapter: translates requests into core.Union calls and back.

Thin by design: bytes and ints in, EntryAttributes out. Every handler maps
OSError to FUSEError(errno); anything else is logged with its traceback and
answered EIO, so a bug never takes the server down. Copy-ups run their disk
work in worker threads (one lock per node: a second open of a file being
copied up waits for the first copy and does not start another).
"""
import errno
import functools
import json
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import pyfuse3
import trio

from ..fs import copyup
from ..fs.core import Caller, Union

log = logging.getLogger("unionfs")

# Reading this xattr of the root (never listed) reports the server's tables.
STATS_XATTR = b"user.unionfs.stats"

ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0


def translate_errors(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if self.u.attr_changed:
                self._invalidate_attrs()
    return wrapper


# A copy this small, with no fsync to wait for, costs less than a thread hop.
QUICK_COPY_BYTES = 256 << 10
# Fault injection for tests: every copy-up runs in a worker thread that first
# waits this many seconds, so that other requests can arrive mid-copy.
COPY_DELAY = float(os.environ.get("UNIONFS_COPY_DELAY") or 0)


def _delayed(fn):
    def run(*args):
        time.sleep(COPY_DELAY)
        return fn(*args)
    return run


def _quick(job) -> bool:
    if COPY_DELAY:
        return False
    if job.kind == copyup.META or job.clone_only or not stat.S_ISREG(job.st.st_mode):
        return True
    return not job.durable and job.st.st_size <= QUICK_COPY_BYTES


class CopyWorkers:
    """Threads for copy-ups that live as long as the server. trio's own
    thread cache lets an idle thread go after 10 s, and starting a thread
    costs the next copy-up about half a millisecond."""

    def __init__(self, threads: int):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="copy-up")

    def start(self, fn, *args) -> None:
        """Run fn in the background; nobody waits for it."""
        self._pool.submit(fn, *args)

    async def run(self, fn, *args):
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):     # the copy finishes even at shutdown
            await done.wait()
        return future.result()


def caller(ctx) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, union: Union, copy_threads: int = 4):
        super().__init__()
        self.u = union
        self._copy_locks: dict[int, trio.Lock] = {}
        self._workers = CopyWorkers(copy_threads)
        self._refill_temp_pool()

    def _refill_temp_pool(self):
        if self.u.temp_pool is not None and self.u.temp_pool.wanted():
            self._workers.start(self.u.temp_pool.refill)

    # ---- attributes -------------------------------------------------------

    def _attrs(self, node, st_nlink) -> pyfuse3.EntryAttributes:
        st, nlink = st_nlink
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = nlink
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

    def _reply(self, node_stat):
        node, st = node_stat
        return self._attrs(node, st)

    # ---- copy-up off the event loop ---------------------------------------

    async def _copy_up(self, node, meta_only=False):
        for n in self.u.copyup_chain(node, meta_only):
            lock = self._copy_locks.setdefault(n.ino, trio.Lock())
            async with lock:
                # the copy may have happened while we waited for the lock
                if n in self.u.copyup_chain(n, meta_only):
                    job = self.u.copyup_job(n, meta_only)
                    if _quick(job):
                        try:
                            copyup.run(job)
                        except copyup.NotCloned:
                            job.clone_only = False
                            await self._workers.run(copyup.run, job)
                    else:
                        await self._workers.run(_delayed(copyup.run) if COPY_DELAY
                                                else copyup.run, job)
                    self.u.commit_copyup(n, job)
            if not lock.statistics().tasks_waiting:
                self._copy_locks.pop(n.ino, None)
        self._refill_temp_pool()

    def _invalidate_attrs(self):
        """A copy-up changes attributes the kernel has cached (ctime, a
        directory's nlink once merged): drop them. Attribute-only invalidation
        takes no inode lock, so it is safe inside any request."""
        changed, self.u.attr_changed = self.u.attr_changed, []
        for ino in set(changed):
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:
                pass        # the kernel no longer knows the inode: nothing cached

    # ---- handlers -----------------------------------------------------------

    @translate_errors
    async def lookup(self, parent_inode, name, ctx=None):
        return self._reply(self.u.lookup(parent_inode, name))

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.u.forget(ino, count)

    @translate_errors
    async def getattr(self, inode, ctx=None):
        node, st = self.u.getattr(inode)
        a = self._attrs(node, st)
        if inode == pyfuse3.ROOT_INODE:
            a.st_ino = self.u.root_st_ino
        return a

    @translate_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.u.node(inode)
        await self._copy_up(node, meta_only=not fields.update_size)
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
        return self._reply(self.u.setattr(inode, fh=fh, **kw))

    @translate_errors
    async def readlink(self, inode, ctx):
        return self.u.readlink(inode)

    @translate_errors
    async def opendir(self, inode, ctx):
        return self.u.opendir(inode)

    @translate_errors
    async def readdir(self, fh, start_id, token):
        for next_id, name, node, st in self.u.readdir(fh, start_id):
            attrs = self._attrs(node, st)
            if node.parent is None:     # only . or .. can name the root here
                attrs.st_ino = self.u.root_st_ino
            if not pyfuse3.readdir_reply(token, name, attrs, next_id):
                self.u.forget(node.ino, 0)      # not sent: keep no node for it
                break
            if next_id > 2:     # the kernel takes no reference for . and ..
                node.lookups += 1

    @translate_errors
    async def releasedir(self, fh):
        self.u.releasedir(fh)

    @translate_errors
    async def fsyncdir(self, fh, datasync):
        pass

    @translate_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._copy_up(self.u.node(parent_inode))
        return self._reply(self.u.mkdir(parent_inode, name, mode, caller(ctx)))

    @translate_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._copy_up(self.u.node(parent_inode))
        return self._reply(self.u.mknod(parent_inode, name, mode, rdev, caller(ctx)))

    @translate_errors
    async def symlink(self, parent_inode, name, target, ctx):
        await self._copy_up(self.u.node(parent_inode))
        return self._reply(self.u.symlink(parent_inode, name, target, caller(ctx)))

    @translate_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._copy_up(self.u.node(inode))
        return self._reply(self.u.link(inode, new_parent_inode, new_name))

    @translate_errors
    async def unlink(self, parent_inode, name, ctx):
        self.u.unlink(parent_inode, name)

    @translate_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.u.rmdir(parent_inode, name)

    @translate_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.u.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @translate_errors
    async def open(self, inode, flags, ctx):
        if self.u.needs_copyup_for_open(flags):
            await self._copy_up(self.u.node(inode))
        fh = self.u.open(inode, flags, caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @translate_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._copy_up(self.u.node(parent_inode))
        fh, node, st = self.u.create(parent_inode, name, mode, flags, caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attrs(node, st)

    @translate_errors
    async def read(self, fh, off, size):
        return self.u.read(fh, off, size)

    @translate_errors
    async def write(self, fh, off, buf):
        return self.u.write(fh, off, buf)

    @translate_errors
    async def flush(self, fh):
        pass

    @translate_errors
    async def fsync(self, fh, datasync):
        self.u.fsync(fh, datasync)

    @translate_errors
    async def release(self, fh):
        self.u.release(fh)

    @translate_errors
    async def getxattr(self, inode, name, ctx):
        if name == STATS_XATTR and inode == pyfuse3.ROOT_INODE:
            return json.dumps(self.u.stats()).encode()
        return self.u.getxattr(inode, name)

    @translate_errors
    async def listxattr(self, inode, ctx):
        return self.u.listxattr(inode)

    @translate_errors
    async def setxattr(self, inode, name, value, ctx):
        await self._copy_up(self.u.node(inode), meta_only=True)
        self.u.setxattr(inode, name, value)

    @translate_errors
    async def removexattr(self, inode, name, ctx):
        self.u.getxattr(inode, name)          # a missing name: ENODATA, nothing copied
        await self._copy_up(self.u.node(inode), meta_only=True)
        self.u.removexattr(inode, name)

    @translate_errors
    async def access(self, inode, mode, ctx):
        # default_permissions: the kernel checks mode bits; we only confirm existence
        self.u.getattr(inode)

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
