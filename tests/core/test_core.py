"""The core on plain temporary directories, without a mount."""
import os
import stat

import pytest

from mountutil import node_at
from unionfs.fs import whiteout
from unionfs.fs.inodes import ROOT_INO
from unionfs.fs.union import Caller, Union


@pytest.fixture
def union(stack):
    (stack.lowers[1] / "f").write_text("lower data")
    (stack.lowers[1] / "d").mkdir()
    (stack.lowers[1] / "d" / "x").write_text("x")
    (stack.lowers[0] / "d").mkdir()
    (stack.lowers[0] / "d" / "y").write_text("y")
    u = stack.open_union()
    yield u
    u.close()


def read_all(u, node):
    fh = u.open(node.ino, os.O_RDONLY)
    try:
        return u.read(fh, 0, 1 << 20)
    finally:
        u.release(fh)


def test_lookup_of_a_missing_name_is_enoent(union):
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        union.lookup(ROOT_INO, b"nope")


def test_marker_names_are_never_visible(stack, union):
    (stack.lowers[0] / ".wh.f").write_text("")
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        union.lookup(ROOT_INO, b".wh.f")


def test_read_does_not_copy_up(stack, union):
    assert read_all(union, node_at(union, "f")) == b"lower data"
    assert os.listdir(stack.upper) == []


def test_write_open_copies_up_with_data_and_mode(stack, union):
    os.chmod(stack.lowers[1] / "f", 0o4755)
    node = node_at(union, "f")
    fh = union.open(node.ino, os.O_WRONLY | os.O_APPEND)
    union.write(fh, 10, b"!")
    union.release(fh)
    assert (stack.upper / "f").read_text() == "lower data!"
    assert stat.S_IMODE(os.stat(stack.upper / "f").st_mode) == 0o4755
    assert (stack.lowers[1] / "f").read_text() == "lower data"


def test_copy_up_keeps_the_inode_number(union):
    node = node_at(union, "f")
    before = node.ino
    union.setattr(node.ino, mode=0o600)
    assert node_at(union, "f").ino == before


def test_copy_up_creates_parents_with_their_metadata(stack, union):
    os.chmod(stack.lowers[0] / "d", 0o750)
    os.chown(stack.lowers[0] / "d", 1000, 1001)
    union.setattr(node_at(union, "d/y").ino, mode=0o600)
    st = os.stat(stack.upper / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1000, 1001)


def test_unlink_of_a_lower_file_writes_a_kernel_whiteout(stack, union):
    union.unlink(ROOT_INO, b"f")
    st = os.lstat(stack.upper / "f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        union.lookup(ROOT_INO, b"f")


def test_unlink_in_oci_format_writes_a_wh_file(stack):
    (stack.lowers[1] / "f").write_text("x")
    u = stack.open_union(whiteout_format=whiteout.FORMAT_OCI)
    try:
        u.unlink(ROOT_INO, b"f")
        assert (stack.upper / ".wh.f").exists()
        assert not (stack.upper / "f").exists()
    finally:
        u.close()


def test_rmdir_of_a_merged_directory_needs_it_empty(union):
    with pytest.raises(OSError, match="Directory not empty"):
        union.rmdir(ROOT_INO, b"d")


def test_rmdir_after_deleting_every_entry(stack, union):
    d = node_at(union, "d")
    union.unlink(d.ino, b"x")
    union.unlink(d.ino, b"y")
    union.rmdir(ROOT_INO, b"d")
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        union.lookup(ROOT_INO, b"d")


def test_directory_recreated_over_a_whiteout_is_opaque(stack, union):
    d = node_at(union, "d")
    union.unlink(d.ino, b"x")
    union.unlink(d.ino, b"y")
    union.rmdir(ROOT_INO, b"d")
    node, _ = union.mkdir(ROOT_INO, b"d", 0o755)
    assert os.getxattr(stack.upper / "d", "trusted.overlay.opaque") == b"y"
    assert [n for _, n, _, _ in union.readdir(union.opendir(node.ino), 0)] == [b".", b".."]


def test_rename_of_a_lower_directory_is_exdev(union):
    with pytest.raises(OSError, match="Invalid cross-device link"):
        union.rename(ROOT_INO, b"d", ROOT_INO, b"e")


def test_rename_of_a_lower_file_leaves_a_whiteout(stack, union):
    union.rename(ROOT_INO, b"f", ROOT_INO, b"g")
    assert read_all(union, node_at(union, "g")) == b"lower data"
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        union.lookup(ROOT_INO, b"f")


def test_new_entry_in_setgid_directory_takes_its_group(stack, union):
    os.chown(stack.lowers[0] / "d", 0, 1234)
    os.chmod(stack.lowers[0] / "d", 0o2775)
    d = node_at(union, "d")
    node, (st, _, _) = union.mkdir(d.ino, b"sub", 0o755, Caller(1000, 1000, 0o022))
    assert st.st_gid == 1234 and st.st_mode & stat.S_ISGID and st.st_uid == 1000


def test_failed_removexattr_copies_nothing_up(stack, union):
    with pytest.raises(OSError, match="No data available"):
        union.removexattr(node_at(union, "f").ino, b"user.missing")
    assert os.listdir(stack.upper) == []


def test_own_xattrs_are_hidden(stack, union):
    os.setxattr(stack.lowers[0] / "d", "trusted.overlay.opaque", b"n")
    os.setxattr(stack.lowers[0] / "d", "user.visible", b"1")
    assert union.listxattr(node_at(union, "d").ino) == [b"user.visible"]


def test_read_only_union_refuses_writes(stack):
    (stack.lowers[0] / "f").write_text("x")
    u = Union([str(stack.lowers[0])])
    try:
        with pytest.raises(OSError, match="Read-only file system"):
            u.open(node_at(u, "f").ino, os.O_WRONLY)
    finally:
        u.close()


def test_workdir_litter_is_cleaned_at_open(stack):
    (stack.work / "work").mkdir()
    (stack.work / "work" / "#half-copied").write_text("partial")
    stack.open_union().close()
    assert os.listdir(stack.work / "work") == []


def test_sparse_copy_up_keeps_holes(stack):
    with open(stack.lowers[1] / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data")
    u = stack.open_union()
    try:
        u.setattr(node_at(u, "sparse").ino, mode=0o600)
    finally:
        u.close()
    st = os.stat(stack.upper / "sparse")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 1 << 20
    with open(stack.upper / "sparse", "rb") as f:
        f.seek(32 << 20)
        assert f.read(4) == b"data"


def test_a_missing_layer_raises_and_leaks_no_fd(stack):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        Union([str(stack.lowers[0]), str(stack.lowers[1] / "missing")], str(stack.upper),
              str(stack.work))
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_whiteout_no_marker_can_hold_fails_before_anything_changes(stack):
    """OCI form, a 255-byte name (".wh." + it is too long) and no right to make
    a char 0/0 whiteout: ENAMETOOLONG, and the upper copy is still there."""
    from unionfs.fs.profile import Profile
    long_name = b"n" * 255
    (stack.lowers[1] / os.fsdecode(long_name)).write_text("lower")
    u = stack.open_union(profile=Profile(whiteout_format=whiteout.FORMAT_OCI))
    try:
        node = node_at(u, os.fsdecode(long_name))
        u.setattr(node.ino, mode=0o600)             # copied up
        with pytest.raises(OSError, match="File name too long"):
            u.unlink(ROOT_INO, long_name)
        with pytest.raises(OSError, match="File name too long"):
            u.rename(ROOT_INO, long_name, ROOT_INO, b"short")
        assert os.listdir(stack.upper) == [os.fsdecode(long_name)]
        assert node_at(u, os.fsdecode(long_name)).ino == node.ino
    finally:
        u.close()
