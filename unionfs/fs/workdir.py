"""The workdir's scratch space (WORK/work, as the kernel's): temporary names,
a pool of ready inodes, and cleaning.

Everything built before it is renamed into the upper (copies, new entries
over whiteouts, opaque directories) and everything removed from the upper
(directories, moved out first) passes through here under a temporary name,
so the upper only ever changes by renames. What is left after a crash is
removed at the next mount.
"""
import errno
import os
import threading
from collections import deque

from ..sys import libc


def temp_name() -> bytes:
    return b"#uf" + os.urandom(8).hex().encode()


class TempPool:
    """Empty files and directories made ahead of need in the workdir.

    Allocating an inode can cost 150-250 us of CPU: ext4 without a journal
    (this host's) skips recently deleted inodes, reading each one's inode
    block, and XFS may have to allocate an inode chunk. A copy-up that takes
    a ready one does not wait for that. The pool is refilled off the request
    path (refill() runs in a worker thread); an empty pool just means the
    copy-up creates its own. Pool entries are
    workdir litter like any other: removed at unmount, and by clean_workdir
    after a crash."""

    # A few once the mount is live (the adapter fills the pool when the
    # kernel's INIT has arrived, in a worker thread: the mount's start does
    # not wait for it, and the first copy-up finds them); more once copy-ups
    # find the pool empty.
    START = (4, 2)
    FULL = (32, 8)

    def __init__(self, work_dir: int):
        self.work_dir = work_dir
        self.files: deque = deque()
        self.dirs: deque = deque()
        self.want_files, self.want_dirs = self.START
        self._refilling = threading.Lock()
        self._closed = False

    def take(self, is_dir: bool) -> bytes | None:
        try:
            return (self.dirs if is_dir else self.files).popleft()
        except IndexError:
            # copy-ups come faster than the refills: keep more ready. Growing
            # on a miss only (not on the first take) spares a mount that
            # copies up a file or two the CPU of making FULL inodes right
            # while its first copy-up's writes arrive.
            self.want_files, self.want_dirs = self.FULL
            return None

    def wanted(self) -> bool:
        return not self._closed and (len(self.files) <= self.want_files // 2
                                     or len(self.dirs) <= self.want_dirs // 2)

    def refill(self) -> None:
        if not self._refilling.acquire(blocking=False):
            return      # another refill is under way
        try:
            while not self._closed and len(self.dirs) < self.want_dirs:
                name = temp_name()
                os.mkdir(name, 0o700, dir_fd=self.work_dir)
                self.dirs.append(name)
            while not self._closed and len(self.files) < self.want_files:
                name = temp_name()
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600, dir_fd=self.work_dir))
                self.files.append(name)
        except OSError:
            pass        # a full disk: copy-ups will say so themselves
        finally:
            self._refilling.release()

    def close(self) -> None:
        """Stop refilling (waiting for a refill under way) and remove the pool."""
        self._closed = True
        with self._refilling:
            for q in (self.files, self.dirs):
                while q:
                    remove_tree(self.work_dir, q.popleft())


def clean_workdir(work_dir: int) -> int:
    """Remove everything left in the work directory by an earlier crash."""
    count = 0
    rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=work_dir)
    try:
        names = [os.fsencode(n) for n in os.listdir(rfd)]
    finally:
        os.close(rfd)
    for name in names:
        remove_tree(work_dir, name)
        count += 1
    return count


def remove_tree(dirfd: int, name: bytes) -> None:
    """rm -rf of dirfd/name without following symlinks."""
    try:
        os.unlink(name, dir_fd=dirfd)
        return
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EISDIR, errno.EPERM):
            raise
    sub = libc.openat2(dirfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for child in os.listdir(sub):
            remove_tree(sub, os.fsencode(child))
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dirfd)
