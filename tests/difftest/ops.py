"""Seeded random filesystem operations and their execution on a mountpoint.

An op is a plain tuple `(name, *args)` whose args are relpaths and numbers,
so it prints as something a person can read and replay. `choose_op` picks the
next op from a random.Random and the reference side's current names (so most
ops hit something that exists); `run_op` executes one op under a mountpoint
and returns `("ok", value)` or `("err", "ENOENT")`: the values hold no inode
numbers or clock times, so the two sides' results compare with ==.
"""
import ctypes
import errno
import hashlib
import mmap
import os
import stat

from .generator import MID_NAMES, NOW_THRESHOLD_NS, TOP_NAMES, UNIVERSE
from .tree import describe, ftype

ACCESS_MODES = [("RDONLY", os.O_RDONLY), ("WRONLY", os.O_WRONLY), ("RDWR", os.O_RDWR)]
EXTRA_FLAGS = [("APPEND", os.O_APPEND), ("TRUNC", os.O_TRUNC), ("CREAT", os.O_CREAT),
               ("EXCL", os.O_EXCL)]
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = os.XATTR_CREATE
XATTR_REPLACE = os.XATTR_REPLACE
XATTR_NAMES = ["user.k", "user.n", "trusted.t", "trusted.n"]
EXPLICIT_TIME_BASE = 1_100_000_000  # 2004: below NOW_THRESHOLD, so compared exactly

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_AT_FDCWD = -100


def renameat2(src, dst, flags):
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


def flag_names(flags):
    names = [n for n, v in ACCESS_MODES if (flags & os.O_ACCMODE) == v]
    names += [n for n, v in EXTRA_FLAGS if flags & v]
    if flags & os.O_NOFOLLOW:
        names.append("NOFOLLOW")
    if flags & os.O_DIRECTORY:
        names.append("DIRECTORY")
    return "|".join(names)


def parse_flags(text):
    table = dict(ACCESS_MODES + EXTRA_FLAGS + [("NOFOLLOW", os.O_NOFOLLOW),
                                               ("DIRECTORY", os.O_DIRECTORY)])
    v = 0
    for n in text.split("|"):
        v |= table[n]
    return v


def _data(n, tag):
    return bytes([(tag + i) % 251 for i in range(min(n, 251))]) * (n // 251 + 1)


def _h(buf):
    return hashlib.blake2b(buf, digest_size=8).hexdigest()


def _stat_summary(st):
    kind = ftype(st.st_mode)
    out = (kind, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid)
    if kind != "dir":
        out += (st.st_size, st.st_nlink)
    return out


# ---- executors: each takes the mountpoint-joined paths and returns a value ----

def _x_open(p, flags, nbytes, tag):
    fd = os.open(p, parse_flags(flags) | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        st = os.fstat(fd)
        out = [ftype(st.st_mode)]
        acc = parse_flags(flags) & os.O_ACCMODE
        if stat.S_ISREG(st.st_mode):
            if acc != os.O_RDONLY:
                out.append(os.write(fd, _data(nbytes, tag)[:nbytes]))
            if acc != os.O_WRONLY:
                out.append(_h(os.pread(fd, 1 << 16, 0)))
            out.append(os.fstat(fd).st_size)
        return tuple(out)
    finally:
        os.close(fd)


def _x_pwrite(p, offset, nbytes, tag):
    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not-reg"
        n = os.pwrite(fd, _data(nbytes, tag)[:nbytes], offset)
        return n, os.fstat(fd).st_size
    finally:
        os.close(fd)


def _x_append(p, nbytes, tag):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not-reg"
        os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND must still write at the end
        n = os.write(fd, _data(nbytes, tag)[:nbytes])
        return n, os.fstat(fd).st_size
    finally:
        os.close(fd)


def _x_read(p, offset, nbytes):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not-reg"
        return _h(os.pread(fd, nbytes, offset))
    finally:
        os.close(fd)


def _x_truncate(p, size):
    if size == "same":
        st = os.stat(p)
        size = st.st_size
    before = os.stat(p).st_mtime_ns
    os.truncate(p, size)
    after = os.stat(p)
    # only a generated/explicit (old) mtime tells reliably whether it moved
    changed = after.st_mtime_ns != before if before < NOW_THRESHOLD_NS else None
    return after.st_size, changed


def _x_ftruncate(p, size):
    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _x_stale_fd(p, nbytes, tag):
    """A read fd opened before copy-up must see the data written after it."""
    rfd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(rfd).st_mode):
            return "not-reg"
        wfd = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.pwrite(wfd, _data(nbytes, tag)[:nbytes], 0)
        finally:
            os.close(wfd)
        return _h(os.pread(rfd, 1 << 16, 0))
    finally:
        os.close(rfd)


def _x_mmap_rw(p, offset, nbytes, tag):
    """Write through a shared writable mapping (a copy-up), then read back with pread."""
    fd = os.open(p, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return "empty"
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            start = min(offset, size - 1)
            data = _data(nbytes, tag)[:max(0, min(nbytes, size - start))]
            m[start:start + len(data)] = data
            m.flush()
        finally:
            m.close()
        return _h(os.pread(fd, size, 0)), size
    finally:
        os.close(fd)


def _x_mmap_read(p):
    """Read a file through a private read-only mapping."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return "empty"
        with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
            return _h(m[:])
    finally:
        os.close(fd)


def _x_unlink_open(p):
    """fstat of an open file after its last name is gone shows nlink 0."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.unlink(p)
        st = os.fstat(fd)
        return ftype(st.st_mode), st.st_nlink
    finally:
        os.close(fd)


def _x_chmod(p, mode):
    os.chmod(p, mode)


def _x_chown(p, uid, gid, follow):
    os.chown(p, uid, gid, follow_symlinks=follow)


def _x_utime(p, t, follow):
    if t is None:
        os.utime(p, follow_symlinks=follow)
    else:
        ns = EXPLICIT_TIME_BASE * 10**9 + t
        os.utime(p, ns=(ns, ns), follow_symlinks=follow)


def _x_setxattr(p, name, value, flags, follow):
    os.setxattr(p, name, value.encode(), flags, follow_symlinks=follow)


def _x_getxattr(p, name, follow):
    return os.getxattr(p, name, follow_symlinks=follow)


def _x_listxattr(p, follow):
    return sorted(n for n in os.listxattr(p, follow_symlinks=follow)
                  if not n.startswith(("trusted.overlay.", "trusted.unionfs.", "user.unionfs.")))


def _x_removexattr(p, name, follow):
    os.removexattr(p, name, follow_symlinks=follow)


def _x_mkdir(p, mode):
    os.mkdir(p, mode)


def _x_rmdir(p):
    os.rmdir(p)


def _x_unlink(p):
    os.unlink(p)


def _x_rename(src, dst):
    os.rename(src, dst)


def _x_renameat2(src, dst, flags):
    renameat2(src, dst, {"NOREPLACE": RENAME_NOREPLACE, "EXCHANGE": RENAME_EXCHANGE,
                         "0": 0}[flags])


def _x_symlink(target, p):
    os.symlink(target, p)


def _x_readlink(p):
    return os.readlink(p)


def _x_link(src, dst):
    os.link(src, dst, follow_symlinks=False)
    return _stat_summary(os.lstat(dst))


def _x_mkfifo(p, mode):
    os.mkfifo(p, mode)


def _x_mknod(p, kind, mode):
    if kind == "chr":  # /dev/null's numbers only
        os.mknod(p, stat.S_IFCHR | mode, os.makedev(1, 3))
    else:
        os.mknod(p, stat.S_IFSOCK | mode)


def _x_stat(p, follow):
    return _stat_summary(os.stat(p, follow_symlinks=follow))


def _x_listdir(p):
    return sorted(os.listdir(p))


def _x_rename_cycle(a, b, tmp):
    """a -> tmp, b -> a, tmp -> b: a swap through a third name (chains and cycles)."""
    out = []
    for src, dst in ((a, tmp), (b, a), (tmp, b)):
        try:
            os.rename(src, dst)
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode.get(e.errno, str(e.errno)))
    return tuple(out)


def _x_empty_rmdir(p):
    """Delete every entry of a dir through the union (depth first), then the dir."""
    out = []
    for dirpath, dirnames, filenames in os.walk(p, topdown=False):
        for n in sorted(filenames) + sorted(n for n in dirnames
                                            if os.path.islink(os.path.join(dirpath, n))):
            try:
                os.unlink(os.path.join(dirpath, n))
            except OSError as e:
                out.append((n, errno.errorcode.get(e.errno, str(e.errno))))
        for n in sorted(dirnames):
            if not os.path.islink(os.path.join(dirpath, n)):
                try:
                    os.rmdir(os.path.join(dirpath, n))
                except OSError as e:
                    out.append((n, errno.errorcode.get(e.errno, str(e.errno))))
    os.rmdir(p)
    return tuple(sorted(out))  # os.walk visits subdirs in readdir order


def _as_user(mnt, uid, gid, fn, *args):
    """Run fn(*args) in a child with the given uid/gid (no capabilities); return its result.

    The child first enters the mountpoint as root and then uses relative paths,
    so the (root-only) dirs above the mountpoint do not get in the way.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the test
        try:
            os.close(r)
            os.chdir(mnt)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                res = ("ok", repr(fn(*args)))
            except OSError as e:
                res = ("err", errno.errorcode.get(e.errno, str(e.errno)))
            os.write(w, repr(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data.decode()


# user_* executors take (mountpoint, relpath, ...): see _as_user

def _x_user_open(mnt, p, uid, flags):
    return _as_user(mnt, uid, uid, lambda: _x_open(p, flags, 3, 7))


def _x_user_truncate(mnt, p, uid, size):
    return _as_user(mnt, uid, uid, lambda: os.truncate(p, size))


def _x_user_utime(mnt, p, uid, explicit):
    return _as_user(mnt, uid, uid,
                    lambda: os.utime(p, ns=(10**18, 10**18)) if explicit else os.utime(p))


def _x_user_unlink(mnt, p, uid):
    return _as_user(mnt, uid, uid, lambda: os.unlink(p))


def _x_user_mkdir(mnt, p, uid):
    return _as_user(mnt, uid, uid, lambda: os.mkdir(p, 0o755))


# op name -> (executor, indexes of args that are relpaths)
EXECUTORS = {
    "open": (_x_open, (0,)),
    "pwrite": (_x_pwrite, (0,)),
    "append": (_x_append, (0,)),
    "read": (_x_read, (0,)),
    "truncate": (_x_truncate, (0,)),
    "ftruncate": (_x_ftruncate, (0,)),
    "stale_fd": (_x_stale_fd, (0,)),
    "unlink_open": (_x_unlink_open, (0,)),
    "mmap_rw": (_x_mmap_rw, (0,)),  # not drawn by choose_op: see harness.run_mmap_cases
    "mmap_read": (_x_mmap_read, (0,)),
    "chmod": (_x_chmod, (0,)),
    "chown": (_x_chown, (0,)),
    "utime": (_x_utime, (0,)),
    "setxattr": (_x_setxattr, (0,)),
    "getxattr": (_x_getxattr, (0,)),
    "listxattr": (_x_listxattr, (0,)),
    "removexattr": (_x_removexattr, (0,)),
    "mkdir": (_x_mkdir, (0,)),
    "rmdir": (_x_rmdir, (0,)),
    "unlink": (_x_unlink, (0,)),
    "rename": (_x_rename, (0, 1)),
    "renameat2": (_x_renameat2, (0, 1)),
    "symlink": (_x_symlink, (1,)),
    "readlink": (_x_readlink, (0,)),
    "link": (_x_link, (0, 1)),
    "mkfifo": (_x_mkfifo, (0,)),
    "mknod": (_x_mknod, (0,)),
    "stat": (_x_stat, (0,)),
    "listdir": (_x_listdir, (0,)),
    "remount": (None, ()),  # carried out by the harness on both sides
    "rename_cycle": (_x_rename_cycle, (0, 1, 2)),
    "empty_rmdir": (_x_empty_rmdir, (0,)),
    "user_open": (_x_user_open, (0,)),  # relpath arg 0, but not joined: see run_op
    "user_truncate": (_x_user_truncate, (0,)),
    "user_utime": (_x_user_utime, (0,)),
    "user_unlink": (_x_user_unlink, (0,)),
    "user_mkdir": (_x_user_mkdir, (0,)),
}


def _join(mnt, rel):
    return os.path.join(str(mnt), rel) if rel else str(mnt)


def run_op(mnt, op):
    """Execute `op` under `mnt`; return ("ok", value) or ("err", errno name)."""
    name, *args = op
    fn, path_args = EXECUTORS[name]
    if name.startswith("user_"):
        args = [str(mnt)] + args  # relative paths, resolved in the child from the mountpoint
    else:
        args = [_join(mnt, a) if i in path_args else a for i, a in enumerate(args)]
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))


def op_paths(op):
    """The relpaths an op names (for the after-op local comparison)."""
    name, *args = op
    return [args[i] for i in EXECUTORS[name][1]]


def local_state(mnt, rels):
    """What the user sees at and around the op's paths: entries and parent listings."""
    out = {}
    for rel in rels:
        for r in dict.fromkeys([rel, os.path.dirname(rel)]):
            p = _join(mnt, r)
            try:
                out[r] = describe(p)
            except OSError as e:
                out[r] = errno.errorcode.get(e.errno, str(e.errno))
            if isinstance(out[r], dict) and out[r]["type"] == "dir":
                try:
                    out[r]["names"] = sorted(os.listdir(p))
                except OSError as e:
                    out[r]["names"] = errno.errorcode.get(e.errno, str(e.errno))
    return out


# ---- choosing ops ----

def list_names(mnt):
    """relpath -> type of everything visible (lstat) in the mount."""
    names = {}

    def walk(rel):
        try:
            it = os.scandir(_join(mnt, rel))
        except OSError:
            return
        with it:
            for e in it:
                crel = f"{rel}/{e.name}" if rel else e.name
                try:
                    names[crel] = ftype(os.lstat(e.path).st_mode)
                except OSError:
                    continue
                if names[crel] == "dir":
                    walk(crel)

    walk("")
    return dict(sorted(names.items()))


def choose_op(rng, names, counter):
    """Pick one op; `names` is the reference side's relpath -> type right now."""
    existing = list(names)
    by_type = {}
    for rel, t in names.items():
        by_type.setdefault(t, []).append(rel)

    def any_path(pref=None):
        r = rng.random()
        if r > 0.98:
            return ""  # the union's root: a directory like no other
        if pref and by_type.get(pref) and r < 0.6:
            return rng.choice(by_type[pref])
        if existing and r < 0.8:
            return rng.choice(existing)
        return rng.choice(UNIVERSE + ["n0", "n1", "a/n2"])

    def new_path():
        dirs = [""] + by_type.get("dir", [])
        parent = rng.choice(dirs)
        name = rng.choice(TOP_NAMES + MID_NAMES + [f"n{counter}"])
        return f"{parent}/{name}" if parent else name

    def target_for(rel):
        parent = os.path.dirname(rel)
        r = rng.random()
        if r < 0.15:
            return "/nonexistent-difftest/" + rng.choice(TOP_NAMES)
        if r < 0.25:
            return "missing-" + rng.choice(MID_NAMES)
        return os.path.relpath(rng.choice(existing or UNIVERSE), parent or ".")

    tag = rng.randrange(256)
    kind = rng.choices(
        ["open", "pwrite", "append", "read", "truncate", "ftruncate", "stale_fd",
         "unlink_open", "chmod", "chown", "utime", "setxattr", "getxattr", "listxattr",
         "removexattr", "mkdir", "rmdir", "unlink", "rename", "renameat2", "symlink",
         "readlink", "link", "mkfifo", "stat", "listdir", "rename_cycle", "empty_rmdir",
         "user_op", "remount", "mknod"],
        weights=[16, 5, 4, 3, 5, 2, 2, 1, 3, 3, 4, 4, 2, 2, 4, 4, 5, 5, 6, 5, 3, 1, 4, 1, 2, 2,
                 2, 2, 4, 1, 1])[0]
    if kind == "open":
        flags = rng.choice(ACCESS_MODES)[1]
        for _, v in EXTRA_FLAGS:
            if rng.random() < 0.35:
                flags |= v
        if rng.random() < 0.05:
            flags |= os.O_NOFOLLOW
        if rng.random() < 0.05:
            flags |= os.O_DIRECTORY
        pref = rng.choice(["reg", "lnk", "dir", None])
        path = new_path() if rng.random() < 0.15 else any_path(pref)
        return ("open", path, flag_names(flags), rng.choice([0, 1, 10, 5000]), tag)
    if kind == "pwrite":
        return ("pwrite", any_path("reg"), rng.choice([0, 1, 100, 4095, 70000, 1 << 20]),
                rng.choice([1, 10, 4096, 9000]), tag)
    if kind == "append":
        return ("append", any_path("reg"), rng.choice([1, 10, 5000]), tag)
    if kind == "read":
        return ("read", any_path("reg"), rng.choice([0, 10, 4096]), rng.choice([1, 100, 1 << 16]))
    if kind == "truncate":
        return ("truncate", any_path("reg"), rng.choice(["same", "same", 0, 1, 5000, 1 << 20]))
    if kind == "ftruncate":
        return ("ftruncate", any_path("reg"), rng.choice([0, 3, 100000]))
    if kind == "stale_fd":
        return ("stale_fd", any_path("reg"), rng.choice([1, 50]), tag)
    if kind == "unlink_open":
        return ("unlink_open", any_path("reg"))
    if kind == "chmod":
        return ("chmod", any_path(), rng.choice([0o600, 0o644, 0o755, 0o4755, 0o2755, 0o1777,
                                                  0o2775, 0o000]))
    if kind == "chown":
        uid, gid = rng.choice([(0, 0), (1000, 1000), (1001, 1001), (1000, -1), (-1, 1001)])
        return ("chown", any_path(), uid, gid, rng.random() < 0.7)
    if kind == "utime":
        t = None if rng.random() < 0.2 else rng.randrange(10**15)
        return ("utime", any_path(), t, rng.random() < 0.7)
    if kind == "setxattr":
        flags = rng.choice([0, 0, XATTR_CREATE, XATTR_REPLACE])
        return ("setxattr", any_path(), rng.choice(XATTR_NAMES), f"v{tag}", flags,
                rng.random() < 0.7)
    if kind == "getxattr":
        return ("getxattr", any_path(), rng.choice(XATTR_NAMES), rng.random() < 0.7)
    if kind == "listxattr":
        return ("listxattr", any_path(), rng.random() < 0.7)
    if kind == "removexattr":
        return ("removexattr", any_path(), rng.choice(XATTR_NAMES), rng.random() < 0.7)
    if kind == "mkdir":
        return ("mkdir", new_path() if rng.random() < 0.7 else any_path(),
                rng.choice([0o755, 0o700, 0o2775, 0o1777]))
    if kind == "rmdir":
        return ("rmdir", any_path("dir"))
    if kind == "unlink":
        return ("unlink", any_path(rng.choice(["reg", "lnk", "fifo", "dir"])))
    if kind in ("rename", "renameat2"):
        src = any_path(rng.choice(["reg", "dir", "lnk", None]))
        r = rng.random()
        dst = src if r < 0.08 else (any_path() if r < 0.5 else new_path())
        if kind == "rename":
            return ("rename", src, dst)
        return ("renameat2", src, dst, rng.choice(["0", "NOREPLACE", "EXCHANGE"]))
    if kind == "symlink":
        path = new_path() if rng.random() < 0.8 else any_path()
        return ("symlink", target_for(path), path)
    if kind == "readlink":
        return ("readlink", any_path("lnk"))
    if kind == "link":
        src = any_path(rng.choice(["reg", "reg", "lnk", "dir"]))
        return ("link", src, new_path() if rng.random() < 0.75 else any_path())
    if kind == "mkfifo":
        return ("mkfifo", new_path(), 0o644)
    if kind == "stat":
        return ("stat", any_path(), rng.random() < 0.5)
    if kind == "listdir":
        return ("listdir", any_path("dir"))
    if kind == "remount":
        return ("remount",)
    if kind == "mknod":
        return ("mknod", new_path(), rng.choice(["chr", "sock"]), rng.choice([0o644, 0o666]))
    if kind == "rename_cycle":
        return ("rename_cycle", any_path(), any_path(), new_path())
    if kind == "empty_rmdir":
        return ("empty_rmdir", any_path("dir") or "a")  # never the whole union
    if kind == "user_op":
        uid = rng.choice([1000, 1001, 1002])
        sub = rng.choice(["open", "open", "truncate", "utime", "unlink", "mkdir"])
        if sub == "open":
            flags = rng.choice(ACCESS_MODES)[1] | rng.choice([0, os.O_TRUNC, os.O_CREAT,
                                                                 os.O_APPEND])
            return ("user_open", any_path("reg"), uid, flag_names(flags))
        if sub == "truncate":
            return ("user_truncate", any_path("reg"), uid, rng.choice([0, 10]))
        if sub == "utime":
            return ("user_utime", any_path(), uid, rng.random() < 0.5)
        if sub == "unlink":
            return ("user_unlink", any_path(), uid)
        return ("user_mkdir", new_path(), uid)
    raise AssertionError(kind)
