"""Every ctypes call of the project: the Linux calls Python 3.11's os module lacks.

openat2 and renameat2 for the filesystem; unshare, setns, mount, umount2, pivot_root,
sethostname, prctl, open_tree, move_mount and mount_setattr for the runner and
the servers. Each raises OSError(errno) like the os module. libc is opened
once, by its soname (find_library would fork ldconfig: slow).
"""
import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]

SYS_openat2 = 437  # the same number on x86_64 and aarch64 (generic syscall table)

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10     # symlinks and ".." resolve as if the directory were /
# Inside a layer: never follow a symlink, never step out of the layer root.
RESOLVE_IN_LAYER = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

FICLONE = 0x40049409


OPENAT2_ATTEMPTS = 100


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0,
            resolve: int = RESOLVE_IN_LAYER) -> int:
    """openat2(2). With RESOLVE_BENEATH or RESOLVE_IN_ROOT the kernel answers
    EAGAIN when a rename anywhere on the system raced with a `..` it resolved
    (it cannot vouch the path stayed inside): tried again, as the man page says."""
    how = struct.pack("=QQQ", flags | os.O_CLOEXEC, mode, resolve)
    for _ in range(OPENAT2_ATTEMPTS):
        fd = _libc.syscall(SYS_openat2, dirfd, path, how, len(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN or not resolve & (RESOLVE_BENEATH | RESOLVE_IN_ROOT):
            break
    raise OSError(err, os.strerror(err), path)


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes,
              flags: int = 0) -> None:
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname, None, newname)


# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# <sys/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]

SYS_pivot_root = 155  # x86_64; glibc has no wrapper


def _b(path):
    return None if path is None else os.fsencode(path)


def _check(result, *what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), *what)


def unshare(flags):
    _check(_libc.unshare(flags))


def setns(fd, nstype=0):
    """Join the namespace open as fd (a user namespace: single-threaded only)."""
    _check(_libc.setns(fd, nstype))


def mount(source, target, fstype=None, flags=0, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           os.fsdecode(target))


def umount2(target, flags=0):
    _check(_libc.umount2(_b(target), flags), os.fsdecode(target))


def pivot_root(new_root, put_old):
    _check(_libc.syscall(ctypes.c_long(SYS_pivot_root), ctypes.c_char_p(_b(new_root)),
                         ctypes.c_char_p(_b(put_old))), os.fsdecode(new_root))


def sethostname(name):
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)))


def prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    _check(_libc.prctl(option, arg2, arg3, arg4, arg5))


# The new mount API: a bind-mount source cloned before pivot_root stays usable
# after the old root is gone (a plain MS_BIND from a detached tree is EINVAL).
SYS_open_tree = 428
SYS_move_mount = 429
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40


def open_tree(path, flags, dirfd=AT_FDCWD):
    fd = _libc.syscall(ctypes.c_long(SYS_open_tree), ctypes.c_int(dirfd),
                       ctypes.c_char_p(_b(path)), ctypes.c_uint(flags))
    _check(fd, os.fsdecode(path))
    return fd


def move_mount(from_fd, target, target_fd=AT_FDCWD):
    """Attach the detached tree `from_fd` at `target` (or at `target_fd` if target is "")."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_T_EMPTY_PATH if not target else 0)
    _check(_libc.syscall(ctypes.c_long(SYS_move_mount), ctypes.c_int(from_fd),
                         ctypes.c_char_p(b""), ctypes.c_int(target_fd),
                         ctypes.c_char_p(_b(target)), ctypes.c_uint(flags)),
           os.fsdecode(target) or f"fd {target_fd}")


SYS_mount_setattr = 442
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def set_mount_attributes(tree_fd, attributes, recursive=True):
    """Set MOUNT_ATTR_* on the mount tree_fd refers to (and, by default, all below it)."""
    attr = _MountAttr(attributes, 0, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(ctypes.c_long(SYS_mount_setattr), ctypes.c_int(tree_fd),
                         ctypes.c_char_p(b""), ctypes.c_uint(flags), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))), f"fd {tree_fd}")
