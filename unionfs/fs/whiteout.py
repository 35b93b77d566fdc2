"""Whiteout and opaque-directory rules, in both on-disk formats.

Reads every form a layer may hold:
- kernel overlayfs: a char device 0/0 named NAME, or a zero-size regular file
  with the xattr ``trusted.overlay.whiteout`` (or ``user.overlay.whiteout``);
  a directory with ``trusted.overlay.opaque=y`` (or ``user.overlay.opaque=y``);
- OCI image layers: an empty file ``.wh.NAME`` hides NAME in lower layers; a
  file ``.wh..wh..opq`` makes its directory opaque.
Writes one of three forms, chosen at mount by what the server may do
(fs.profile): the kernel's (char 0/0 whiteouts, ``trusted.overlay.opaque``:
real root), the kernel's rootless form, what ``mount -t overlay -o userxattr``
reads in a user namespace (char 0/0 whiteouts, ``user.overlay.opaque``), or
the OCI form (a plain user without a user namespace).

Everything here works on a directory fd plus a name, never on a path that
could be resolved through a symlink.
"""
import errno
import os
import stat

from ..sys import libc

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")

FORMAT_KERNEL = "kernel"
FORMAT_USERXATTR = "userxattr"
FORMAT_OCI = "oci"
FORMATS = (FORMAT_KERNEL, FORMAT_USERXATTR, FORMAT_OCI)

# xattrs that belong to the union's own bookkeeping and are never shown
PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"trusted.unionfs.",
                          b"user.unionfs.")


def is_marker_name(name: bytes) -> bool:
    """True for names that are on-disk markers and never visible in the union."""
    return name.startswith(WH_PREFIX)


def whited_out_name(name: bytes) -> bytes | None:
    """For an OCI whiteout file name ``.wh.X`` return X, else None."""
    if name.startswith(WH_PREFIX) and name != OPAQUE_MARKER:
        return name[len(WH_PREFIX):] or None
    return None


def entry_path(dirfd: int, name: bytes) -> bytes:
    # xattr calls take no dirfd; go through the fd's magic link, then lstat
    # semantics on the last component (follow_symlinks=False).
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


def fd_path(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


# xattr calls on an object named by an entry path (never followed) or by an
# fd of its own (an open file: fgetxattr and friends)
def xattr_get(target, name) -> bytes:
    if isinstance(target, int):
        return os.getxattr(target, name)
    return os.getxattr(target, name, follow_symlinks=False)


def xattr_set(target, name, value: bytes, flags: int = 0) -> None:
    if isinstance(target, int):
        os.setxattr(target, name, value, flags)
    else:
        os.setxattr(target, name, value, flags, follow_symlinks=False)


def xattr_list(target) -> list:
    if isinstance(target, int):
        return os.listxattr(target)
    return os.listxattr(target, follow_symlinks=False)


def xattr_remove(target, name) -> None:
    if isinstance(target, int):
        os.removexattr(target, name)
    else:
        os.removexattr(target, name, follow_symlinks=False)


def _has_xattr(path: bytes, names, follow: bool, want: bytes | None = None) -> bool:
    for xname in names:
        try:
            value = os.getxattr(path, xname, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                continue
            raise
        if want is None or value == want:
            return True
    return False


def is_whiteout(dirfd: int, name: bytes, st: os.stat_result,
                xattr_whiteouts: bool = True) -> bool:
    """Is the entry NAME (already lstat'ed as st) a whiteout in kernel form?

    xattr_whiteouts: may the directory hold whiteouts in xattr form? As in
    the kernel, only a directory marked so (has_xattr_whiteouts) is searched
    for them: otherwise every empty file would cost a getxattr."""
    mode = st.st_mode
    if stat.S_ISCHR(mode):
        return st.st_rdev == 0
    if xattr_whiteouts and stat.S_ISREG(mode) and st.st_size == 0:
        return has_whiteout_xattr(dirfd, name)
    return False


def has_whiteout_xattr(dirfd: int, name: bytes) -> bool:
    """Does dirfd/name carry a whiteout xattr? (One listxattr: most empty
    files have no xattrs at all.)"""
    try:
        names = os.listxattr(entry_path(dirfd, name), follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.ENOENT):
            return False
        raise
    return any(n in WHITEOUT_XATTRS for n in names)


def has_xattr_whiteouts(dir_fd: int) -> bool:
    """Is the directory open as dir_fd marked as holding xattr whiteouts (its
    opaque xattr is "x", the kernel's mark for a merge directory that does)?"""
    return _has_xattr(fd_path(dir_fd), OPAQUE_XATTRS, follow=True, want=b"x")


def is_opaque(dirfd: int, name: bytes) -> bool:
    """Is the directory dirfd/name (known to be a directory) opaque, in
    either form: the opaque xattr, or an OCI marker file inside it?"""
    if _has_xattr(entry_path(dirfd, name), OPAQUE_XATTRS, follow=False, want=b"y"):
        return True
    try:
        os.stat(name + b"/" + OPAQUE_MARKER, dir_fd=dirfd, follow_symlinks=False)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def has_oci_whiteout(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(WH_PREFIX + name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return False
        raise


def device_whiteouts(fmt: str) -> bool:
    """Are whiteouts of this format char 0/0 devices (renameat2 can leave one)?"""
    return fmt != FORMAT_OCI


def make_whiteout(dirfd: int, name: bytes, fmt: str) -> bool:
    """Write a marker hiding NAME of lower layers. A device whiteout takes
    NAME itself (which must not exist); an OCI one sits beside NAME and may
    be made first. True if a marker was made, False if an OCI marker was
    there already (it hid a lower NAME before NAME was made)."""
    if device_whiteouts(fmt):
        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dirfd)
        return True
    try:
        fd = os.open(WH_PREFIX + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600, dir_fd=dirfd)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def rename_leaving_whiteout(old_dir: int, old: bytes, new_dir: int, new: bytes,
                           work_dir: int, temp: bytes) -> None:
    """rename(old, new) leaving a char 0/0 whiteout at old, in one step:
    renameat2(RENAME_WHITEOUT), or where the filesystem has no such flag
    (EINVAL: ramfs, some network filesystems) a whiteout made in the
    workdir (under `temp`) and exchanged with old, then the object moved on
    (and exchanged back if that fails)."""
    try:
        libc.renameat2(old_dir, old, new_dir, new, libc.RENAME_WHITEOUT)
        return
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    os.mknod(temp, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=work_dir)
    try:
        libc.renameat2(work_dir, temp, old_dir, old, libc.RENAME_EXCHANGE)
    except BaseException:
        os.unlink(temp, dir_fd=work_dir)
        raise
    try:
        libc.renameat2(work_dir, temp, new_dir, new, 0)
    except BaseException:
        libc.renameat2(work_dir, temp, old_dir, old, libc.RENAME_EXCHANGE)
        os.unlink(temp, dir_fd=work_dir)
        raise


def remove_oci_whiteout(dirfd: int, name: bytes) -> None:
    try:
        os.unlink(WH_PREFIX + name, dir_fd=dirfd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise


def make_opaque(dir_fd: int, fmt: str) -> None:
    """Mark the directory open as dir_fd (an O_PATH or O_RDONLY fd) opaque."""
    if fmt == FORMAT_KERNEL:
        os.setxattr(fd_path(dir_fd), OPAQUE_XATTRS[0], b"y")
    elif fmt == FORMAT_USERXATTR:
        os.setxattr(fd_path(dir_fd), OPAQUE_XATTRS[1], b"y")
    else:
        # a marker file is bookkeeping, not a change of the directory: keep its times
        path = fd_path(dir_fd)
        st = os.stat(path)
        fd = os.open(OPAQUE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        os.close(fd)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def is_private_xattr(name: bytes) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)
