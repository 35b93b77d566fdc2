"""Copy-up's fast stack without a mount: the pool of ready inodes, and
reflinks done inline (with the fallback when a clone is refused)."""
import os
import shutil
import subprocess

import pytest

from mountutil import node_at, wait_for
from unionfs.fs import copyplan, copyup

MIB = 1 << 20


def make_layers(stack):
    (stack.lowers[0] / "d").mkdir()
    (stack.lowers[0] / "d" / "f").write_bytes(os.urandom(MIB))
    return stack


def workdir_names(stack):
    return set(os.listdir(stack.work / "work"))


def test_copy_up_takes_its_inodes_from_the_pool(make_stack):
    stack = make_layers(make_stack(1))
    u = stack.open_union()
    try:
        u.stack.temp_pool.refill()
        pooled = {os.lstat(stack.work / "work" / n).st_ino for n in workdir_names(stack)}
        copyplan.copy_inline(u.stack, node_at(u, "d/f"))
        copied = [os.lstat(stack.upper / p).st_ino for p in ("d", "d/f")]
        assert set(copied) <= pooled
    finally:
        u.close()


def test_pooled_copy_has_the_lower_data_and_metadata(make_stack):
    stack = make_layers(make_stack(1))
    os.chmod(stack.lowers[0] / "d", 0o751)
    os.chmod(stack.lowers[0] / "d" / "f", 0o640)
    u = stack.open_union()
    try:
        u.stack.temp_pool.refill()
        copyplan.copy_inline(u.stack, node_at(u, "d/f"))
    finally:
        u.close()
    assert (stack.upper / "d" / "f").read_bytes() == (stack.lowers[0] / "d" / "f").read_bytes()
    assert os.stat(stack.upper / "d").st_mode & 0o7777 == 0o751
    assert os.stat(stack.upper / "d" / "f").st_mode & 0o7777 == 0o640


def test_closing_the_union_removes_the_pool(make_stack):
    stack = make_layers(make_stack(1))
    u = stack.open_union()
    u.stack.temp_pool.refill()
    assert workdir_names(stack)
    u.close()
    assert workdir_names(stack) == set()


def test_a_closed_pool_is_not_refilled(make_stack):
    stack = make_layers(make_stack(1))
    u = stack.open_union()
    pool = u.stack.temp_pool
    u.close()
    assert not pool.wanted()


@pytest.fixture
def tmpfs(tmp_path):
    """A filesystem that cannot reflink, whatever the one under tmp_path can do."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path)], check=True)
    try:
        yield tmp_path
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_refused_clone_leaves_nothing_and_the_job_can_run_again(make_stack, tmpfs):
    # a clone-only job must give up before writing anything
    stack = make_layers(make_stack(1, root=tmpfs))
    u = stack.open_union()
    try:
        node = node_at(u, "d/f")
        copyplan.copy_inline(u.stack, node.parent)
        job = u.copy_job(node)
        job.clone_only = True
        job.devs = ("test", "no-reflink")    # a pair not learnt yet: FICLONE is tried
        before = workdir_names(stack)
        with pytest.raises(copyup.NotCloned, match="refused the clone"):
            copyup.run(job)
        assert workdir_names(stack) <= before
        assert not (stack.upper / "d" / "f").exists()
        job.clone_only = False
        copyup.run(job)
    finally:
        u.close()
    assert (stack.upper / "d" / "f").read_bytes() == (stack.lowers[0] / "d" / "f").read_bytes()


@pytest.fixture
def xfs(tmp_path):
    """A small XFS filesystem with reflink, on a loop device."""
    if not shutil.which("mkfs.xfs"):
        pytest.skip("mkfs.xfs is not installed (scripts/setup.sh installs xfsprogs)")
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as f:
        f.truncate(320 * MIB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_on_a_reflink_filesystem_a_data_copy_up_is_an_inline_clone(make_stack, xfs):
    stack = make_layers(make_stack(1, root=xfs))
    u = stack.open_union()
    try:
        node = node_at(u, "d/f")
        copyplan.copy_inline(u.stack, node.parent)
        job = u.copy_job(node)
        assert job.clone_only      # learnt at open: no worker thread needed
        copyup.run(job)
        u.commit_copy(node, job)
    finally:
        u.close()
    assert (stack.upper / "d" / "f").read_bytes() == (stack.lowers[0] / "d" / "f").read_bytes()
    # a clone shares the lower file's blocks
    out = subprocess.run(["xfs_io", "-c", "fiemap -v", str(stack.upper / "d" / "f")],
                         capture_output=True, text=True, check=True).stdout
    flags = [int(line.split()[-1], 16) for line in out.splitlines()[2:] if line.strip()]
    assert flags and all(f & 0x2000 for f in flags)     # FIEMAP_EXTENT_SHARED


def test_the_first_copy_up_of_a_fresh_mount_finds_ready_inodes_and_threads(make_stack):
    stack = make_layers(make_stack(1))
    with stack.unionfs() as server:
        # made once the mount is live, before any copy-up asks
        wait_for(lambda: len(workdir_names(stack)) >= 6, what="the first ready inodes")
        pooled = {os.lstat(stack.work / "work" / n).st_ino for n in workdir_names(stack)}
        threads = len(os.listdir(f"/proc/{server.pid}/task"))
        with open(stack.mnt / "d" / "f", "ab") as f:
            f.write(b"+")
        copied = {os.lstat(stack.upper / p).st_ino for p in ("d", "d/f")}
    assert copied <= pooled
    assert threads >= 1 + 4         # the loop's and the four copy-up workers


def test_the_pool_grows_only_when_a_copy_up_finds_it_empty(make_stack):
    stack = make_layers(make_stack(1))
    u = stack.open_union()
    pool = u.stack.temp_pool
    try:
        pool.refill()
        pool.take(False)
        pool.take(True)
        pool.refill()       # tops the first few up again, no more
        assert (len(pool.files), len(pool.dirs)) == pool.START
        while pool.take(True) is not None:
            pass
        pool.refill()
        assert (len(pool.files), len(pool.dirs)) == pool.FULL
    finally:
        u.close()
