"""The pyfuse3 floor: the least a pyfuse3 + trio server can do per request.

A passthrough of one directory (the stack's native tree, restored after each
workload like the `native` target): every handler is one or two system calls
on the real path, with no layers, no copy-up, no locks and no thread hops.
It mounts with the same options and kernel cache settings as unionfs (entry
and attribute timeouts of 300 s, negative entries, keep_cache, FLUSH
declined, readdirplus as pyfuse3 always answers), so the distance from
unionfs to the floor is what the union costs, and the distance from the
floor to fuse-overlayfs (C on libfuse) is what pyfuse3 and trio cost.

Node ids are the tree's own inode numbers (the root is 1); a node stays
known for the life of the mount (FORGET is ignored: a bench mount is short).

Run as `python -m bench.floor TREE MOUNTPOINT`; it serves in the foreground
until unmounted.
"""
import errno
import os
import stat
import sys

import pyfuse3
import trio

TIMEOUT = 300.0


def _errors(fn):
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
    wrapper.__name__ = fn.__name__
    return wrapper


class Floor(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree):
        super().__init__()
        self.root_ino = os.lstat(tree).st_ino
        self.paths = {pyfuse3.ROOT_INODE: tree}
        self.listings = {}
        self.next_dir_fh = 1

    # ---------------------------------------------------------- nodes
    def _ino(self, st):
        return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

    def _entry(self, path, st=None):
        st = st or os.lstat(path)
        ino = self._ino(st)
        self.paths[ino] = path
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_rdev, a.st_size, a.st_blksize, a.st_blocks = (st.st_rdev, st.st_size,
                                                          st.st_blksize, st.st_blocks)
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _child(self, parent, name):
        return os.path.join(self.paths[parent], os.fsdecode(name))

    @staticmethod
    def _own(path, ctx):
        os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    # ---------------------------------------------------------- lookups
    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        path = self._child(parent_inode, name)
        try:
            return self._entry(path)
        except FileNotFoundError:
            a = pyfuse3.EntryAttributes()
            a.st_ino, a.entry_timeout = 0, TIMEOUT
            return a

    async def forget(self, inode_list):
        pass

    @_errors
    async def getattr(self, inode, ctx=None):
        return self._entry(self.paths[inode])

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self.paths[inode]
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return self._entry(path)

    @_errors
    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink(self.paths[inode]))

    # ---------------------------------------------------------- directories
    @_errors
    async def opendir(self, inode, ctx):
        path = self.paths[inode]
        with os.scandir(path) as it:
            names = sorted(os.fsencode(e.name) for e in it)
        fh, self.next_dir_fh = self.next_dir_fh, self.next_dir_fh + 1
        self.listings[fh] = (path, names)
        return fh

    @_errors
    async def readdir(self, fh, start_id, token):
        path, names = self.listings[fh]
        for i in range(start_id, len(names)):
            try:
                entry = self._entry(os.path.join(path, os.fsdecode(names[i])))
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, names[i], entry, i + 1):
                break

    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        self._own(path, ctx)
        return self._entry(path)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(self._child(parent_inode, name))

    # ---------------------------------------------------------- names
    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        os.mknod(path, mode & ~ctx.umask, rdev)
        self._own(path, ctx)
        return self._entry(path)

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        self._own(path, ctx)
        return self._entry(path)

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        os.link(self.paths[inode], path, follow_symlinks=False)
        return self._entry(path)

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(self._child(parent_inode, name))

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        os.rename(old, new)
        self._entry(new)        # the node (and any node below it) lives at the new path
        if os.path.isdir(new) and not os.path.islink(new):
            prefix = old + "/"
            for ino, path in list(self.paths.items()):
                if path.startswith(prefix):
                    self.paths[ino] = new + path[len(old):]

    # ---------------------------------------------------------- files
    @_errors
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=os.open(self.paths[inode], flags & ~os.O_CREAT),
                                keep_cache=True)

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT, mode & ~ctx.umask)
        self._own(path, ctx)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._entry(path)

    @_errors
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @_errors
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)      # as unionfs: the kernel stops sending it

    @_errors
    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    @_errors
    async def release(self, fh):
        os.close(fh)

    @_errors
    async def statfs(self, ctx):
        sv = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(sv, field))
        return out

    # ---------------------------------------------------------- xattrs
    @_errors
    async def getxattr(self, inode, name, ctx):
        return os.getxattr(self.paths[inode], name, follow_symlinks=False)

    @_errors
    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in os.listxattr(self.paths[inode], follow_symlinks=False)]

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        os.setxattr(self.paths[inode], name, value, follow_symlinks=False)

    @_errors
    async def removexattr(self, inode, name, ctx):
        os.removexattr(self.paths[inode], name, follow_symlinks=False)


def main(argv=None):
    tree, mountpoint = argv or sys.argv[1:]
    options = {"fsname=floor", "subtype=pyfuse3-floor", "default_permissions", "allow_other",
               "dev", "suid"}
    pyfuse3.init(Floor(os.path.realpath(tree)), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
