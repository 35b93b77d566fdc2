"""unionfs.sys.mountinfo on real mounts whose paths need the kernel's escapes."""
import os
import subprocess

import pytest

from unionfs.serve.validate import overlay_workdirs
from unionfs.sys import mountinfo

AWKWARD = ["with space", "with\ttab", "with\nnewline", "back\\slash", "all \t\n\\ four",
           "\\040 literally"]


@pytest.fixture
def mounted(tmp_path):
    """mount(target) mounts a tmpfs there; all are unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = []

    def mount(target, *options):
        os.makedirs(target, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs-test", target], check=True)
        done.append(target)
        return target
    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", target], check=False)


@pytest.mark.parametrize("name", AWKWARD)
def test_an_awkward_mount_point_reads_back_as_it_was_made(tmp_path, mounted, name):
    target = mounted(str(tmp_path / name), "-o", "size=1m,mode=0711")
    found = mountinfo.mounts_at(target)
    assert len(found) == 1
    entry = found[0]
    assert (entry.mount_point, entry.fstype, entry.source) == (target, "tmpfs", "tmpfs-test")
    assert "rw" in entry.mount_options
    assert "mode=711" in entry.super_options
    assert entry.device == (os.major(os.stat(target).st_dev), os.minor(os.stat(target).st_dev))
    assert mountinfo.is_mountpoint(target)
    assert not mountinfo.is_mountpoint(os.path.dirname(target))


def test_a_path_that_only_looks_escaped_is_not_confused_with_one_that_is(tmp_path, mounted):
    real = mounted(str(tmp_path / "a b"))
    assert mountinfo.is_mountpoint(real)
    assert not mountinfo.is_mountpoint(str(tmp_path / "a\\040b"))


def test_stacked_mounts_are_all_listed_bottom_first(tmp_path, mounted):
    target = str(tmp_path / "stack here")
    mounted(target, "-o", "size=1m")
    mounted(target, "-o", "size=2m")
    sizes = [m.option("size") for m in mountinfo.mounts_at(target)]
    assert sizes == ["1024k", "2048k"]


def test_a_dead_fuse_mount_is_still_listed(tmp_path):
    # The server is killed: stat() on the mount point fails, the table still has it.
    if os.geteuid() != 0:
        pytest.skip("needs root")
    import signal
    import sys
    lower, mnt = tmp_path / "lower", tmp_path / "dead mnt"
    lower.mkdir()
    mnt.mkdir()
    unionfs = os.path.join(os.path.dirname(sys.executable), "unionfs")
    server = subprocess.Popen([unionfs, "mount", "-f", "--lower", str(lower), str(mnt)])
    try:
        while not mountinfo.is_mountpoint(str(mnt)):
            assert server.poll() is None, "the server exited"
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        with pytest.raises(OSError, match="not connected"):
            os.stat(mnt)
        assert mountinfo.is_mountpoint(str(mnt))
        assert mountinfo.mounts_at(str(mnt))[0].fstype == "fuse.unionfs"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        server.kill()
        server.wait()


def test_an_overlay_workdir_with_a_space_and_a_tab_is_found(tmp_path):
    # (An escaped comma inside an option is checked on a kernel-written line below:
    # mount(8) cannot pass one to overlayfs.)
    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    base = tmp_path / "over lay\tdir"
    dirs = {n: base / n for n in ("lower", "upper", "work dir", "mnt")}
    for d in dirs.values():
        d.mkdir(parents=True)
    options = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work dir']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["mnt"])],
                   check=True)
    try:
        assert str(dirs["work dir"]) in overlay_workdirs()
        entry = mountinfo.mounts_at(str(dirs["mnt"]))[0]
        assert entry.fstype == "overlay"
        assert entry.option("upperdir") == str(dirs["upper"])
    finally:
        subprocess.run(["umount", str(dirs["mnt"])], check=False)


# Pure: lines as the kernel writes them.

def test_a_line_is_split_before_it_is_unescaped():
    line = (b"36 25 0:32 / /mnt/a\\040b\\012c rw,nosuid shared:7 master:1 - tmpfs "
            b"my\\040src rw,size=1024k,mode=755\n")
    entry = mountinfo.parse_line(line)
    assert (entry.mount_id, entry.parent_id, entry.device) == (36, 25, (0, 32))
    assert entry.mount_point == "/mnt/a b\nc"
    assert entry.mount_options == ("rw", "nosuid")
    assert entry.optional == ("shared:7", "master:1")
    assert (entry.fstype, entry.source) == ("tmpfs", "my src")
    assert entry.super_options == ("rw", "size=1024k", "mode=755")


def test_an_escaped_comma_stays_inside_its_option():
    entry = mountinfo.parse_line(b"1 0 0:1 / /m rw - overlay overlay "
                                 b"rw,workdir=/w\\054x,upperdir=/u\n")
    assert entry.option("workdir") == "/w,x"
    assert entry.option("upperdir") == "/u"
    assert entry.option("lowerdir") is None


def test_bytes_that_are_not_utf8_come_back_as_os_gives_them():
    entry = mountinfo.parse_line(b"1 0 0:1 / /m\xff\\134 rw - tmpfs none rw\n")
    assert entry.mount_point == os.fsdecode(b"/m\xff\\")


def test_a_truncated_line_is_a_value_error():
    with pytest.raises(ValueError, match="not a mountinfo line"):
        mountinfo.parse_line(b"36 25 0:32 / /mnt rw\n")
