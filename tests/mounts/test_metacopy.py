"""-o metacopy=on: metadata changes copy only metadata; data follows at the
first data write; the kernel (with metacopy=on) reads the same upper."""
import os
import stat

import pytest

from mountutil import kernel_mount

SIZE = 8 << 20


@pytest.fixture
def stack(make_stack):
    s = make_stack(1)
    with open(s.lowers[0] / "big", "wb") as f:
        f.write(os.urandom(SIZE))
    return s


def lower_data(stack):
    return (stack.lowers[0] / "big").read_bytes()


def is_metacopy(path):
    try:
        os.getxattr(path, "trusted.overlay.metacopy", follow_symlinks=False)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("op", ["chmod", "chown", "utime", "setxattr"])
def test_metadata_change_copies_no_data(stack, op):
    ops = {"chmod": lambda p: os.chmod(p, 0o600), "chown": lambda p: os.chown(p, 1000, 1000),
           "utime": lambda p: os.utime(p, (1, 1)),
           "setxattr": lambda p: os.setxattr(p, "user.tag", b"x")}
    with stack.unionfs(options=["metacopy=on"]):
        ops[op](stack.mnt / "big")
        assert (stack.mnt / "big").read_bytes() == lower_data(stack)
    upper = stack.upper / "big"
    st = os.stat(upper)
    assert st.st_blocks * 512 <= 8192 and st.st_size == SIZE      # xattrs may take a block
    assert is_metacopy(upper)


def test_metacopy_marker_is_not_visible(stack):
    with stack.unionfs(options=["metacopy=on"]):
        os.chmod(stack.mnt / "big", 0o600)
        assert os.listxattr(stack.mnt / "big") == []


def test_first_write_brings_the_data_up(stack):
    with stack.unionfs(options=["metacopy=on"]):
        os.chmod(stack.mnt / "big", 0o640)
        with open(stack.mnt / "big", "ab") as f:
            f.write(b"tail")
        assert (stack.mnt / "big").read_bytes() == lower_data(stack) + b"tail"
        assert stat.S_IMODE(os.stat(stack.mnt / "big").st_mode) == 0o640
    assert not is_metacopy(stack.upper / "big")
    assert os.stat(stack.upper / "big").st_blocks > 0


def test_reader_opened_before_the_data_copy_sees_new_data(stack):
    with stack.unionfs(options=["metacopy=on"]):
        os.chmod(stack.mnt / "big", 0o600)
        with open(stack.mnt / "big", "rb") as reader:
            with open(stack.mnt / "big", "r+b") as writer:
                writer.write(b"HEAD")
            assert reader.read(4) == b"HEAD"


def test_metacopy_survives_a_remount(stack):
    with stack.unionfs(options=["metacopy=on"]):
        os.chmod(stack.mnt / "big", 0o600)
        ino = os.stat(stack.mnt / "big").st_ino
    with stack.unionfs():
        assert (stack.mnt / "big").read_bytes() == lower_data(stack)
        assert os.stat(stack.mnt / "big").st_ino == ino
        os.truncate(stack.mnt / "big", 10)
        assert (stack.mnt / "big").read_bytes() == lower_data(stack)[:10]


def test_kernel_reads_our_metacopy_upper(stack):
    with stack.unionfs(options=["metacopy=on"]):
        os.chmod(stack.mnt / "big", 0o600)
        os.setxattr(stack.mnt / "big", "user.tag", b"x")
    with kernel_mount(stack.mnt, stack.lowers, stack.upper, stack.work, options="metacopy=on"):
        st = os.stat(stack.mnt / "big")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == SIZE
        assert os.getxattr(stack.mnt / "big", "user.tag") == b"x"
        assert (stack.mnt / "big").read_bytes() == lower_data(stack)


def test_without_metacopy_a_chmod_copies_the_data(stack):
    with stack.unionfs():
        os.chmod(stack.mnt / "big", 0o600)
    assert not is_metacopy(stack.upper / "big")
    assert (stack.upper / "big").read_bytes() == lower_data(stack)


def test_small_metacopy_file_is_recognised_after_a_remount(make_stack):
    """An xattr block can outweigh a small file: block counts alone cannot tell."""
    s = make_stack(1)
    (s.lowers[0] / "small").write_bytes(b"x" * 100)
    with s.unionfs(options=["metacopy=on"]):
        os.setxattr(s.mnt / "small", "user.big", b"v" * 3000)    # an external xattr block
    with s.unionfs(options=["metacopy=on"]):
        assert (s.mnt / "small").read_bytes() == b"x" * 100
