"""`unionfs umount`: only unionfs mounts, bind mounts of one handled, one line."""
import os
import subprocess

from mountutil import UNIONFS, wait_for


def umount(path):
    return subprocess.run([UNIONFS, "umount", str(path)], capture_output=True, text=True,
                          timeout=30)


def test_a_mount_that_is_not_a_union_is_refused(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        res = umount(target)
        assert res.returncode == 1
        assert res.stderr.strip() == f"unionfs: {target} is not a unionfs mount (it is tmpfs)"
        assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)])


def test_a_directory_that_is_not_mounted_is_one_line(tmp_path):
    res = umount(tmp_path)
    assert res.returncode == 1 and res.stderr.strip() == f"unionfs: {tmp_path} is not mounted"


def test_a_bind_mount_of_a_union_is_unmounted_alone(stack, tmp_path):
    (stack.lowers[0] / "d").mkdir()
    (stack.lowers[0] / "d" / "f").write_text("x")
    bind, sub = tmp_path / "bind", tmp_path / "sub"
    bind.mkdir()
    sub.mkdir()
    with stack.unionfs() as server:
        subprocess.run(["mount", "--bind", str(stack.mnt), str(bind)], check=True)
        subprocess.run(["mount", "--bind", str(stack.mnt / "d"), str(sub)], check=True)
        for target in (bind, sub):
            res = umount(target)
            assert res.returncode == 0, res.stderr
            assert not os.path.ismount(target)
        assert (stack.mnt / "d" / "f").read_text() == "x"       # the union goes on
        assert server.poll() is None
        res = umount(stack.mnt)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: server.poll() is not None, what="server exit")
