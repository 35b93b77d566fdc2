"""Copy one object into the upper layer: data, metadata, xattrs, atomically.

The object is built under a temporary name in the workdir, made durable
(fsync, unless volatile), then renamed into place, so no half-copied file is
ever visible in upper; a crash leaves only workdir litter, removed at the next
mount. Data goes by FICLONE, else copy_file_range, else sendfile, over data
extents only (SEEK_DATA/SEEK_HOLE), so holes stay holes.

This module touches the disk only, through fds it is given (and owns: a job's
fds are dup'ed for it, so it can run in a worker thread while the event loop
goes on). It never sees the node table.
"""
import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from ..sys import libc
from . import idmap, whiteout
from .inodes import pack_origin
from .workdir import TempPool, remove_tree, temp_name


def origin_xattr(ns: str) -> str:
    """Our bookkeeping xattrs live where the server may write them (the
    profile's namespace): trusted.* (it also works on symlinks) or user.*."""
    return f"{ns}.unionfs.origin"


def metacopy_xattr(ns: str) -> str:
    """The kernel's metacopy marker (read by overlayfs with metacopy=on)."""
    return f"{ns}.overlay.metacopy"

FULL = "full"       # data and metadata of a lower object
META = "meta"       # metadata only: a sparse file marked metacopy; data stays below
DATA = "data"       # complete a metacopy file: lower data + upper metadata, replacing it


class Reflinks:
    """What one stack has learnt about cloning: the (source st_dev,
    destination st_dev) pairs on which FICLONE worked, or failed. Shared by
    the stack's copy jobs (set updates are atomic under the GIL)."""

    def __init__(self):
        self.works: set = set()
        self.fails: set = set()

    def expected(self, devs: tuple) -> bool:
        return devs in self.works

    def worth_trying(self, devs: tuple) -> bool:
        return devs not in self.fails

    def learn(self, devs: tuple, ok: bool) -> None:
        (self.works if ok else self.fails).add(devs)
        (self.fails if ok else self.works).discard(devs)


@dataclass
class CopyJob:
    src_dir: int          # fd (O_PATH) of the data source's parent directory in its layer
    name: bytes           # name in both source and destination parents
    dst_dir: int          # fd of the upper parent directory
    work_dir: int         # fd of the workdir (same filesystem as upper)
    st: os.stat_result    # lstat of the metadata source
    origin: tuple | None  # the origin's (st_dev, st_ino) to record, or None
    durable: bool         # fsync before rename
    kind: str = FULL
    devs: tuple = ()      # (source layer st_dev, upper st_dev)
    clone_only: bool = False  # data by FICLONE or not at all (NotCloned): run inline
    pool: TempPool | None = None
    reflinks: Reflinks | None = None
    xattr_ns: str = "trusted"   # of the origin and metacopy xattrs we write
    result: tuple | None = None  # after run: the copy's own (st_dev, st_ino)
    # Under id options (fs.owners): the source's stored (uid, gid, mode, rdev)
    # through its layer's override (None: st's own); the upper's override
    # xattr name (a directory or regular file then keeps owner and mode
    # there, and gets its backing mode for real); the (source layer's, the
    # upper's) override names by which xattr names are translated; whether a
    # refused chown is no error (squashed owners).
    owner: tuple | None = None
    override: bytes | None = None
    xattr_layers: tuple | None = None
    ignore_chown: bool = False
    # CAP_DAC_OVERRIDE: else user xattrs and the rename of a directory need
    # write permission, so a read-only mode is given after them
    dac_override: bool = True
    placed_mode: int | None = None  # set by run: a mode to give only once in place

    @property
    def meta_dir(self) -> int:
        """Where owner, mode, xattrs and times come from."""
        return self.dst_dir if self.kind == DATA else self.src_dir

    def close(self):
        for fd in (self.src_dir, self.dst_dir, self.work_dir):
            os.close(fd)


def copy_xattrs(src_path: bytes, dst_path: bytes, follow: bool, layers=None) -> None:
    """Copy the xattrs a caller may see: never markers, our bookkeeping or
    override records (written by us, if at all). layers: (source layer's,
    upper's) override names, by which names are translated (fs.idmap)."""
    try:
        names = os.listxattr(src_path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for xname in names:
        stored = os.fsencode(xname)
        if whiteout.is_private_xattr(stored):
            continue
        if layers is None:
            target = None if idmap.is_private(stored) else stored
        else:
            shown = idmap.shown_xattr_name(stored, layers[0])
            target = None if shown is None else idmap.stored_xattr_name(shown, layers[1])
        if target is None:
            continue
        try:
            value = os.getxattr(src_path, stored, follow_symlinks=follow)
            os.setxattr(dst_path, target, value, follow_symlinks=follow)
        except OSError as e:
            # user.* xattrs are not allowed on symlinks and special files
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA):
                raise


class NotCloned(Exception):
    """A clone_only job could not reflink; its fds are still open for a full copy."""


def probe_reflink(work_dir: int, devs: list, reflinks: Reflinks) -> bool:
    """Can the workdir's filesystem reflink? Learnt once, at mount, for the
    (source st_dev, upper st_dev) pairs in devs (all with the workdir's
    st_dev), so that a clone, which costs no more than a create, never waits
    for a worker thread."""
    names = [temp_name(), temp_name()]
    fds = []
    try:
        for name in names:
            fds.append(os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                               dir_fd=work_dir))
        os.pwrite(fds[0], b"\0" * 4096, 0)
        fcntl.ioctl(fds[1], libc.FICLONE, fds[0])
        ok = True
    except OSError:
        ok = False
    finally:
        for fd in fds:
            os.close(fd)
        for name in names[:len(fds)]:
            os.unlink(name, dir_fd=work_dir)
    for pair in devs:
        reflinks.learn(pair, ok)
    return ok


def copy_data(src: int, dst: int, size: int, blocks: int | None = None,
              devs: tuple = (), clone_only: bool = False,
              reflinks: Reflinks | None = None) -> bool:
    """Copy size bytes; blocks (st_blocks of src) tells a file with no holes,
    which needs no hole scan; devs (source and destination st_dev) and
    reflinks remember filesystems that cannot reflink. True when the data
    was reflinked."""
    if reflinks is None or reflinks.worth_trying(devs):
        try:
            fcntl.ioctl(dst, libc.FICLONE, src)
            if reflinks is not None:
                reflinks.learn(devs, True)
            return True
        except OSError:
            if reflinks is not None:
                reflinks.learn(devs, False)
    if clone_only:
        raise NotCloned("the filesystem refused the clone")
    if blocks is not None and blocks * 512 >= size:
        _copy_range(src, dst, 0, size)
        return False
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:   # only a hole is left
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dst, start, end)
        pos = end
    os.ftruncate(dst, size)
    return False


# Below this size sendfile beats copy_file_range's set-up cost (measured on ext4).
SMALL_COPY = 1 << 20


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    off = start
    use_cfr = end - start >= SMALL_COPY
    while off < end:
        count = min(end - off, 1 << 30)
        if use_cfr:
            try:
                n = os.copy_file_range(src, dst, count, off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                use_cfr = False
                continue
        else:
            os.lseek(dst, off, os.SEEK_SET)
            n = os.sendfile(dst, src, off, count)
        if n == 0:
            break
        off += n


def _finish_meta(job: CopyJob, tmp: bytes, fd: int | None) -> None:
    """Owner (chown clears suid/sgid), xattrs (user.* ones need write
    permission without CAP_DAC_OVERRIDE), then mode, then times."""
    st = job.st
    is_link = stat.S_ISLNK(st.st_mode)
    tmp_path = whiteout.entry_path(job.work_dir, tmp)
    src_path = whiteout.entry_path(job.meta_dir, job.name)
    uid, gid, mode, rdev = job.owner or (st.st_uid, st.st_gid, st.st_mode, st.st_rdev)
    override = job.override if job.override is not None and idmap.applies_to(st.st_mode) \
        else None
    if override is None:
        try:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(tmp, uid, gid, dir_fd=job.work_dir, follow_symlinks=False)
        except OSError as e:
            if not job.ignore_chown or e.errno not in (errno.EPERM, errno.EINVAL):
                raise
        perm = stat.S_IMODE(mode)
    else:
        perm = stat.S_IMODE(idmap.backing_mode(st.st_mode))
    copy_xattrs(src_path, tmp_path, False, job.xattr_layers)
    own = os.fstat(fd) if fd is not None else os.stat(tmp, dir_fd=job.work_dir,
                                                        follow_symlinks=False)
    job.result = (own.st_dev, own.st_ino)
    if job.origin is not None:
        try:
            os.setxattr(tmp_path, origin_xattr(job.xattr_ns), pack_origin(job.origin, job.result),
                        follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP):
                raise
    if job.kind == META:
        os.setxattr(tmp_path, metacopy_xattr(job.xattr_ns), b"", follow_symlinks=False)
    if override is not None:
        shown_kind = stat.S_IFMT(mode)
        other_kind = shown_kind != stat.S_IFMT(st.st_mode)
        os.setxattr(tmp_path, override, idmap.encode_override(
            uid, gid, mode, shown_kind if other_kind else None,
            (os.major(rdev), os.minor(rdev)) if other_kind else None), follow_symlinks=False)
    if not is_link:
        if fd is not None:
            os.fchmod(fd, perm)
        else:
            extra = mode_until_placed(job, perm)
            os.chmod(tmp, perm | extra, dir_fd=job.work_dir)
            if extra:
                job.placed_mode = perm
    times = (st.st_atime_ns, st.st_mtime_ns)
    if fd is not None:
        os.utime(fd, ns=times)
    else:
        os.utime(tmp, ns=times, dir_fd=job.work_dir, follow_symlinks=False)


def mode_until_placed(job: CopyJob, perm: int) -> int:
    """Bits a directory's copy keeps until it is renamed into place: moving
    a directory to another parent needs write permission on it, which only
    CAP_DAC_OVERRIDE does without."""
    if job.dac_override or not stat.S_ISDIR(job.st.st_mode) or perm & stat.S_IWUSR:
        return 0
    return stat.S_IWUSR


def run(job: CopyJob) -> None:
    """Copy job.name from src_dir into dst_dir; closes the job's fds, except
    after NotCloned (nothing is left of the attempt: the job can run again,
    without clone_only)."""
    try:
        _run(job)
    except NotCloned:
        raise
    except BaseException:
        job.close()
        raise
    job.close()


def _run(job: CopyJob) -> None:
    st = job.st
    mode = st.st_mode
    pooled = job.pool.take(stat.S_ISDIR(mode)) \
        if job.pool is not None and (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) else None
    tmp = pooled or temp_name()
    fd = None
    shared_data = False     # a reflink: the data blocks are already on disk
    try:
        if stat.S_ISREG(mode):
            fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                         | (0 if pooled else os.O_CREAT | os.O_EXCL), 0o600, dir_fd=job.work_dir)
            if job.kind == META:
                os.ftruncate(fd, st.st_size)
            else:
                src = libc.openat2(job.src_dir, job.name, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    shared_data = copy_data(src, fd, st.st_size,
                                            None if job.kind == DATA else st.st_blocks, job.devs,
                                            job.clone_only, job.reflinks)
                finally:
                    os.close(src)
        elif stat.S_ISDIR(mode):
            if not pooled:
                os.mkdir(tmp, 0o700, dir_fd=job.work_dir)
        elif stat.S_ISLNK(mode):
            target = os.readlink(job.name, dir_fd=job.src_dir)
            os.symlink(target, tmp, dir_fd=job.work_dir)
        else:   # FIFO, socket, device node: recreate as what it is
            os.mknod(tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=job.work_dir)
        _finish_meta(job, tmp, fd)
        # A metacopy holds no data, and a reflinked copy shares blocks already on
        # disk: what they add is journaled metadata, ordered before the rename,
        # so there is nothing to fsync (the kernel does not either).
        if fd is not None and job.durable and job.kind != META and not shared_data:
            os.fsync(fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
            fd = None
        remove_tree(job.work_dir, tmp)
        raise
    finally:
        if fd is not None:
            os.close(fd)
    parent = whiteout.fd_path(job.dst_dir)
    parent_st = os.stat(parent)
    try:
        # completing a metacopy replaces the upper file; anything else is new there
        flags = 0 if job.kind == DATA else libc.RENAME_NOREPLACE
        try:
            libc.renameat2(job.work_dir, tmp, job.dst_dir, job.name, flags)
        except PermissionError:
            if job.dac_override or parent_st.st_mode & stat.S_IWUSR \
                    or parent_st.st_uid != os.geteuid():
                raise
            # a read-only parent of the server's own (its owner may write in
            # the union what the parent holds): writable for the rename only
            os.chmod(parent, stat.S_IMODE(parent_st.st_mode) | stat.S_IWUSR)
            try:
                libc.renameat2(job.work_dir, tmp, job.dst_dir, job.name, flags)
            finally:
                os.chmod(parent, stat.S_IMODE(parent_st.st_mode))
    except BaseException:
        remove_tree(job.work_dir, tmp)
        raise
    if job.placed_mode is not None:
        # the real mode last (a crash before this leaves the owner u+w more)
        os.chmod(job.name, job.placed_mode, dir_fd=job.dst_dir)
    # a copy-up is no change of the parent directory: keep its times, as the kernel does
    os.utime(parent, ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))
