"""The layer applier against hostile layers: nothing outside the root is
created, changed or linked, and each layer gets a clear error or the spec's
behaviour. No mount needed."""
import io
import os
import stat

import pytest
from tarbuild import entry, make_tar

from unionfs.image.applier import LayerError, apply_tar


def snapshot(top, skip):
    """Everything under `top` but `skip`: names, types, modes, sizes, nlink, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if os.path.abspath(dirpath) == os.path.abspath(skip):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.abspath(p) == os.path.abspath(skip):
                continue
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[p] = (st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns, st.st_uid, data)
    return out


@pytest.fixture
def site(tmp_path):
    """tmp/outside/sentinel next to tmp/root, the layer root."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"host data")
    (outside / "dir").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    before = snapshot(tmp_path, root)
    yield tmp_path, root
    assert snapshot(tmp_path, root) == before, "something outside the layer root changed"
    assert os.stat(outside / "sentinel").st_nlink == 1


def apply(root, entries, raw=None):
    data = raw if raw is not None else make_tar(entries)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        return apply_tar(io.BytesIO(data), fd, may_chown=True, may_mknod=True)
    finally:
        os.close(fd)


def refused(root, entries, match, raw=None):
    with pytest.raises(LayerError, match=match):
        apply(root, entries, raw)


# --- names that climb or are absolute ------------------------------------------------

def test_dotdot_name_is_refused(site):
    _, root = site
    refused(root, [entry("../escape", data=b"x")], r"'\.\.' in the name")


def test_dotdot_inside_a_name_is_refused(site):
    _, root = site
    refused(root, [entry("a/../../escape", data=b"x")], r"'\.\.' in the name")


def test_absolute_name_lands_inside_the_root(site):
    _, root = site
    apply(root, [entry("/abs/file", data=b"in")])
    assert (root / "abs" / "file").read_bytes() == b"in"


def test_absolute_name_that_climbs_is_refused(site):
    tmp, root = site
    refused(root, [entry(str(tmp / "outside" / ".." / "outside" / "new"), data=b"x")],
            r"'\.\.' in the name")


# --- symlinks -------------------------------------------------------------------------

def test_write_through_a_relative_symlink_is_refused(site):
    _, root = site
    refused(root, [entry("evil", "symlink", link="../outside"),
                   entry("evil/sentinel", data=b"overwritten")], r"symlink or not a directory")


def test_write_through_an_absolute_symlink_is_refused(site):
    tmp, root = site
    refused(root, [entry("evil", "symlink", link=str(tmp / "outside")),
                   entry("evil/new", data=b"x")], r"symlink or not a directory")


def test_symlink_named_dot_is_refused(site):
    _, root = site
    refused(root, [entry(".", "symlink", link="/")], r"only a directory may stand for")


def test_symlink_named_slash_is_refused(site):
    _, root = site
    refused(root, [entry("./", "symlink", link="../outside")], r"only a directory may stand")


def test_absolute_symlink_is_kept_as_is(site):
    _, root = site
    apply(root, [entry("etc/localtime", "symlink", link="/usr/share/zoneinfo/UTC")])
    assert os.readlink(root / "etc" / "localtime") == "/usr/share/zoneinfo/UTC"


def test_long_symlink_chain_is_stored_and_never_followed(site):
    _, root = site
    chain = [entry(f"l{i}", "symlink", link=f"l{i + 1}") for i in range(60)]
    chain.append(entry("l60", "symlink", link="../outside"))
    apply(root, chain)
    assert os.readlink(root / "l0") == "l1"
    refused(root, chain + [entry("l0/sentinel", data=b"x")], r"symlink or not a directory")


def test_file_replaces_a_symlink_instead_of_writing_through_it(site):
    _, root = site
    apply(root, [entry("s", "symlink", link="../outside/sentinel"),
                 entry("s", data=b"mine")])
    assert not os.path.islink(root / "s")
    assert (root / "s").read_bytes() == b"mine"


# --- hard links -----------------------------------------------------------------------

def test_hard_link_climbing_to_a_host_file_is_refused(site):
    _, root = site
    refused(root, [entry("hl", "hardlink", link="../outside/sentinel")], r"'\.\.' in the name")


def test_hard_link_to_an_absolute_host_path_is_refused(site):
    tmp, root = site
    refused(root, [entry("hl", "hardlink", link=str(tmp / "outside" / "sentinel"))],
            r"not in the layer|not an earlier entry")


def test_hard_link_to_a_symlink_links_the_symlink_itself(site):
    _, root = site
    apply(root, [entry("s", "symlink", link="../outside/sentinel"),
                 entry("hl", "hardlink", link="s")])
    assert os.readlink(root / "hl") == "../outside/sentinel"
    assert os.lstat(root / "s").st_nlink == 2


def test_hard_link_through_a_symlinked_dir_is_refused(site):
    _, root = site
    refused(root, [entry("d", "symlink", link="../outside"),
                   entry("hl", "hardlink", link="d/sentinel")], r"symlink or not a directory")


def test_hard_link_to_a_directory_is_refused(site):
    _, root = site
    refused(root, [entry("d", "dir"), entry("hl", "hardlink", link="d")],
            r"hard link to a directory")


def test_hard_link_to_itself_is_refused(site):
    _, root = site
    refused(root, [entry("f", data=b"x"), entry("f", "hardlink", link="f")],
            r"hard link to itself")


def test_hard_link_before_its_target_is_refused(site):
    _, root = site
    refused(root, [entry("hl", "hardlink", link="later"), entry("later", data=b"x")],
            r"not an earlier entry")


# --- duplicates -----------------------------------------------------------------------

def test_duplicate_file_the_later_entry_wins(site):
    _, root = site
    apply(root, [entry("f", data=b"first"), entry("f", data=b"second", mode=0o600)])
    assert (root / "f").read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o600


def test_duplicate_file_replaces_a_directory_tree(site):
    _, root = site
    apply(root, [entry("d", "dir"), entry("d/child", data=b"c"), entry("d", data=b"file")])
    assert (root / "d").read_bytes() == b"file"


def test_directory_replacing_a_symlink_keeps_later_entries_inside(site):
    _, root = site
    apply(root, [entry("p", "symlink", link="../outside"), entry("p", "dir"),
                 entry("p/x", data=b"inside")])
    assert (root / "p" / "x").read_bytes() == b"inside"
    assert not os.path.islink(root / "p")


def test_duplicate_directories_merge(site):
    _, root = site
    apply(root, [entry("d", "dir"), entry("d/a", data=b"a"), entry("d", "dir", mode=0o700)])
    assert (root / "d" / "a").read_bytes() == b"a"
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o700


def test_path_through_a_regular_file_is_refused(site):
    _, root = site
    refused(root, [entry("f", data=b"x"), entry("f/g", data=b"y")],
            r"symlink or not a directory")


# --- whiteouts ------------------------------------------------------------------------

def test_bare_whiteout_prefix_is_refused(site):
    _, root = site
    refused(root, [entry(".wh.", data=b"")], r"a whiteout that names nothing")


def test_whiteout_outside_the_layer_is_refused(site):
    _, root = site
    refused(root, [entry("../.wh.outside")], r"'\.\.' in the name")


def test_whiteout_through_a_symlink_is_refused(site):
    _, root = site
    refused(root, [entry("ln", "symlink", link="../outside"), entry("ln/.wh.sentinel")],
            r"symlink or not a directory")


def test_whiteout_that_is_a_directory_is_refused(site):
    _, root = site
    refused(root, [entry(".wh.x", "dir")], r"cannot be a directory")


def test_entry_inside_a_whiteout_marker_is_refused(site):
    _, root = site
    refused(root, [entry(".wh.x/y", data=b"x")], r"whiteout marker .* used as a directory")


def test_whiteouts_are_stored_as_the_filesystem_reads_them(site):
    _, root = site
    res = apply(root, [entry("d", "dir"), entry("d/a", data=b"a"),
                       entry("d/.wh..wh..opq"), entry("d/b", data=b"b"),
                       entry(".wh.gone"), entry("kept", data=b"k"), entry(".wh.kept")])
    assert sorted(os.listdir(root / "d")) == [".wh..wh..opq", "a", "b"]
    assert os.stat(root / ".wh.gone").st_size == 0
    assert (root / "kept").read_bytes() == b"k" and os.path.exists(root / ".wh.kept")
    assert (res.whiteouts, res.opaque_dirs) == (2, 1)


def test_whiteout_as_hard_link_or_symlink_becomes_a_marker_file(site):
    _, root = site
    apply(root, [entry(".wh.a", "symlink", link="../outside/sentinel"),
                 entry(".wh.b", "hardlink", link="../outside/sentinel")])
    for n in (".wh.a", ".wh.b"):
        st = os.lstat(root / n)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_nlink == 1


def test_aufs_metadata_entries_are_skipped(site):
    _, root = site
    res = apply(root, [entry(".wh..wh.plnk", "dir"), entry(".wh..wh.aufs")])
    assert os.listdir(root) == []
    assert len(res.skipped_names) == 2


# --- damaged tars ---------------------------------------------------------------------

def test_truncated_file_data_is_refused(site):
    _, root = site
    raw = make_tar([entry("big", data=b"x" * 100_000)])
    refused(root, None, r"truncated|unexpected end", raw=raw[:20_000])


def test_garbage_is_refused(site):
    _, root = site
    refused(root, None, r"not a valid tar", raw=b"\x01" * 4096)


def test_symlink_with_empty_target_is_refused(site):
    _, root = site
    refused(root, [entry("s", "symlink", link="")], r"empty target")


# --- what is kept ---------------------------------------------------------------------

def test_owners_modes_setuid_devices_fifos_times_xattrs_are_kept(site):
    _, root = site
    apply(root, [
        entry("bin/su", data=b"elf", mode=0o4755, uid=1000, gid=1001),
        entry("bin/sg", data=b"elf", mode=0o2711, uid=0, gid=42),
        entry("dev/null", "char", mode=0o666, dev=(1, 3)),
        entry("dev/loop", "block", mode=0o660, dev=(7, 0), gid=6),
        entry("run/fifo", "fifo", mode=0o620, uid=5),
        entry("tmp", "dir", mode=0o1777),
        entry("x", data=b"x", xattrs={"user.note": b"v\xff", "trusted.overlay.opaque": "y",
                                      "user.unionfs.origin": "forged"},
              pax={"mtime": "1234567890.123456789"}),
        entry("sub/ro", "dir", mode=0o555, mtime=1_500_000_000),
        entry("sub/ro/inside", data=b"i"),
    ])
    st = os.stat(root / "bin" / "su")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1000, 1001)
    assert stat.S_IMODE(os.stat(root / "bin" / "sg").st_mode) == 0o2711
    null = os.stat(root / "dev" / "null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.stat(root / "dev" / "loop").st_mode)
    fifo = os.stat(root / "run" / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and fifo.st_uid == 5
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    x = root / "x"
    assert os.getxattr(x, "user.note") == b"v\xff"
    assert "trusted.overlay.opaque" not in os.listxattr(x)
    assert "user.unionfs.origin" not in os.listxattr(x)
    assert os.stat(x).st_mtime_ns == 1234567890_123456789
    ro = os.stat(root / "sub" / "ro")
    assert stat.S_IMODE(ro.st_mode) == 0o555 and ro.st_mtime == 1_500_000_000


def test_hard_links_inside_the_layer_are_kept(site):
    _, root = site
    apply(root, [entry("a", data=b"same"), entry("d/b", "hardlink", link="./a"),
                 entry("c", "hardlink", link="/a")])
    assert os.stat(root / "a").st_nlink == 3
    assert os.stat(root / "d" / "b").st_ino == os.stat(root / "c").st_ino


def test_missing_parents_are_made(site):
    _, root = site
    apply(root, [entry("deep/er/file", data=b"x")])
    st = os.stat(root / "deep" / "er")
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0


def test_root_entry_sets_the_root_directory_metadata(site):
    _, root = site
    apply(root, [entry("./", "dir", mode=0o700, mtime=1_600_000_000), entry("f", data=b"x")])
    st = os.stat(root)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_mtime == 1_600_000_000


def test_without_chown_and_mknod_owners_are_dropped_and_devices_skipped(site):
    """What a store does without CAP_CHOWN/CAP_MKNOD (docs/images.md, Rootless)."""
    _, root = site
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        res = apply_tar(io.BytesIO(make_tar([
            entry("owned", data=b"x", uid=1000, gid=1000, mode=0o640),
            entry("dev/null", "char", dev=(1, 3)), entry("fifo", "fifo")])),
            fd, may_chown=False, may_mknod=False)
    finally:
        os.close(fd)
    assert (res.owners_dropped, res.devices_skipped) == (1, 1)
    assert os.stat(root / "owned").st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(root / "owned").st_mode) == 0o640
    assert not os.path.exists(root / "dev" / "null") and stat.S_ISFIFO(
        os.stat(root / "fifo").st_mode)
