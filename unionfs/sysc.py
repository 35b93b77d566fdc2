"""Thin ctypes wrappers for the Linux calls Python 3.11 lacks: openat2, renameat2.

Only the filesystem's rules use these (the runner has its own libc.py).
"""
import ctypes
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
# Inside a layer: never follow a symlink, never step out of the layer root.
RESOLVE_IN_LAYER = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

FICLONE = 0x40049409


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0,
            resolve: int = RESOLVE_IN_LAYER) -> int:
    how = struct.pack("=QQQ", flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(SYS_openat2, dirfd, path, how, len(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes,
              flags: int = 0) -> None:
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname, None, newname)
