"""Pure rules, no mount: whiteout classification and layer probing on tmp dirs."""
import os
import stat

import pytest

from unionfs.fs import layers, whiteout


def dirfd(path):
    return os.open(path, os.O_PATH | os.O_DIRECTORY)


@pytest.fixture
def d(tmp_path):
    fd = dirfd(tmp_path)
    yield tmp_path, fd
    os.close(fd)


def lst(path):
    return os.lstat(path)


def test_char_device_0_0_is_a_whiteout(d):
    path, fd = d
    os.mknod(path / "x", stat.S_IFCHR, os.makedev(0, 0))
    assert whiteout.is_whiteout(fd, b"x", lst(path / "x"))


def test_other_char_device_is_not_a_whiteout(d):
    path, fd = d
    os.mknod(path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert not whiteout.is_whiteout(fd, b"null", lst(path / "null"))


@pytest.mark.parametrize("xattr", whiteout.WHITEOUT_XATTRS)
def test_empty_file_with_whiteout_xattr_is_a_whiteout(d, xattr):
    path, fd = d
    (path / "x").write_bytes(b"")
    os.setxattr(path / "x", xattr, b"")
    assert whiteout.is_whiteout(fd, b"x", lst(path / "x"))


def test_empty_plain_file_is_not_a_whiteout(d):
    path, fd = d
    (path / "x").write_bytes(b"")
    assert not whiteout.is_whiteout(fd, b"x", lst(path / "x"))


@pytest.mark.parametrize("name,target", [(b".wh.foo", b"foo"), (b".wh..wh..opq", None),
                                         (b"foo", None), (b".wh.", None)])
def test_oci_whiteout_names(name, target):
    assert whiteout.whited_out_name(name) == target


@pytest.mark.parametrize("form", ["trusted.overlay.opaque", "user.overlay.opaque", "oci"])
def test_opaque_directory_forms(d, form):
    path, fd = d
    (path / "dir").mkdir()
    if form == "oci":
        (path / "dir" / ".wh..wh..opq").write_bytes(b"")
    else:
        os.setxattr(path / "dir", form, b"y")
    assert whiteout.is_opaque(fd, b"dir")


def test_plain_directory_is_not_opaque(d):
    path, fd = d
    (path / "dir").mkdir()
    assert not whiteout.is_opaque(fd, b"dir")


@pytest.mark.parametrize("fmt", [whiteout.FORMAT_KERNEL, whiteout.FORMAT_OCI])
def test_written_markers_read_back(d, fmt):
    path, fd = d
    whiteout.make_whiteout(fd, b"gone", fmt)
    (path / "dir").mkdir()
    sub = dirfd(path / "dir")
    try:
        whiteout.make_opaque(sub, fmt)
    finally:
        os.close(sub)
    assert whiteout.is_opaque(fd, b"dir")
    if fmt == whiteout.FORMAT_KERNEL:
        assert whiteout.is_whiteout(fd, b"gone", lst(path / "gone"))
    else:
        assert whiteout.has_oci_whiteout(fd, b"gone")


# ---- probing a stack --------------------------------------------------------

class Layers:
    def __init__(self, root, n):
        self.paths = [root / f"L{i}" for i in range(n)]
        for p in self.paths:
            p.mkdir()

    def probe(self, name, parent=b""):
        fds = {}
        try:
            for i, p in enumerate(self.paths):
                try:
                    fds[i] = layers.Layer.open(i, str(p)).open_dir(parent)
                except OSError:
                    fds[i] = None
            return layers.probe(list(range(len(self.paths))), fds.get, name)
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)


def test_top_layer_wins(tmp_path):
    st = Layers(tmp_path, 2)
    (st.paths[0] / "f").write_text("top")
    (st.paths[1] / "f").write_text("bottom")
    assert st.probe(b"f").layer == 0


def test_kernel_whiteout_hides_lower(tmp_path):
    st = Layers(tmp_path, 2)
    os.mknod(st.paths[0] / "f", stat.S_IFCHR, os.makedev(0, 0))
    (st.paths[1] / "f").write_text("bottom")
    assert st.probe(b"f") is None


def test_oci_whiteout_hides_lower_but_not_its_own_layer(tmp_path):
    st = Layers(tmp_path, 3)
    (st.paths[1] / ".wh.f").write_text("")
    (st.paths[2] / "f").write_text("bottom")
    assert st.probe(b"f") is None
    (st.paths[1] / "f").write_text("same layer")
    assert st.probe(b"f").layer == 1


def test_directories_merge_until_an_opaque_one(tmp_path):
    st = Layers(tmp_path, 3)
    for p in st.paths:
        (p / "d").mkdir()
    (st.paths[1] / "d" / ".wh..wh..opq").write_text("")
    assert st.probe(b"d").layers == (0, 1)


def test_non_directory_below_a_directory_stops_the_merge(tmp_path):
    st = Layers(tmp_path, 3)
    (st.paths[0] / "d").mkdir()
    (st.paths[1] / "d").write_text("file")
    (st.paths[2] / "d").mkdir()
    assert st.probe(b"d").layers == (0,)


def test_symlinked_parent_in_a_layer_resolves_to_nothing(tmp_path):
    st = Layers(tmp_path, 1)
    os.symlink("/etc", st.paths[0] / "etc")
    assert st.probe(b"passwd", parent=b"etc") is None


def test_dotdot_symlink_in_a_layer_is_not_followed(tmp_path):
    st = Layers(tmp_path, 1)
    os.symlink("../../..", st.paths[0] / "up")
    assert st.probe(b"etc", parent=b"up") is None


def test_list_names_hides_markers_and_whited_out_names(tmp_path):
    st = Layers(tmp_path, 2)
    (st.paths[0] / ".wh.gone").write_text("")
    os.mknod(st.paths[0] / "gone2", stat.S_IFCHR, os.makedev(0, 0))
    (st.paths[0] / "keep").write_text("")
    for name in ("gone", "gone2", "low"):
        (st.paths[1] / name).write_text("")
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in st.paths]
    try:
        names = layers.list_names(lambda i: fds[i], [0, 1])
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(names) == [b"keep", b"low"]
