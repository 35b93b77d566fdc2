"""unionfs as installed, used by a plain user (not root, no user namespace):
the programs run for everyone, and a mount works through fusermount3."""
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile

import pytest

from mountutil import VENV_BIN, wait_for
from unionfs.sys.mountinfo import is_mountpoint

USER = "nobody"


def as_user(*argv, timeout=30):
    return subprocess.run(["runuser", "-u", USER, "--", *argv], capture_output=True,
                          text=True, timeout=timeout)


def installed(program):
    """The program of the install under test (beside this interpreter: the
    venv scripts/setup.sh makes for every user)."""
    return os.path.join(VENV_BIN, program)


@pytest.mark.parametrize("program", ["fuse-unionfs", "unionfs"])
def test_a_plain_user_can_run_the_installed_programs(program):
    res = as_user(installed(program), "--version")
    assert res.returncode == 0, res.stderr
    assert "version" in res.stdout


@pytest.fixture
def user_stack():
    # pytest's tmp_path lies under a 0700 directory the user cannot enter
    root = pathlib.Path(tempfile.mkdtemp(prefix="unionfs-plain-"))
    dirs = {n: root / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "f").write_text("lower\n")
    (dirs["lower"] / "gone").write_text("x")
    (dirs["lower"] / "d").mkdir()
    (dirs["lower"] / "d" / "inside").write_text("i")
    uid = pwd.getpwnam(USER).pw_uid
    for path in [root, *dirs.values()] + [dirs["lower"] / n for n in ("f", "gone", "d")] \
            + [dirs["lower"] / "d" / "inside"]:
        os.chown(path, uid, uid)
    yield dirs
    if is_mountpoint(str(dirs["mnt"])):
        subprocess.run(["umount", "-l", str(dirs["mnt"])])
    shutil.rmtree(root)


def test_a_plain_user_mounts_writes_and_unmounts(user_stack):
    d = user_stack
    opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}"
    res = as_user(installed("fuse-unionfs"), "-o", opts, str(d["mnt"]))
    assert res.returncode == 0, res.stderr
    assert is_mountpoint(str(d["mnt"]))     # root itself may not look into it
    script = ("set -e; cat f; echo more >> f; rm gone; rm -r d; mkdir d; ls -a d; ls")
    res = as_user("sh", "-c", f"cd {d['mnt']} && {script}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["lower", ".", "..", "d", "f"]
    # what a plain user can write: the OCI markers
    assert {".wh.gone", "d", "f"} <= set(os.listdir(d["upper"]))
    assert os.listdir(d["upper"] / "d") == [".wh..wh..opq"]
    assert (d["upper"] / "f").read_text() == "lower\nmore\n"
    res = as_user("fusermount3", "-u", str(d["mnt"]))
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not is_mountpoint(str(d["mnt"])), what="unmount")
