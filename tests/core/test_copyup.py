"""Copy-up's fast paths without a mount: the pool of ready inodes, and
reflinks done inline (with the fallback when a clone is refused)."""
import os
import shutil
import subprocess

import pytest

from unionfs.fs import copyplan, copyup
from unionfs.fs.inodes import ROOT_INO
from unionfs.fs.union import Union

MIB = 1 << 20


def make_stack(root):
    paths = {n: root / n for n in ("lower", "upper", "work")}
    for p in paths.values():
        p.mkdir()
    (paths["lower"] / "d").mkdir()
    (paths["lower"] / "d" / "f").write_bytes(os.urandom(MIB))
    return paths


def open_union(paths):
    return Union([str(paths["lower"])], str(paths["upper"]), str(paths["work"]))


def node_of(u, path):
    ino = ROOT_INO
    for part in path.split("/"):
        node, _ = u.lookup(ino, part.encode())
        ino = node.ino
    return node


def workdir_names(paths):
    return set(os.listdir(paths["work"] / "work"))


def test_copy_up_takes_its_inodes_from_the_pool(tmp_path):
    paths = make_stack(tmp_path)
    u = open_union(paths)
    try:
        u.stack.temp_pool.refill()
        pooled = {os.lstat(paths["work"] / "work" / n).st_ino for n in workdir_names(paths)}
        copyplan.copy_inline(u.stack, node_of(u, "d/f"))
        copied = [os.lstat(paths["upper"] / p).st_ino for p in ("d", "d/f")]
        assert set(copied) <= pooled
    finally:
        u.close()


def test_pooled_copy_has_the_lower_data_and_metadata(tmp_path):
    paths = make_stack(tmp_path)
    os.chmod(paths["lower"] / "d", 0o751)
    os.chmod(paths["lower"] / "d" / "f", 0o640)
    u = open_union(paths)
    try:
        u.stack.temp_pool.refill()
        copyplan.copy_inline(u.stack, node_of(u, "d/f"))
    finally:
        u.close()
    assert (paths["upper"] / "d" / "f").read_bytes() == (paths["lower"] / "d" / "f").read_bytes()
    assert os.stat(paths["upper"] / "d").st_mode & 0o7777 == 0o751
    assert os.stat(paths["upper"] / "d" / "f").st_mode & 0o7777 == 0o640


def test_closing_the_union_removes_the_pool(tmp_path):
    paths = make_stack(tmp_path)
    u = open_union(paths)
    u.stack.temp_pool.refill()
    assert workdir_names(paths)
    u.close()
    assert workdir_names(paths) == set()


def test_a_closed_pool_is_not_refilled(tmp_path):
    paths = make_stack(tmp_path)
    u = open_union(paths)
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


def test_refused_clone_leaves_nothing_and_the_job_can_run_again(tmpfs):
    # a clone-only job must give up before writing anything
    paths = make_stack(tmpfs)
    u = open_union(paths)
    try:
        node = node_of(u, "d/f")
        copyplan.copy_inline(u.stack, node.parent)
        job = u.copy_job(node)
        job.clone_only = True
        job.devs = ("test", "no-reflink")    # a pair not learnt yet: FICLONE is tried
        before = workdir_names(paths)
        with pytest.raises(copyup.NotCloned):
            copyup.run(job)
        assert workdir_names(paths) <= before
        assert not (paths["upper"] / "d" / "f").exists()
        job.clone_only = False
        copyup.run(job)
    finally:
        u.close()
    assert (paths["upper"] / "d" / "f").read_bytes() == (paths["lower"] / "d" / "f").read_bytes()


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


def test_on_a_reflink_filesystem_a_data_copy_up_is_an_inline_clone(xfs):
    paths = make_stack(xfs)
    u = open_union(paths)
    try:
        node = node_of(u, "d/f")
        copyplan.copy_inline(u.stack, node.parent)
        job = u.copy_job(node)
        assert job.clone_only      # learnt at open: no worker thread needed
        copyup.run(job)
        u.commit_copy(node, job)
    finally:
        u.close()
    assert (paths["upper"] / "d" / "f").read_bytes() == (paths["lower"] / "d" / "f").read_bytes()
    # a clone shares the lower file's blocks
    out = subprocess.run(["xfs_io", "-c", "fiemap -v", str(paths["upper"] / "d" / "f")],
                         capture_output=True, text=True, check=True).stdout
    flags = [int(line.split()[-1], 16) for line in out.splitlines()[2:] if line.strip()]
    assert flags and all(f & 0x2000 for f in flags)     # FIEMAP_EXTENT_SHARED
