"""docs/semantics.md's "known traps" (places where other union filesystems go wrong),
one test each, plus hostile layers and inode numbers. All on real mounts."""
import os
import pathlib
import stat
import subprocess
import tempfile

import pytest

from mountutil import kernel_mount, unionfs_mount, wait_for


def test_nlink_of_lower_hard_links(stack):
    (stack.lowers[1] / "a").write_text("x")
    os.link(stack.lowers[1] / "a", stack.lowers[1] / "b")
    with stack.unionfs():
        a, b = os.stat(stack.mnt / "a"), os.stat(stack.mnt / "b")
        assert (a.st_nlink, b.st_nlink) == (2, 2)


def hard_link_copy_up(mnt):
    """Inode numbers of two names of a lower hard link, before and after one
    name is copied up, and what each name reads."""
    before = os.stat(mnt / "a").st_ino == os.stat(mnt / "b").st_ino
    with open(mnt / "a", "a") as f:
        f.write("+new")
    after_a, after_b = os.stat(mnt / "a").st_ino, os.stat(mnt / "b").st_ino
    return before, after_a == after_b, (mnt / "a").read_text(), (mnt / "b").read_text()


def test_copy_up_breaks_lower_hard_links_consistently_like_the_kernel(make_stack):
    """Without an index the kernel copies up one name alone: the names share an
    inode number before, the copied one has a number of its own after (and
    keeps it across a remount). The kernel is the oracle."""
    results = {}
    for kind in ("kernel", "unionfs"):
        stack = make_stack(tag=kind)
        (stack.lowers[1] / "a").write_text("old")
        os.link(stack.lowers[1] / "a", stack.lowers[1] / "b")
        with getattr(stack, kind)():
            results[kind] = hard_link_copy_up(stack.mnt)
            ino_a = os.stat(stack.mnt / "a").st_ino
        with getattr(stack, kind)():
            assert os.stat(stack.mnt / "a").st_ino == ino_a
            assert (stack.mnt / "b").read_text() == "old"
    assert results["unionfs"] == results["kernel"] == (True, False, "old+new", "old")


def test_link_of_a_lower_file_shares_data_inode_and_nlink(stack):
    (stack.lowers[0] / "a").write_text("old")
    with stack.unionfs():
        os.link(stack.mnt / "a", stack.mnt / "b")
        (stack.mnt / "b").write_text("new")
        a, b = os.stat(stack.mnt / "a"), os.stat(stack.mnt / "b")
        assert (stack.mnt / "a").read_text() == "new"
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    assert os.stat(stack.upper / "a").st_ino == os.stat(stack.upper / "b").st_ino


def test_hard_links_survive_a_remount(stack):
    (stack.lowers[0] / "a").write_text("old")
    with stack.unionfs():
        os.link(stack.mnt / "a", stack.mnt / "b")
        ino = os.stat(stack.mnt / "a").st_ino
    with stack.unionfs():
        assert os.stat(stack.mnt / "a").st_ino == os.stat(stack.mnt / "b").st_ino == ino


def test_fifo_copies_up_as_a_fifo(stack):
    os.mkfifo(stack.lowers[0] / "p")
    with stack.unionfs():
        os.chmod(stack.mnt / "p", 0o600)
        assert stat.S_ISFIFO(os.lstat(stack.mnt / "p").st_mode)
    assert stat.S_ISFIFO(os.lstat(stack.upper / "p").st_mode)


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6755, 0o1777])
def test_special_mode_bits_survive_copy_up(stack, mode):
    f = stack.lowers[0] / "f"
    f.write_text("x")
    os.chown(f, 1000, 1000)
    os.chmod(f, mode)
    with stack.unionfs():
        os.utime(stack.mnt / "f", (1, 2))
        st = os.stat(stack.mnt / "f")
    assert stat.S_IMODE(st.st_mode) == mode and (st.st_uid, st.st_gid) == (1000, 1000)
    assert stat.S_IMODE(os.stat(stack.upper / "f").st_mode) == mode


def test_new_entries_inherit_the_setgid_directory_group(stack):
    d = stack.lowers[0] / "shared"
    d.mkdir()
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2777)
    with stack.unionfs():
        (stack.mnt / "shared" / "file").write_text("x")
        os.mkdir(stack.mnt / "shared" / "sub")
        assert os.stat(stack.mnt / "shared" / "file").st_gid == 4321
        sub = os.stat(stack.mnt / "shared" / "sub")
        assert sub.st_gid == 4321 and sub.st_mode & stat.S_ISGID


def test_symlink_owner_survives_copy_up(stack):
    os.symlink("target", stack.lowers[0] / "l")
    os.chown(stack.lowers[0] / "l", 1000, 1001, follow_symlinks=False)
    with stack.unionfs():
        os.rename(stack.mnt / "l", stack.mnt / "l2")      # copies the symlink up
        st = os.lstat(stack.mnt / "l2")
        assert (st.st_uid, st.st_gid) == (1000, 1001)
        assert os.readlink(stack.mnt / "l2") == "target"


def test_fstat_of_an_unlinked_open_file_shows_nlink_0(stack):
    (stack.lowers[0] / "f").write_text("x")
    (stack.upper / "g").write_text("y")
    with stack.unionfs():
        for name in ("f", "g"):
            with open(stack.mnt / name) as fobj:
                os.unlink(stack.mnt / name)
                assert os.fstat(fobj.fileno()).st_nlink == 0
                assert fobj.read() in ("x", "y")


def test_truncate_to_the_same_size_updates_mtime(stack):
    f = stack.lowers[0] / "f"
    f.write_text("12345")
    os.utime(f, (1000, 1000))
    with stack.unionfs():
        os.truncate(stack.mnt / "f", 5)
        assert os.stat(stack.mnt / "f").st_mtime > 1000


def test_failed_removexattr_copies_nothing_up(stack):
    (stack.lowers[0] / "f").write_text("x")
    with stack.unionfs():
        with pytest.raises(OSError, match="No data available"):
            os.removexattr(stack.mnt / "f", "user.nothere")
    assert os.listdir(stack.upper) == []


def test_kernel_shows_no_extra_marker_files_in_our_upper(stack):
    low = stack.lowers[0]
    (low / "d").mkdir()
    (low / "d" / "f").write_text("x")
    (low / "g").write_text("x")
    with stack.unionfs():
        os.unlink(stack.mnt / "d" / "f")
        os.rmdir(stack.mnt / "d")
        os.mkdir(stack.mnt / "d")
        (stack.mnt / "d" / "new").write_text("n")
        os.unlink(stack.mnt / "g")
        ours = sorted(os.listdir(stack.mnt)), sorted(os.listdir(stack.mnt / "d"))
    with kernel_mount(stack.mnt, stack.lowers, stack.upper, stack.work):
        kernels = sorted(os.listdir(stack.mnt)), sorted(os.listdir(stack.mnt / "d"))
    assert ours == kernels == (["d"], ["new"])


def test_read_fd_opened_before_copy_up_sees_new_data(stack):
    (stack.lowers[0] / "f").write_text("old data")
    with stack.unionfs():
        reader = open(stack.mnt / "f", "rb")
        try:
            assert reader.read() == b"old data"
            with open(stack.mnt / "f", "r+b") as writer:
                writer.write(b"NEW")
            reader.seek(0)
            assert reader.read() == b"NEW data"
        finally:
            reader.close()


def test_rename_flags_are_honoured_not_einval(stack):
    import ctypes
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    (stack.lowers[0] / "a").write_text("a")
    (stack.lowers[0] / "b").write_text("b")
    with stack.unionfs():
        a, b = os.fsencode(stack.mnt / "a"), os.fsencode(stack.mnt / "b")
        assert libc.renameat2(-100, a, -100, b, 1) == -1 and ctypes.get_errno() == 17
        assert libc.renameat2(-100, a, -100, b, 2) == 0
        assert (stack.mnt / "a").read_text() == "b" and (stack.mnt / "b").read_text() == "a"


@pytest.fixture
def two_tmpfs_lowers(stack):
    """Two lower layers on separate tmpfs mounts: their inode numbers coincide."""
    for low in stack.lowers:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(low)], check=True)
    try:
        yield stack
    finally:
        for low in stack.lowers:
            subprocess.run(["umount", "-l", str(low)])


def test_inode_numbers_are_not_confused_across_lower_filesystems(two_tmpfs_lowers):
    stack = two_tmpfs_lowers
    (stack.lowers[0] / "libfoo.so").write_text("top library")
    (stack.lowers[1] / "libbar.so").write_text("bottom library")
    raw = [os.stat(stack.lowers[0] / "libfoo.so").st_ino,
           os.stat(stack.lowers[1] / "libbar.so").st_ino]
    assert raw[0] == raw[1], "precondition: tmpfs reuses inode numbers"
    with stack.unionfs():
        foo, bar = os.stat(stack.mnt / "libfoo.so"), os.stat(stack.mnt / "libbar.so")
        assert foo.st_ino != bar.st_ino
        assert (stack.mnt / "libbar.so").read_text() == "bottom library"


def test_inode_numbers_stable_across_copy_up_and_remount(stack):
    (stack.lowers[1] / "f").write_text("x")
    (stack.lowers[1] / "d").mkdir()
    with stack.unionfs():
        before = {n: os.stat(stack.mnt / n).st_ino for n in ("f", "d")}
        with open(stack.mnt / "f", "a") as f:
            f.write("y")
        (stack.mnt / "d" / "new").write_text("z")
        after = {n: os.stat(stack.mnt / n).st_ino for n in ("f", "d")}
    with stack.unionfs():
        remounted = {n: os.stat(stack.mnt / n).st_ino for n in ("f", "d")}
    assert before == after == remounted


def test_readdir_d_ino_equals_st_ino(stack):
    (stack.lowers[1] / "f").write_text("x")
    (stack.lowers[0] / "d").mkdir()
    (stack.upper / "u").write_text("x")
    with stack.unionfs():
        with os.scandir(stack.mnt) as it:
            for entry in it:
                assert entry.inode() == os.lstat(entry.path).st_ino, entry.name


def test_st_dev_is_the_unions_for_every_object(stack):
    (stack.lowers[1] / "f").write_text("x")
    (stack.upper / "u").write_text("x")
    with stack.unionfs():
        devs = {os.lstat(stack.mnt / n).st_dev for n in ("f", "u", ".")}
        assert len(devs) == 1 and devs != {os.stat(stack.upper).st_dev}


# ---- unprivileged callers -----------------------------------------------------

def as_user(uid, fn):
    """Run fn() in a child with the given uid; return its errno (0 on success)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_truncating_open_by_a_user_clears_set_id_bits(stack):
    f = stack.lowers[0] / "f"
    f.write_text("x")
    os.chown(f, 1000, 1000)
    os.chmod(f, 0o6755)
    stack.mnt = pathlib.Path(tempfile.mkdtemp(prefix="unionfs-user-"))
    os.chmod(stack.mnt, 0o755)
    try:
        with stack.unionfs():
            code = as_user(1000, lambda: os.close(os.open(stack.mnt / "f",
                                                          os.O_WRONLY | os.O_TRUNC)))
            mode = stat.S_IMODE(os.stat(stack.mnt / "f").st_mode)
    finally:
        os.rmdir(stack.mnt)
    assert code == 0 and mode == 0o755


@pytest.mark.parametrize("op", ["write-open", "truncate", "utimes", "read"])
def test_unprivileged_user_cannot_modify_root_owned_lower_file(stack, op):
    f = stack.lowers[0] / "f"
    f.write_text("root's")
    os.chmod(f, 0o644)
    # the mountpoint must be reachable by the user (pytest's tmp dirs are 0700)
    stack.mnt = pathlib.Path(tempfile.mkdtemp(prefix="unionfs-user-"))
    os.chmod(stack.mnt, 0o755)
    target = str(stack.mnt / "f")
    ops = {
        "write-open": lambda: os.close(os.open(target, os.O_WRONLY)),
        "truncate": lambda: os.truncate(target, 0),
        "utimes": lambda: os.utime(target, None),
        "read": lambda: open(target).read(),
    }
    try:
        with stack.unionfs():
            code = as_user(1000, ops[op])
    finally:
        os.rmdir(stack.mnt)
    expected = {"read": 0, "write-open": 13, "truncate": 13, "utimes": 13}  # 13: EACCES
    assert code == expected[op]
    assert os.listdir(stack.upper) == []


# ---- hostile layers -------------------------------------------------------------

@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim"
    v.mkdir()
    (v / "secret").write_text("host file")
    return v


def test_symlink_below_a_directory_does_not_leak_host_files(stack, victim):
    top, bottom = stack.lowers
    (top / "a").mkdir()
    os.symlink(str(victim), bottom / "a")      # hidden below a real directory
    with stack.unionfs():
        assert os.listdir(stack.mnt / "a") == []
        (stack.mnt / "a" / "new").write_text("x")
        with pytest.raises(FileNotFoundError, match="No such file or directory"):
            open(stack.mnt / "a" / "secret")
    assert sorted(os.listdir(victim)) == ["secret"]


def test_symlinked_parent_inside_a_lower_layer_is_not_followed(stack, victim):
    top, bottom = stack.lowers
    (top / "p" / "q").mkdir(parents=True)
    (bottom / "p").mkdir()
    os.symlink(str(victim), bottom / "p" / "q")
    os.symlink("../../../victim", bottom / "p" / "up")
    with stack.unionfs():
        assert os.listdir(stack.mnt / "p" / "q") == []
        assert os.readlink(stack.mnt / "p" / "up") == "../../../victim"
        os.chmod(stack.mnt / "p" / "q", 0o700)
        (stack.mnt / "p" / "q" / "secret").write_text("in the union")
    assert (victim / "secret").read_text() == "host file"
    assert (stack.upper / "p" / "q" / "secret").read_text() == "in the union"


def test_union_rooted_resolution_cannot_climb_out(stack, victim):
    os.symlink("/etc", stack.lowers[0] / "etc")
    os.symlink("../../../..", stack.lowers[0] / "x")
    with stack.unionfs():
        pid = os.fork()
        if pid == 0:      # what a container sees: the union as its root
            try:
                os.chroot(stack.mnt)
                os.chdir("/")
                for path in ("/etc/passwd", "/x/etc/passwd", "/x/victim/secret"):
                    try:
                        open(path).read()
                        os._exit(1)
                    except OSError:
                        pass
                try:
                    open("/x/new", "w").write("x")
                except OSError:
                    os._exit(2)
                os._exit(0)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert (stack.upper / "new").read_text() == "x"


def test_read_only_union_gives_erofs(tmp_path):
    low = tmp_path / "low"
    low.mkdir()
    (low / "f").write_text("x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with unionfs_mount(mnt, [low]):
        assert (mnt / "f").read_text() == "x"
        for op in (lambda: open(mnt / "f", "a"), lambda: os.mkdir(mnt / "d"),
                   lambda: os.unlink(mnt / "f"), lambda: os.chmod(mnt / "f", 0)):
            with pytest.raises(OSError, match="Read-only file system"):
                op()


# ---- bounded memory ---------------------------------------------------------------

def server_stats(mnt):
    import json
    return json.loads(os.getxattr(mnt, "user.unionfs.stats"))


def test_forget_keeps_the_node_table_bounded(stack):
    nfiles = 20000
    for i in range(nfiles // 100):
        d = stack.lowers[1] / f"d{i}"
        d.mkdir()
        for j in range(100):
            # not empty: readdir lists empty files of unmarked directories
            # without a node (fs.files.readdir), and this counts nodes
            (d / f"f{j}").write_bytes(b"x")
    with stack.unionfs():
        count = sum(len(files) for _, _, files in os.walk(stack.mnt))
        assert count == nfiles
        assert server_stats(stack.mnt)["nodes"] > nfiles // 2   # the kernel holds them
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")                                      # the kernel forgets them
        wait_for(lambda: server_stats(stack.mnt)["nodes"] < 1000, timeout=20,
                 what="the server to honour FORGET")
        assert server_stats(stack.mnt)["dirfds"] <= 4096


def test_programs_in_a_lower_layer_can_be_executed(stack):
    """exec's open carries the kernel's __FMODE_EXEC bit, which openat2 refuses."""
    import shutil
    shutil.copy2("/bin/true", stack.lowers[1] / "prog")
    os.symlink("prog", stack.lowers[0] / "link")
    with stack.unionfs():
        for name in ("prog", "link"):
            assert subprocess.run([str(stack.mnt / name)]).returncode == 0
        os.chmod(stack.mnt / "prog", 0o755)          # and once copied up
        assert subprocess.run([str(stack.mnt / "prog")]).returncode == 0
