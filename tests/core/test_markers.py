"""Markers the server writes: which format the profile chooses, and that a
marker which cannot be written fails its operation with nothing changed.

Real failures, not mocks: an upper on a tmpfs whose inodes are used up (a
new marker needs an inode, a rename does not), and on a ramfs (no xattrs).
"""
import errno
import os
import stat
import subprocess

import pytest

from unionfs.fs import whiteout
from unionfs.fs.inodes import ROOT_INO
from unionfs.fs.profile import Profile, ProfileError, choose_format, probe
from unionfs.fs.union import Union
from unionfs.fs.whiteout import FORMAT_KERNEL, FORMAT_OCI, FORMAT_USERXATTR


@pytest.mark.parametrize("trusted, mknod, user_xattrs, init_ns, fmt", [
    (True, True, True, True, FORMAT_KERNEL),        # real root
    (False, True, True, False, FORMAT_USERXATTR),   # root of a user namespace
    (False, True, True, True, FORMAT_OCI),          # a plain user: char 0/0 only
    (False, False, True, False, FORMAT_OCI),        # a namespace without mknod
    (False, True, False, False, FORMAT_OCI),        # no user xattrs on the upper
])
def test_the_profile_chooses_the_format_the_server_can_write(trusted, mknod, user_xattrs,
                                                             init_ns, fmt):
    assert choose_format(None, trusted, mknod, user_xattrs, init_ns) == fmt


@pytest.mark.parametrize("forced, can, message", [
    (FORMAT_KERNEL, (False, True, True), "whiteout=kernel: .* trusted"),
    (FORMAT_USERXATTR, (False, True, False), "whiteout=userxattr: .* user"),
])
def test_a_forced_format_the_server_cannot_write_is_refused(forced, can, message):
    with pytest.raises(ProfileError, match=message):
        choose_format(forced, *can, init_ns=False)


def test_a_forced_format_the_server_can_write_is_taken():
    assert choose_format(FORMAT_USERXATTR, False, True, True, True) == FORMAT_USERXATTR
    assert choose_format(FORMAT_OCI, True, True, True, True) == FORMAT_OCI


def test_userxattr_bookkeeping_lives_in_user_xattrs():
    assert Profile(trusted_xattrs=True, whiteout_format=FORMAT_USERXATTR).xattr_ns == "user"
    assert Profile(trusted_xattrs=True, whiteout_format=FORMAT_KERNEL).xattr_ns == "trusted"


@pytest.fixture
def mount_fs(tmp_path):
    """mount_fs(kind, options) -> a fresh mounted directory; unmounted after."""
    made = []

    def mount(kind, options=""):
        mnt = tmp_path / f"{kind}{len(made)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", kind] + (["-o", options] if options else [])
                       + [kind, str(mnt)], check=True, capture_output=True)
        made.append(mnt)
        return mnt
    yield mount
    for mnt in made:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def layers_on(tmp_path, fs):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("lower f")
    (lower / "d").mkdir()
    (lower / "d" / "x").write_text("x")
    upper, work = fs / "upper", fs / "work"
    upper.mkdir()
    work.mkdir()
    return str(lower), str(upper), str(work)


def use_up_inodes(where):
    os.mkdir(where)
    n = 0
    while True:
        try:
            os.close(os.open(os.path.join(where, str(n)), os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as e:
            assert e.errno == errno.ENOSPC
            return
        n += 1


def tree(path):
    return sorted(os.path.relpath(os.path.join(d, n), path)
                  for d, dirs, files in os.walk(path) for n in dirs + files)


@pytest.mark.parametrize("fmt", [FORMAT_OCI, FORMAT_KERNEL])
def test_a_rename_whose_whiteout_cannot_be_made_changes_nothing(tmp_path, mount_fs, fmt):
    """f is in the upper (copied up) and in the lower: renaming it away needs
    a whiteout. With no inode left the rename fails, and f is still f."""
    lower, upper, work = layers_on(tmp_path, mount_fs("tmpfs", "size=1m,nr_inodes=64"))
    u = Union([lower], upper, work, profile=Profile(True, True, True, True, fmt))
    try:
        node, _ = u.lookup(ROOT_INO, b"f")
        u.setattr(node.ino, mode=0o640)         # copied up
        use_up_inodes(os.path.join(os.path.dirname(upper), "filler"))
        before = tree(upper)
        with pytest.raises(OSError) as info:
            u.rename(ROOT_INO, b"f", ROOT_INO, b"g")
        assert info.value.errno == errno.ENOSPC
        assert tree(upper) == before
        assert stat.S_IMODE(u.lookup(ROOT_INO, b"f")[1].st.st_mode) == 0o640
        with pytest.raises(FileNotFoundError):
            u.lookup(ROOT_INO, b"g")
    finally:
        u.close()


@pytest.mark.parametrize("fmt", [FORMAT_OCI, FORMAT_KERNEL])
def test_an_unlink_whose_whiteout_cannot_be_made_changes_nothing(tmp_path, mount_fs, fmt):
    lower, upper, work = layers_on(tmp_path, mount_fs("tmpfs", "size=1m,nr_inodes=64"))
    u = Union([lower], upper, work, profile=Profile(True, True, True, True, fmt))
    try:
        use_up_inodes(os.path.join(os.path.dirname(upper), "filler"))
        with pytest.raises(OSError) as info:
            u.unlink(ROOT_INO, b"f")
        assert info.value.errno == errno.ENOSPC
        assert tree(upper) == []
        assert u.lookup(ROOT_INO, b"f")
    finally:
        u.close()


@pytest.mark.parametrize("fmt", [FORMAT_USERXATTR, FORMAT_KERNEL])
def test_a_directory_whose_opaque_mark_cannot_be_written_is_not_made(tmp_path, mount_fs, fmt):
    """A ramfs has no xattrs at all: a directory made where a lower one was
    removed must be opaque, and cannot be; mkdir fails, nothing is left."""
    lower, upper, work = layers_on(tmp_path, mount_fs("ramfs"))
    u = Union([lower], upper, work, profile=Profile(True, True, True, False, fmt, True))
    try:
        node, _ = u.lookup(ROOT_INO, b"d")
        u.unlink(node.ino, b"x")
        u.rmdir(ROOT_INO, b"d")
        before = tree(upper)
        with pytest.raises(OSError) as info:
            u.mkdir(ROOT_INO, b"d", 0o755)
        assert info.value.errno == errno.EOPNOTSUPP
        assert tree(upper) == before and tree(os.path.join(work, "work")) == []
        with pytest.raises(FileNotFoundError):
            u.lookup(ROOT_INO, b"d")
    finally:
        u.close()


def test_an_upper_without_xattrs_gets_oci_markers(tmp_path, mount_fs):
    fs = mount_fs("ramfs")
    (fs / "work").mkdir()
    fd = os.open(fs / "work", os.O_RDONLY | os.O_DIRECTORY)
    try:
        profile = probe(fd)
    finally:
        os.close(fd)
    assert (profile.trusted_xattrs, profile.user_xattrs) == (False, False)
    assert profile.whiteout_format == FORMAT_OCI


def test_the_userxattr_format_writes_the_kernels_rootless_markers(stack):
    (stack.lowers[0] / "f").write_text("f")
    (stack.lowers[0] / "d").mkdir()
    u = stack.open_union(profile=Profile(False, True, True, False, FORMAT_USERXATTR, True))
    try:
        u.unlink(ROOT_INO, b"f")
        u.rmdir(ROOT_INO, b"d")
        u.mkdir(ROOT_INO, b"d", 0o755)
    finally:
        u.close()
    st = os.lstat(stack.upper / "f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(stack.upper / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(stack.upper / "d")
    assert not [n for n in os.listdir(os.fsencode(stack.upper)) if n.startswith(whiteout.WH_PREFIX)]
