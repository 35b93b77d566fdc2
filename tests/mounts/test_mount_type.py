"""The type a mount shows: fuse.fuse-unionfs through fuse-unionfs (so
`findmnt -t` and `umount -t` find it, as fuse.fuse-overlayfs for
fuse-overlayfs), fuse.unionfs through `unionfs mount`."""
import os
import subprocess

from mountutil import FUSE_UNIONFS, unionfs_mount
from unionfs.sys import mountinfo


def _dirs(tmp_path):
    paths = [str(tmp_path / d) for d in ("l", "u", "w", "m")]
    for p in paths:
        os.mkdir(p)
    return paths


def test_fuse_unionfs_mounts_are_of_type_fuse_fuse_unionfs(tmp_path):
    low, up, work, mnt = _dirs(tmp_path)
    subprocess.run([FUSE_UNIONFS, "-o", f"lowerdir={low},upperdir={up},workdir={work}", mnt],
                   check=True)
    try:
        (entry,) = mountinfo.mounts_at(mnt)
        found = subprocess.run(["findmnt", "-n", "-o", "TARGET", "-t", "fuse.fuse-unionfs", mnt],
                               capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run(["umount", "-t", "fuse.fuse-unionfs", mnt], check=False)
    assert (entry.fstype, entry.source) == ("fuse.fuse-unionfs", "fuse-unionfs")
    assert {"nodev", "noatime"} <= set(entry.mount_options)
    assert found == mnt
    assert not mountinfo.mounts_at(mnt), "umount -t fuse.fuse-unionfs missed it"


def test_unionfs_mount_mounts_are_of_type_fuse_unionfs(tmp_path):
    low, up, work, mnt = _dirs(tmp_path)
    with unionfs_mount(mnt, [low], up, work):
        (entry,) = mountinfo.mounts_at(mnt)
    assert entry.fstype == "fuse.unionfs"
