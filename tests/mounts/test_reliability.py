"""Defects found by probing unionfs as a hostile user would, each against the
kernel's overlayfs where the kernel can be the oracle: reused inode numbers,
uppers edited offline, names too long for a marker or for the kernel, paths
deeper than PATH_MAX."""
import errno
import os
import shutil
import subprocess

import pytest

NAME_MAX = 255


def errname(fn, *args, **kw):
    try:
        fn(*args, **kw)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


# ---- node ids that are never reused -------------------------------------------------

def churn(mnt, rounds=2000):
    """mkdir dI; mkdir dI/s; rmdir dI/s, removing d(I-3) as we go: ext4 hands
    the freed inode numbers out again while the kernel may still hold them."""
    failures = []
    for i in range(rounds):
        for op, path in (("mkdir", f"d{i}"), ("mkdir", f"d{i}/s"), ("rmdir", f"d{i}/s")):
            result = errname(getattr(os, op), mnt / path)
            if result != "ok":
                failures.append((op, path, result))
        if i >= 3:
            result = errname(os.rmdir, mnt / f"d{i - 3}")
            if result != "ok":
                failures.append(("rmdir", f"d{i - 3}", result))
    return failures


def test_reused_upper_inode_numbers_give_no_estale_or_false_eexist(stack):
    with stack.kernel():
        assert churn(stack.mnt) == []
    shutil.rmtree(stack.upper)
    shutil.rmtree(stack.work)
    stack.upper.mkdir()
    stack.work.mkdir()
    with stack.unionfs():
        assert churn(stack.mnt) == []


# ---- origins are hints, never identities ---------------------------------------------

def copy_up(stack, name, data):
    with stack.unionfs():
        (stack.mnt / name).write_bytes(data)


def test_a_copy_of_an_upper_file_made_offline_serves_its_own_data(stack):
    (stack.lowers[0] / "a").write_bytes(b"lower a")
    copy_up(stack, "a", b"upper a")
    subprocess.run(["cp", "-a", str(stack.upper / "a"), str(stack.upper / "b")], check=True)
    (stack.upper / "b").write_bytes(b"the copy, changed")
    with stack.unionfs():
        a, b = os.stat(stack.mnt / "a"), os.stat(stack.mnt / "b")
        assert (stack.mnt / "a").read_bytes() == b"upper a"
        assert (stack.mnt / "b").read_bytes() == b"the copy, changed"
        assert a.st_ino != b.st_ino     # the copy's origin does not hold: its own number
        assert a.st_size == 7 and b.st_size == 17


def test_an_upper_file_renamed_offline_next_to_its_lower_origin_lists(stack):
    (stack.lowers[0] / "a").write_bytes(b"lower a")
    copy_up(stack, "a", b"upper a")
    os.rename(stack.upper / "a", stack.upper / "c")
    with stack.unionfs():
        assert sorted(os.listdir(stack.mnt)) == ["a", "c"]
        assert (stack.mnt / "a").read_bytes() == b"lower a"
        assert (stack.mnt / "c").read_bytes() == b"upper a"
    with stack.kernel():
        assert sorted(os.listdir(stack.mnt)) == ["a", "c"]


def test_the_origin_keeps_the_inode_number_across_copy_up_and_remount(stack):
    (stack.lowers[0] / "a").write_bytes(b"lower a")
    with stack.unionfs():
        before = os.stat(stack.mnt / "a").st_ino
        (stack.mnt / "a").write_bytes(b"upper a")
        assert os.stat(stack.mnt / "a").st_ino == before
    with stack.unionfs():
        assert os.stat(stack.mnt / "a").st_ino == before


# ---- names too long -------------------------------------------------------------------

LONG = "n" * NAME_MAX       # a legal name; ".wh." + it is not


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_unlink_of_a_255_byte_lower_name_stays_deleted(stack, fmt):
    (stack.lowers[0] / LONG).write_text("x")
    with stack.unionfs(options=[f"whiteout={fmt}"]):
        os.unlink(stack.mnt / LONG)
        assert os.listdir(stack.mnt) == []
    with stack.unionfs(options=[f"whiteout={fmt}"]):
        assert os.listdir(stack.mnt) == []
    with stack.kernel():
        assert os.listdir(stack.mnt) == []


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_rename_of_a_255_byte_lower_name_leaves_a_whiteout(stack, fmt):
    (stack.lowers[0] / LONG).write_text("x")
    with stack.unionfs(options=[f"whiteout={fmt}"]):
        os.rename(stack.mnt / LONG, stack.mnt / "short")
        assert os.listdir(stack.mnt) == ["short"]
    with stack.unionfs(options=[f"whiteout={fmt}"]):
        assert os.listdir(stack.mnt) == ["short"]


TOO_LONG = [NAME_MAX + 1, 300, 1024]
CALLS = {
    "lstat": lambda p: os.lstat(p),
    "open-read": lambda p: os.close(os.open(p, os.O_RDONLY)),
    "open-create": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)),
    "unlink": lambda p: os.unlink(p),
    "rmdir": lambda p: os.rmdir(p),
    "mkdir": lambda p: os.mkdir(p),
    "rename-from": lambda p: os.rename(p, os.path.join(os.path.dirname(p), "x")),
    "rename-to": lambda p: os.rename(os.path.join(os.path.dirname(p), "f"), p),
    "getxattr": lambda p: os.getxattr(p, "user.x"),
    "chmod": lambda p: os.chmod(p, 0o600),
}


@pytest.mark.parametrize("length", TOO_LONG)
def test_names_over_255_bytes_are_enametoolong_as_on_the_kernel(make_stack, length):
    results = {}
    for kind in ("kernel", "unionfs"):
        stack = make_stack(tag=kind)
        (stack.lowers[0] / "f").write_text("x")
        with getattr(stack, kind)():
            path = os.path.join(stack.mnt, "n" * length)
            results[kind] = {name: errname(call, path) for name, call in CALLS.items()}
    assert results["unionfs"] == results["kernel"]
    assert set(results["kernel"].values()) == {"ENAMETOOLONG"}


# ---- paths deeper than PATH_MAX ---------------------------------------------------------

DEPTH, COMPONENT = 30, "d" * 199     # about 6,000 bytes of path


def build_deep(root):
    """root/COMPONENT/.../COMPONENT/file, made with fds (no path is short enough)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEPTH):
        os.mkdir(COMPONENT, dir_fd=fd)
        nfd = os.open(COMPONENT, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    wfd = os.open("file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(wfd, b"deep")
    os.close(wfd)
    return fd


def deep_ops(mnt):
    """Walk down by fds, then list, read, write a new file and copy one up."""
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            nfd = os.open(COMPONENT, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        listing = sorted(os.listdir(fd))
        rfd = os.open("file", os.O_RDWR, dir_fd=fd)
        data = os.read(rfd, 100)
        os.pwrite(rfd, b"DEEP", 0)          # a copy-up of the whole chain
        os.close(rfd)
        nfd = os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.close(nfd)
        after = sorted(os.listdir(fd))
        return listing, data, after
    finally:
        os.close(fd)


def test_paths_deeper_than_path_max_work_as_on_the_kernel(make_stack):
    results = {}
    for kind in ("kernel", "unionfs"):
        stack = make_stack(tag=kind)
        os.close(build_deep(stack.lowers[1]))
        with getattr(stack, kind)():
            results[kind] = deep_ops(stack.mnt)
    assert results["unionfs"] == results["kernel"]
    assert results["kernel"] == (["file"], b"deep", ["file", "new"])


# ---- xattr whiteouts, looked for only where marked --------------------------------------

@pytest.mark.parametrize("marked", [True, False])
def test_xattr_whiteouts_count_only_in_a_marked_directory_as_on_the_kernel(make_stack, marked):
    """A zero-size file with overlay.whiteout is a whiteout only in a directory
    whose overlay.opaque is "x" (the kernel's mark: it spares a getxattr on
    every empty file of every other directory)."""
    views = {}
    for kind in ("kernel", "unionfs"):
        stack = make_stack(tag=kind)
        for low in stack.lowers:
            (low / "d").mkdir()
        (stack.lowers[1] / "d" / "gone").write_text("below")
        (stack.lowers[0] / "d" / "gone").write_bytes(b"")
        os.setxattr(stack.lowers[0] / "d" / "gone", "trusted.overlay.whiteout", b"")
        (stack.lowers[0] / "d" / "empty").write_bytes(b"")
        if marked:
            os.setxattr(stack.lowers[0] / "d", "trusted.overlay.opaque", b"x")
        with getattr(stack, kind)():
            views[kind] = sorted(os.listdir(stack.mnt / "d")), errname(os.lstat,
                                                                         stack.mnt / "d" / "gone")
    assert views["unionfs"] == views["kernel"]
    assert views["kernel"][0] == (["empty"] if marked else ["empty", "gone"])
