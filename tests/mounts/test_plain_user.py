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
    (dirs["lower"] / "ro").write_text("read-only")
    (dirs["lower"] / "rodir").mkdir()
    (dirs["lower"] / "rodir" / "child").write_text("c")
    uid = pwd.getpwnam(USER).pw_uid
    for path in [root, *dirs.values()] + [dirs["lower"] / n for n in ("f", "gone", "d")] \
            + [dirs["lower"] / "d" / "inside"] \
            + [dirs["lower"] / n for n in ("ro", "rodir", "rodir/child")]:
        os.chown(path, uid, uid)
    os.chmod(dirs["lower"] / "ro", 0o444)
    os.chmod(dirs["lower"] / "rodir", 0o555)
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
    assert res.stdout.split() == ["lower", ".", "..", "d", "f", "ro", "rodir"]
    # what a plain user can write: the OCI markers
    assert {".wh.gone", "d", "f"} <= set(os.listdir(d["upper"]))
    assert os.listdir(d["upper"] / "d") == [".wh..wh..opq"]
    assert (d["upper"] / "f").read_text() == "lower\nmore\n"
    unmount_as_user(d)


def mount_as_user(d):
    opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}"
    res = as_user(installed("fuse-unionfs"), "-o", opts, str(d["mnt"]))
    assert res.returncode == 0, res.stderr


def unmount_as_user(d):
    res = as_user("fusermount3", "-u", str(d["mnt"]))
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not is_mountpoint(str(d["mnt"])), what="unmount")
    # the server empties its workdir (its ready inodes) on the way out
    wait_for(lambda: not os.listdir(d["work"] / "work"), what="the server's exit")


@pytest.mark.parametrize("name, change, mode", [
    ("ro", "chmod 640", 0o640),          # a 0444 file: chmod
    ("ro", "touch -d @1000000000", 0o444),   # and utimes
    ("rodir", "chmod 750", 0o750),       # a 0555 directory
    ("rodir", "touch -d @1000000000", 0o555),
])
def test_the_owner_changes_a_read_only_lower_object(user_stack, name, change, mode):
    """Without CAP_DAC_OVERRIDE the copy cannot be written once it has its
    read-only mode: it is built writable and given that mode last."""
    d = user_stack
    mount_as_user(d)
    try:
        res = as_user("sh", "-c", f"cd {d['mnt']} && {change} {name} && stat -c %a {name}")
        assert (res.returncode, res.stdout.strip()) == (0, f"{mode:o}"), res.stderr
    finally:
        unmount_as_user(d)
    st = os.lstat(d["upper"] / name)
    assert st.st_mode & 0o7777 == mode
    if "touch" in change:
        assert st.st_mtime == 1000000000
    assert (d["lower"] / name).stat().st_mode & 0o7777 == (0o444 if name == "ro" else 0o555)


def test_the_owner_writes_a_file_in_a_read_only_lower_directory(user_stack):
    d = user_stack
    mount_as_user(d)
    try:
        res = as_user("sh", "-c", f"cd {d['mnt']} && echo more >> rodir/child && "
                      "cat rodir/child && stat -c %a rodir")
        assert (res.returncode, res.stdout.split()) == (0, ["cmore", "555"]), res.stderr
    finally:
        unmount_as_user(d)
    assert (d["upper"] / "rodir" / "child").read_text() == "cmore\n"
    assert d["upper"].joinpath("rodir").stat().st_mode & 0o7777 == 0o555
