"""Owners and modes under fuse-overlayfs's id options (fs.owners), in-process
on temporary directories: what every reply shows, what new objects and
chowns store, the override xattr read and written, private xattr names,
squashing and static_nlink. The rules themselves are tests/rules/test_idmap.py's;
real mounts side by side with fuse-overlayfs are tests/podman's."""
import errno
import json
import os
import pathlib
import shutil
import stat
import tempfile

import pytest

from mountutil import node_at
from unionfs.fs import idmap
from unionfs.fs.idmap import OVERRIDE_CONTAINERS
from unionfs.fs.inodes import ROOT_INO
from unionfs.fs.owners import Owners
from unionfs.fs.union import Caller

MAPPING = {"uidmapping": "0:100:10", "gidmapping": "0:200:10"}


def options(**values):
    return idmap.from_options({k: v for k, v in values.items()})


def owner(attrs):
    return attrs.st.st_uid, attrs.st.st_gid


@pytest.fixture
def layers(stack):
    low = stack.lowers[0]
    (low / "f").write_text("f")
    os.chown(low / "f", 5, 6)
    (low / "d").mkdir()
    os.chown(low / "d", 1, 2)
    (low / "d" / "inside").write_text("i")
    (low / "stranger").write_text("s")
    os.chown(low / "stranger", 5000, 5000)
    return stack


def test_no_option_keeps_the_fast_path():
    assert Owners.build(idmap.IdOptions(), (None, None)) is None
    assert Owners.build(options(noacl=None), (None, None)) is None


def test_every_reply_shows_mapped_owners(layers):
    u = layers.open_union(id_options=options(**MAPPING))
    try:
        node, attrs = u.lookup(ROOT_INO, b"f")
        assert owner(attrs) == (105, 206)
        assert owner(u.getattr(node.ino)[1]) == (105, 206)
        assert owner(u.lookup(ROOT_INO, b"stranger")[1]) == (65534, 65534)  # outside: overflow
        assert owner(u.getattr(ROOT_INO)[1]) == (100, 200)
        fh = u.opendir(ROOT_INO)
        listed = {name: owner(a) for _, name, n, a in u.readdir(fh, 0) if n is not None}
        u.releasedir(fh)
        assert listed[b"d"] == (101, 202) and listed[b"f"] == (105, 206)
        root = Caller(uid=103, gid=204)
        assert owner(u.mkdir(ROOT_INO, b"new", 0o755, root)[1]) == (103, 204)
        assert owner(u.create(ROOT_INO, b"c", 0o644, os.O_WRONLY, root)[2]) == (103, 204)
        assert owner(u.symlink(ROOT_INO, b"l", b"f", root)[1]) == (103, 204)
        assert owner(u.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, root)[1]) == (103, 204)
        assert owner(u.link(node.ino, ROOT_INO, b"hard")[1]) == (105, 206)
        assert owner(u.setattr(node.ino, uid=107)[1]) == (107, 206)
    finally:
        u.close()
    # stored: the caller's ids mapped back, and a chown's
    st = {n: (os.lstat(layers.upper / n).st_uid, os.lstat(layers.upper / n).st_gid)
          for n in ("new", "c", "l", "p", "f")}
    assert st == {"new": (3, 4), "c": (3, 4), "l": (3, 4), "p": (3, 4), "f": (7, 6)}


def test_ids_outside_the_mapping_are_stored_as_the_overflow_id(layers):
    u = layers.open_union(id_options=options(**MAPPING))
    try:
        u.create(ROOT_INO, b"by-root", 0o644, os.O_WRONLY, Caller(uid=0, gid=0))
        node = node_at(u, "f")
        u.setattr(node.ino, uid=50)
    finally:
        u.close()
    assert os.lstat(layers.upper / "by-root").st_uid == 65534
    assert (os.lstat(layers.upper / "f").st_uid, os.lstat(layers.upper / "f").st_gid) \
        == (65534, 6)


def test_a_setgid_parent_passes_on_its_stored_group(layers):
    os.chmod(layers.lowers[0] / "d", 0o2775)
    u = layers.open_union(id_options=options(**MAPPING))
    try:
        _, attrs = u.mkdir(node_at(u, "d").ino, b"sub", 0o755, Caller(uid=103, gid=204))
        assert owner(attrs) == (103, 202) and attrs.st.st_mode & stat.S_ISGID
    finally:
        u.close()
    st = os.lstat(layers.upper / "d" / "sub")
    assert (st.st_uid, st.st_gid) == (3, 2)


def test_squashing_shows_one_owner_and_stores_the_callers(layers):
    u = layers.open_union(id_options=options(squash_to_uid="7", squash_to_root=None))
    try:
        assert owner(u.lookup(ROOT_INO, b"f")[1]) == (7, 0)
        assert owner(u.create(ROOT_INO, b"c", 0o644, os.O_WRONLY, Caller(9, 9))[2]) == (7, 0)
    finally:
        u.close()
    assert os.lstat(layers.upper / "c").st_uid == 9


def as_nobody(fn):
    """fn() in a forked child running as nobody (no capabilities); its
    JSON-able result, or the errno it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = {"value": fn()}
        except OSError as e:
            result = {"errno": e.errno}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = {"error": repr(e)}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.parametrize("squash, expected", [(False, {"errno": errno.EPERM}),
                                              (True, {"value": [65534, 65534]})])
def test_a_refused_chown_is_reported_as_done_only_when_squashed(make_stack, squash, expected):
    # pytest's tmp_path is under a 0700 directory nobody may not enter
    root = pathlib.Path(tempfile.mkdtemp(prefix="unionfs-owners-"))
    layers = make_stack(1, root=root)
    (layers.lowers[0] / "f").write_text("f")
    for path in [root, layers.upper, layers.work, *layers.lowers, layers.lowers[0] / "f"]:
        os.chown(path, 65534, 65534)
    values = {"squash_to_root": None} if squash else {"noacl": None, "static_nlink": None}

    def chown_as_nobody():
        u = layers.open_union(id_options=options(**values))
        try:
            u.setattr(node_at(u, "f").ino, uid=1234, gid=1234)
        finally:
            u.close()
        st = os.lstat(layers.upper / "f")
        return [st.st_uid, st.st_gid]
    try:
        assert as_nobody(chown_as_nobody) == expected
    finally:
        shutil.rmtree(root)


def test_static_nlink_shows_one_link_for_every_directory(layers):
    (layers.upper / "u" / "a").mkdir(parents=True)
    u = layers.open_union(id_options=options(static_nlink=None))
    try:
        assert [u.lookup(ROOT_INO, n)[1].nlink for n in (b"d", b"u")] == [1, 1]
        assert u.lookup(ROOT_INO, b"f")[1].nlink == 1
    finally:
        u.close()


# ---- the override xattr ------------------------------------------------------------

def mark_override_layer(root, values):
    os.setxattr(root, OVERRIDE_CONTAINERS, b"0:0:0755")
    for rel, value in values.items():
        os.chmod(root / rel, 0o755)
        os.setxattr(root / rel, OVERRIDE_CONTAINERS, value)


@pytest.fixture
def override_layers(layers):
    mark_override_layer(layers.lowers[0], {"f": b"10:20:0600", "d": b"1:2:0700"})
    return layers


def test_a_layer_with_an_override_shows_its_owners_and_modes(override_layers):
    u = override_layers.open_union()
    try:
        st = u.lookup(ROOT_INO, b"f")[1].st
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (10, 20, 0o600)
        st = u.lookup(ROOT_INO, b"d")[1].st
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1, 2, 0o700)
        st = u.lookup(ROOT_INO, b"stranger")[1].st       # no xattr: as it is
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (5000, 0o644)
    finally:
        u.close()


def test_a_malformed_override_fails_stat_with_einval(override_layers):
    os.setxattr(override_layers.lowers[0] / "f", OVERRIDE_CONTAINERS, b"x:1:0644")
    u = override_layers.open_union()
    try:
        with pytest.raises(OSError) as info:
            u.lookup(ROOT_INO, b"f")
        assert info.value.errno == errno.EINVAL
    finally:
        u.close()


def upper_override(path):
    ov = idmap.decode_override(os.getxattr(path, OVERRIDE_CONTAINERS, follow_symlinks=False))
    return stat.S_IMODE(os.lstat(path).st_mode), (ov.uid, ov.gid, ov.perm)


def test_xattr_permissions_keep_owners_and_modes_in_the_upper_xattr(override_layers):
    up = override_layers.upper
    u = override_layers.open_union(id_options=options(xattr_permissions="2"))
    try:
        assert os.getxattr(up, OVERRIDE_CONTAINERS) == b"0:0:0755"   # seeded from the lower
        f = node_at(u, "f")
        fh = u.open(f.ino, os.O_WRONLY | os.O_APPEND)                 # copied up
        u.release(fh)
        assert upper_override(up / "f") == (0o755, (10, 20, 0o600))
        u.setattr(f.ino, mode=0o640)
        u.setattr(f.ino, gid=7)
        assert upper_override(up / "f") == (0o755, (10, 7, 0o640))
        st = u.getattr(f.ino)[1].st
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (10, 7, 0o640)
        u.create(ROOT_INO, b"new", 0o600, os.O_WRONLY, Caller(5, 6, 0o022))
        u.mkdir(ROOT_INO, b"dir", 0o700, Caller(5, 6, 0o022))
        u.symlink(ROOT_INO, b"link", b"new", Caller(5, 6))
    finally:
        u.close()
    assert upper_override(up / "new") == (0o755, (5, 6, 0o600))
    assert upper_override(up / "dir") == (0o755, (5, 6, 0o700))
    assert os.lstat(up / "new").st_uid == 0             # not chowned: the server's
    assert os.lstat(up / "link").st_uid == 5            # no override on symlinks


def test_a_copy_up_without_xattr_permissions_gives_the_shown_owner_for_real(override_layers):
    u = override_layers.open_union()
    try:
        u.setattr(node_at(u, "f").ino, atime_ns=0, mtime_ns=0)
    finally:
        u.close()
    st = os.lstat(override_layers.upper / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (10, 20, 0o600)
    assert OVERRIDE_CONTAINERS.decode() not in os.listxattr(override_layers.upper / "f")


def test_private_xattr_names_are_hidden_and_refused(layers):
    f = layers.lowers[0] / "f"
    os.setxattr(f, "user.fuseoverlayfs.origin", b"x")
    os.setxattr(f, "user.containers.override_stat", b"0:0:04755")
    os.setxattr(f, "user.visible", b"v")
    u = layers.open_union()
    try:
        node = node_at(u, "f")
        assert u.listxattr(node.ino) == [b"user.visible"]
        for name in (b"user.fuseoverlayfs.origin", b"user.containers.override_stat",
                     b"security.fuseoverlayfs.override_stat"):
            with pytest.raises(OSError) as info:
                u.getxattr(node.ino, name)
            assert info.value.errno == errno.ENODATA
            with pytest.raises(OSError) as info:
                u.setxattr(node.ino, name, b"0:0:04755")
            assert info.value.errno == errno.EPERM
        assert os.listdir(layers.upper) == []           # refused: nothing copied up
    finally:
        u.close()


def test_security_xattrs_of_a_containers_override_layer_live_apart(override_layers):
    u = override_layers.open_union(id_options=options(xattr_permissions="2"))
    try:
        node = node_at(u, "f")
        u.setxattr(node.ino, b"security.test", b"label")
        assert u.getxattr(node.ino, b"security.test") == b"label"
        assert b"security.test" in u.listxattr(node.ino)
    finally:
        u.close()
    names = os.listxattr(override_layers.upper / "f")
    assert "user.containers.override_security.test" in names and "security.test" not in names
