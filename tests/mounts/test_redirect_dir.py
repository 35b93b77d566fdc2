"""-o redirect_dir=: renaming lower and merged directories, against the
kernel's overlayfs with the same option on the same layers, and uppers
written by one mounted by the other (docs/redirect.md).

Each scenario is a list of steps run on both mounts; the outcome, the merged
tree, the tree after a remount and the redirect xattrs left in the upper must
be the kernel's."""
import errno
import os
import shutil
import subprocess

import pytest

from difftest.tree import describe, snapshot
from mountutil import UNIONFS, Stack

REDIRECT = "trusted.overlay.redirect"
USER_REDIRECT = "user.overlay.redirect"


def build(s):
    """Lowers l1 (top) and l2, an upper: lower, merged and upper-only dirs."""
    l1, l2 = s.lowers
    (l2 / "ldir" / "sub").mkdir(parents=True)
    (l2 / "ldir" / "f").write_text("lower f\n")
    (l2 / "ldir" / "sub" / "g").write_text("g\n")
    os.symlink("f", l2 / "ldir" / "link")
    os.chmod(l2 / "ldir" / "f", 0o640)
    os.chmod(l2 / "ldir", 0o750)
    for d, name in ((l2, "y"), (l1, "x"), (s.upper, "u")):      # a merged dir
        (d / "mdir").mkdir()
        (d / "mdir" / name).write_text(f"{name} in mdir\n")
    (l1 / "mdir" / "y").write_text("y over\n")
    (l2 / "p" / "c").mkdir(parents=True)
    (l2 / "p" / "c" / "h").write_text("h\n")
    (l2 / "other").mkdir()
    (l2 / "other" / "o").write_text("o\n")
    (l2 / "empty").mkdir()
    (s.upper / "udir").mkdir()
    (l2 / ("n" * 255)).mkdir()
    (l2 / ("n" * 255) / "in-long").write_text("long\n")
    (l2 / ("a" * 200) / ("b" * 100)).mkdir(parents=True)


def rename(a, b):
    return lambda m: os.rename(m / a, m / b)


def write(path, text):
    return lambda m: (m / path).write_text(text)


def mkdir(path):
    return lambda m: os.mkdir(m / path)


def unlink(path):
    return lambda m: os.unlink(m / path)


def rmdir(path):
    return lambda m: os.rmdir(m / path)


def rmtree(path):
    return lambda m: shutil.rmtree(m / path)


def chmod(path, mode):
    return lambda m: os.chmod(m / path, mode)


SCENARIOS = {
    "lower-same-parent": [rename("ldir", "ldir2")],
    "merged-same-parent": [rename("mdir", "mdir2")],
    "lower-into-lower-dir": [rename("ldir", "other/ldir")],
    "merged-into-upper-dir": [rename("mdir", "udir/m")],
    "lower-child-out": [rename("ldir/sub", "moved")],
    "twice": [rename("ldir", "b"), rename("b", "c")],
    "twice-then-other-parent": [rename("ldir", "b"), rename("b", "udir/c")],
    "back-to-its-name": [rename("ldir", "b"), rename("b", "ldir")],
    "back-from-other-parent": [rename("ldir", "udir/x"), rename("udir/x", "ldir")],
    "out-of-a-renamed-parent": [rename("p", "q"), rename("q/c", "udir/c")],
    "parent-renamed-after": [rename("ldir", "other/ldir"), rename("other", "other2")],
    "child-of-renamed": [rename("ldir", "b"), rename("b/sub", "b/sub2"), rename("b/f", "b/f2")],
    "over-an-empty-lower-dir": [rename("ldir", "empty")],
    "rm-r-after": [rename("ldir", "b"), rmtree("b")],
    "rmdir-merged-after": [rename("mdir", "b"), unlink("b/x"), unlink("b/y"), unlink("b/u"),
                           rmdir("b")],
    "create-in-renamed": [rename("ldir", "b"), write("b/new", "new\n"), mkdir("b/nd"),
                          write("b/f", "changed\n"), chmod("b/sub", 0o700)],
    "old-name-made-again": [rename("ldir", "b"), mkdir("ldir"), write("ldir/z", "z\n")],
    "a-redirect-of-redirect-max": [rename("n" * 255, "udir/long")],
    "too-long-for-a-redirect": [rename("a" * 200 + "/" + "b" * 100, "udir/x")],
}


def run_steps(steps, mnt):
    """The outcome of the steps: "ok" or the errno name of the first that failed."""
    for step in steps:
        try:
            step(mnt)
        except OSError as e:
            return errno.errorcode.get(e.errno, e.errno)
    return "ok"


def tree(mnt):
    # (readdir's d_ino is not compared: the kernel's differs from st_ino in
    # merged directories)
    return snapshot(mnt)[0]


def upper_redirects(upper, name=REDIRECT):
    """{path: value} of the redirect xattrs in an upper layer."""
    out = {}
    for dirpath, dirnames, _ in os.walk(upper):
        for d in dirnames:
            path = os.path.join(dirpath, d)
            try:
                out[os.path.relpath(path, upper)] = os.getxattr(path, name, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
    return out


def mount(s, kind, mode, extra=""):
    """Mount s with the kernel or unionfs, redirect_dir=mode (None: the default)."""
    opts = [o for o in (extra, f"redirect_dir={mode}" if mode else "") if o]
    if kind == "kernel":
        return s.kernel(options=",".join(opts))
    return s.unionfs(options=opts)


def after(tmp_path, tag, kind, steps, mode="on", extra=""):
    """Build a stack, run the steps on a `kind` mount: (stack, outcome, tree)."""
    s = Stack(tmp_path, tag=tag)
    build(s)
    with mount(s, kind, mode, extra):
        result = run_steps(steps, s.mnt)
        seen = tree(s.mnt)
    return s, result, seen


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_renamed_directories_match_the_kernel(tmp_path, name):
    steps = SCENARIOS[name]
    k, k_res, k_tree = after(tmp_path, "k", "kernel", steps)
    u, u_res, u_tree = after(tmp_path, "u", "unionfs", steps)
    assert u_res == k_res
    assert u_tree == k_tree
    assert upper_redirects(u.upper) == upper_redirects(k.upper)
    # what is on disk says the same after a remount
    with mount(u, "unionfs", "on"):
        assert tree(u.mnt) == k_tree


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_kernel_reads_the_upper_unionfs_wrote(tmp_path, name):
    u, _, u_tree = after(tmp_path, "u", "unionfs", SCENARIOS[name])
    with mount(u, "kernel", "on"):
        assert tree(u.mnt) == u_tree


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("mode", ["on", "follow"])
def test_unionfs_reads_the_upper_the_kernel_wrote(tmp_path, name, mode):
    k, _, k_tree = after(tmp_path, "k", "kernel", SCENARIOS[name])
    with mount(k, "unionfs", mode):
        assert tree(k.mnt) == k_tree


@pytest.mark.parametrize("mode", ["follow", "nofollow", "off"])
@pytest.mark.parametrize("src, dst", [("ldir", "ldir2"), ("mdir", "udir/m"),
                                      ("ldir/sub", "sub")])
def test_without_redirect_dir_on_a_lower_dir_rename_is_exdev(tmp_path, mode, src, dst):
    results = []
    for tag, kind in (("k", "kernel"), ("u", "unionfs")):
        results.append(after(tmp_path, tag, kind, [rename(src, dst)], mode=mode)[1:])
    assert results[0] == results[1] == ("EXDEV", results[0][1])


def test_the_default_is_no_redirects(tmp_path):
    _, result, _ = after(tmp_path, "u", "unionfs", [rename("ldir", "ldir2")], mode=None)
    assert result == "EXDEV"


# A kernel-written upper with redirects, read with each mode by both.
MANY = [rename("ldir", "udir/l"), rename("mdir", "m2"), rename("p", "q"),
        rename("q/c", "c2"), rename("other", "udir/l/o")]


MANY_PATHS = ["udir", "udir/l", "udir/l/f", "udir/l/sub", "udir/l/o", "udir/l/o/o", "m2",
              "m2/x", "q", "q/c", "c2", "c2/h", "ldir", "mdir", "p", "other"]


def looked_up(mnt):
    """{path: what lstat and listdir of it give}, path by path: the kernel's
    nofollow fails a whole readdir of a directory listing a refused name
    (its d_ino fix-up looks each one up), unionfs lists the name."""
    out = {}
    for rel in MANY_PATHS:
        path = os.path.join(mnt, rel)
        try:
            st = os.lstat(path)
            out[rel] = describe(path, st)
            if os.path.isdir(path) and not os.path.islink(path):
                out[rel]["names"] = sorted(os.listdir(path))
        except OSError as e:
            out[rel] = errno.errorcode.get(e.errno, e.errno)
    return out


@pytest.mark.parametrize("mode", ["on", "follow"])
def test_each_mode_follows_as_the_kernels(tmp_path, mode):
    k, result, _ = after(tmp_path, "k", "kernel", MANY)
    assert result == "ok"
    with mount(k, "kernel", mode):
        k_tree = tree(k.mnt)
    with mount(k, "unionfs", mode):
        assert tree(k.mnt) == k_tree


def test_nofollow_refuses_redirected_directories_as_the_kernel(tmp_path):
    k, _, _ = after(tmp_path, "k", "kernel", MANY)
    with mount(k, "kernel", "nofollow"):
        k_seen = looked_up(k.mnt)
    assert "EPERM" in k_seen.values()
    with mount(k, "unionfs", "nofollow"):
        assert looked_up(k.mnt) == k_seen


def test_off_follows_as_the_kernels_default(tmp_path):
    """The kernel's redirect_dir=off follows redirects when its
    redirect_always_follow is set (its Kconfig default, and this host's)."""
    with open("/sys/module/overlay/parameters/redirect_always_follow") as f:
        always_follow = f.read().strip() == "Y"
    k, _, _ = after(tmp_path, "k", "kernel", MANY)
    with mount(k, "kernel", "off" if always_follow else "follow"):
        k_tree = tree(k.mnt)
    with mount(k, "unionfs", "off"):
        assert tree(k.mnt) == k_tree
    with mount(k, "unionfs", None):
        assert tree(k.mnt) == k_tree


def test_nofollow_differs_from_follow_on_this_upper(tmp_path):
    """The comparisons above could not pass by accident: the modes differ here."""
    k, _, _ = after(tmp_path, "k", "kernel", MANY)
    with mount(k, "kernel", "follow"):
        follow = looked_up(k.mnt)
    with mount(k, "kernel", "nofollow"):
        nofollow = looked_up(k.mnt)
    assert follow != nofollow


def test_a_bad_redirect_fails_the_lookup_and_nothing_else(tmp_path):
    u, _, _ = after(tmp_path, "u", "unionfs", [rename("ldir", "b")])
    os.setxattr(u.upper / "b", REDIRECT, b"../../etc", follow_symlinks=False)
    with mount(u, "unionfs", "on"):
        with pytest.raises(OSError):
            os.listdir(u.mnt / "b")
        assert sorted(os.listdir(u.mnt / "udir")) == []


# The userxattr format (the kernel's -o userxattr): any owner of an upper
# directory may set user.* xattrs on it, so neither the kernel nor unionfs
# takes redirect_dir=on|follow with it, and both refuse to follow a
# user.overlay.redirect found in an upper (docs/redirect.md).

def test_the_kernel_refuses_redirects_with_userxattr(tmp_path):
    s = Stack(tmp_path, tag="k")
    build(s)
    opts = f"lowerdir={':'.join(map(str, s.lowers))},upperdir={s.upper},workdir={s.work}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        opts + ",userxattr,redirect_dir=on", str(s.mnt)], capture_output=True)
    if r.returncode == 0:
        subprocess.run(["umount", str(s.mnt)])
    assert r.returncode != 0


@pytest.mark.parametrize("mode", ["on", "follow"])
def test_unionfs_refuses_redirects_with_userxattr_in_one_line(tmp_path, mode):
    s = Stack(tmp_path, tag="u")
    build(s)
    r = subprocess.run([UNIONFS, "mount", "-f", "--lower", str(s.lowers[0]), "--lower",
                        str(s.lowers[1]), "--upper", str(s.upper), "--work", str(s.work),
                        "-o", f"userxattr,redirect_dir={mode}", str(s.mnt)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert not os.path.ismount(s.mnt)
    message = r.stderr.strip()
    assert "cannot be used with the userxattr format" in message and "\n" not in message


def as_user_xattrs(upper):
    """What a plain user can make of an upper: the kernel format's
    trusted.overlay.* markers rewritten as user.overlay.* (redirects included)."""
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            for key in os.listxattr(path, follow_symlinks=False):
                if key.startswith("trusted.overlay."):
                    value = os.getxattr(path, key, follow_symlinks=False)
                    os.setxattr(path, "user." + key[len("trusted."):], value,
                                follow_symlinks=False)
                    os.removexattr(path, key, follow_symlinks=False)


def test_user_set_redirects_are_refused_by_unionfs_as_by_the_kernel(tmp_path):
    u, _, _ = after(tmp_path, "u", "unionfs", MANY)
    as_user_xattrs(u.upper)
    assert upper_redirects(u.upper, USER_REDIRECT)
    with mount(u, "kernel", None, "userxattr"):
        k_seen = looked_up(u.mnt)
    assert "EPERM" in k_seen.values()
    for mode in ("nofollow", "off"):        # off: nofollow in this format, as the kernel's
        with mount(u, "unionfs", mode, "userxattr"):
            assert looked_up(u.mnt) == k_seen
