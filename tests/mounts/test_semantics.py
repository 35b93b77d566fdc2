"""Mounted unionfs against the kernel's overlayfs on the same layers.

Each table-driven test builds one stack twice, applies the same operation to
a kernel overlay and to unionfs, and compares results, errnos and trees.
"""
import ctypes
import errno
import os
import stat

import pytest

from mountutil import Stack

libc = ctypes.CDLL("libc.so.6", use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(a, b, flags):
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def build(stack):
    low1, low2 = stack.lowers
    (low2 / "lower").write_text("lower data\n")
    (low2 / "both").write_text("bottom\n")
    (low1 / "both").write_text("top\n")
    (low2 / "dir").mkdir()
    (low2 / "dir" / "a").write_text("a")
    (low1 / "dir").mkdir()
    (low1 / "dir" / "b").write_text("b")
    (low2 / "ldir").mkdir()
    os.symlink("lower", low1 / "link")
    os.symlink("link", low1 / "chain")
    os.symlink("nowhere", low1 / "dangling")
    os.mkfifo(low2 / "fifo")
    (stack.upper / "upperfile").write_text("upper data\n")
    (stack.upper / "udir").mkdir()


def snapshot(root):
    """The merged tree as comparable data (no inode numbers, no times)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            entry = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                entry += (open(path, "rb").read(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            xattrs = sorted((x, os.getxattr(path, x, follow_symlinks=False))
                            for x in os.listxattr(path, follow_symlinks=False))
            out[rel] = entry + (tuple(xattrs),)
    return out


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno, e.errno))


def on_both(tmp_path, op):
    """Run op(mnt) on a kernel overlay and on unionfs; return both outcomes+trees."""
    results = []
    for tag, kind in (("k", "kernel"), ("u", "unionfs")):
        stack = Stack(tmp_path, tag=tag)
        build(stack)
        with getattr(stack, kind)():
            res = outcome(op, str(stack.mnt))
            tree = snapshot(stack.mnt)
        results.append((res, tree))
    return results


OPEN_TARGETS = ["lower", "upperfile", "missing", "link", "chain", "dangling", "dir", "both"]
ACCESS = {"RDONLY": os.O_RDONLY, "WRONLY": os.O_WRONLY, "RDWR": os.O_RDWR,
          "APPEND": os.O_WRONLY | os.O_APPEND}
EXTRA = {"": 0, "TRUNC": os.O_TRUNC, "CREAT": os.O_CREAT, "CREAT|EXCL": os.O_CREAT | os.O_EXCL,
         "TRUNC|CREAT": os.O_TRUNC | os.O_CREAT}


def open_and_write(target, flags):
    def op(mnt):
        fd = os.open(os.path.join(mnt, target), flags, 0o640)
        try:
            if flags & (os.O_WRONLY | os.O_RDWR):
                os.write(fd, b"XY")
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 100) if not flags & os.O_WRONLY else None
        finally:
            os.close(fd)
        return data
    return op


@pytest.mark.parametrize("target", OPEN_TARGETS)
@pytest.mark.parametrize("access", list(ACCESS))
@pytest.mark.parametrize("extra", list(EXTRA))
def test_open_flags_match_the_kernel(tmp_path, target, access, extra):
    (k_res, k_tree), (u_res, u_tree) = on_both(
        tmp_path, open_and_write(target, ACCESS[access] | EXTRA[extra]))
    assert u_res == k_res
    assert u_tree == k_tree


RENAMES = [
    ("lower", "renamed", 0), ("lower", "both", 0), ("lower", "lower", 0),
    ("upperfile", "lower", 0), ("link", "moved-link", 0), ("dir", "dir2", 0),
    ("udir", "udir2", 0), ("udir", "dir", 0), ("lower", "dir", 0), ("dir", "lower", 0),
    ("lower", "both", RENAME_NOREPLACE), ("lower", "new", RENAME_NOREPLACE),
    ("lower", "upperfile", RENAME_EXCHANGE), ("lower", "missing", RENAME_EXCHANGE),
    ("fifo", "fifo2", 0), ("missing", "x", 0), ("udir", "udir/inside", 0),
]


@pytest.mark.parametrize("src,dst,flags", RENAMES)
def test_rename_matches_the_kernel(tmp_path, src, dst, flags):
    def op(mnt):
        renameat2(os.path.join(mnt, src), os.path.join(mnt, dst), flags)
    (k_res, k_tree), (u_res, u_tree) = on_both(tmp_path, op)
    assert u_res == k_res
    assert u_tree == k_tree


def test_rename_cycle_matches_the_kernel(tmp_path):
    def op(mnt):
        j = lambda n: os.path.join(mnt, n)  # noqa: E731
        os.rename(j("lower"), j("tmp"))
        os.rename(j("both"), j("lower"))
        os.rename(j("tmp"), j("both"))
        os.rename(j("both"), j("both"))
    (k_res, k_tree), (u_res, u_tree) = on_both(tmp_path, op)
    assert (u_res, u_tree) == (k_res, k_tree)


def remove_all_then_recreate(mnt):
    d = os.path.join(mnt, "dir")
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)
    os.mkdir(d)
    return sorted(os.listdir(d))


def exchange_dir_into_deleted_lower_dir(mnt):
    for name in os.listdir(f"{mnt}/dir"):
        os.unlink(f"{mnt}/dir/{name}")
    os.rmdir(f"{mnt}/dir")
    open(f"{mnt}/dir", "w").write("a file over a deleted lower dir")
    renameat2(f"{mnt}/udir", f"{mnt}/dir", RENAME_EXCHANGE)
    return sorted(os.listdir(f"{mnt}/dir"))


OPS = {
    "xattrs of the root": lambda m: (os.setxattr(m, "user.r", b"1"), os.getxattr(m, "user.r"),
                                     os.removexattr(m, "user.r"), os.listxattr(m)),
    "rename dir onto a deleted lower dir": lambda m: (os.rmdir(f"{m}/ldir"),
                                                      os.rename(f"{m}/udir", f"{m}/ldir"),
                                                      sorted(os.listdir(f"{m}/ldir"))),
    "rename dir onto a deleted lower file": lambda m: (os.unlink(f"{m}/lower"),
                                                       os.rename(f"{m}/udir", f"{m}/lower")),
    "exchange dir into a deleted lower dir": exchange_dir_into_deleted_lower_dir,
    "unlink lower": lambda m: os.unlink(f"{m}/lower"),
    "unlink then create": lambda m: (os.unlink(f"{m}/lower"),
                                     open(f"{m}/lower", "w").write("new")),
    "rmdir nonempty": lambda m: os.rmdir(f"{m}/dir"),
    "rmdir emptied, mkdir again": remove_all_then_recreate,
    "unlink dir": lambda m: os.unlink(f"{m}/dir"),
    "mkdir existing": lambda m: os.mkdir(f"{m}/lower"),
    "symlink": lambda m: os.symlink("some/target", f"{m}/newlink"),
    "link lower": lambda m: (os.link(f"{m}/lower", f"{m}/hard"),
                             os.stat(f"{m}/hard").st_nlink),
    "link over name": lambda m: os.link(f"{m}/lower", f"{m}/both"),
    "link dir": lambda m: os.link(f"{m}/dir", f"{m}/dir2"),
    "link symlink": lambda m: (os.link(f"{m}/link", f"{m}/hardlink", follow_symlinks=False),
                               os.readlink(f"{m}/hardlink")),
    "chmod lower": lambda m: os.chmod(f"{m}/lower", 0o600),
    "chown lower": lambda m: os.chown(f"{m}/lower", 1000, 1001),
    "chmod fifo": lambda m: os.chmod(f"{m}/fifo", 0o600),
    "lchown symlink": lambda m: os.chown(f"{m}/link", 1000, 1000, follow_symlinks=False),
    "setxattr lower": lambda m: os.setxattr(f"{m}/lower", "user.k", b"v"),
    "removexattr missing": lambda m: os.removexattr(f"{m}/lower", "user.missing"),
    "truncate lower": lambda m: os.truncate(f"{m}/lower", 3),
    "mknod fifo": lambda m: os.mkfifo(f"{m}/newfifo"),
    "readdir merged": lambda m: sorted(os.listdir(f"{m}/dir")),
    "readdir root": lambda m: sorted(os.listdir(m)),
    "readlink": lambda m: os.readlink(f"{m}/chain"),
    "open through dangling creates": lambda m: open(f"{m}/dangling", "w").write("t"),
    "mkdir over whiteout": lambda m: (os.unlink(f"{m}/both"), os.mkdir(f"{m}/both")),
}


@pytest.mark.parametrize("name", list(OPS))
def test_operation_matches_the_kernel(tmp_path, name):
    (k_res, k_tree), (u_res, u_tree) = on_both(tmp_path, OPS[name])
    assert u_res == k_res
    assert u_tree == k_tree
