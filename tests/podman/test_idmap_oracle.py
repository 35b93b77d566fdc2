"""fuse-overlayfs's id and permission options on a real mount, side by side:
fuse-overlayfs must agree with the pure rules of unionfs.fs.idmap (so the rules
are fuse-overlayfs's), and fuse-unionfs must agree with both.

Run as root, mounting each program directly (no podman).
"""
import contextlib
import errno
import os
import pathlib
import shutil
import subprocess
import tempfile

import podman_env
import pytest
from podman_env import PROGRAMS

from unionfs.fs import idmap

pytestmark = pytest.mark.parametrize("program", PROGRAMS)

STORED_IDS = (0, 1, 5, 9, 10, 1000, 1001, 1002, 65534, 200000)


@contextlib.contextmanager
def mounted(program, lower, upper, work, mnt, options=""):
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + (f",{options}" if options
                                                                   else "")
    proc = subprocess.run([podman_env.program_path(program), "-o", opts, str(mnt)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    try:
        yield
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def stack():
    """lower/upper/work/mnt in a directory every uid can traverse."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="unionfs-idmap-", dir="/tmp"))
    base.chmod(0o755)
    dirs = {n: base / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    for i in STORED_IDS:
        f = dirs["lower"] / f"f{i}"
        f.write_text("x")
        os.chown(f, i, i)
    yield dirs
    if os.path.ismount(dirs["mnt"]):
        subprocess.run(["umount", "-l", str(dirs["mnt"])], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


SHOWN_CASES = [
    "uidmapping=0:100:10:1000:0:2,gidmapping=0:100:10",
    "uidmapping=:0:100:10",
    "uidmapping=0:100:10:5:300:1",              # overlapping: the last range wins
    "uidmapping=5:300:1:0:100:10",
    "uidmapping=0:100:0",                       # a count of 0 matches nothing
    "squash_to_root",
    "squash_to_uid=7,squash_to_root",
    "squash_to_gid=7,uidmapping=0:100:10",
]


def rules_for(options: str) -> idmap.IdOptions:
    values = {}
    for item in options.split(","):
        key, eq, value = item.partition("=")
        values[key] = value if eq else None
    return idmap.from_options(values)


@pytest.mark.parametrize("options", SHOWN_CASES)
def test_shown_owners(program, stack, options):
    rules = rules_for(options)
    with mounted(program, stack["lower"], stack["upper"], stack["work"], stack["mnt"], options):
        shown = {i: tuple(getattr(os.lstat(stack["mnt"] / f"f{i}"), a)
                          for a in ("st_uid", "st_gid")) for i in STORED_IDS}
    assert shown == {i: rules.shown_owner(i, i) for i in STORED_IDS}


WRITE_OPTIONS = "uidmapping=0:100:10,gidmapping=0:100:10"


def test_stored_owners_of_creates_and_chowns(program, stack):
    rules, mnt = rules_for(WRITE_OPTIONS), stack["mnt"]
    with mounted(program, stack["lower"], stack["upper"], stack["work"], mnt, WRITE_OPTIONS):
        (mnt / "by-root").write_text("r")            # root is outside the mapping
        (mnt / "chowned").write_text("c")
        os.chown(mnt / "chowned", 103, 104)
        os.chown(mnt / "f0", 50, -1)                 # an id outside the mapping
        os.chown(mnt / "f1", 105, 105)               # a lower file: copied up, then chowned
    stored = {n: tuple(getattr(os.lstat(stack["upper"] / n), a) for a in ("st_uid", "st_gid"))
              for n in ("by-root", "chowned", "f0", "f1")}
    assert stored == {"by-root": rules.stored_owner(0, 0), "chowned": rules.stored_owner(103, 104),
                      "f0": (rules.stored_owner(50, None)[0], 0),
                      "f1": rules.stored_owner(105, 105)}


@pytest.mark.parametrize("options", ["uidmapping=0:100", "uidmapping=a:100:1",
                                     "squash_to_uid=abc"])
def test_malformed_option_mounts_nothing(program, stack, options):
    opts = f"lowerdir={stack['lower']},upperdir={stack['upper']},workdir={stack['work']}," \
        + options
    proc = subprocess.run([podman_env.program_path(program), "-o", opts, str(stack["mnt"])],
                          capture_output=True, text=True, timeout=30)
    mounted_now = os.path.ismount(stack["mnt"])
    if mounted_now:
        subprocess.run(["umount", str(stack["mnt"])], capture_output=True)
    assert proc.returncode != 0 and not mounted_now
    with pytest.raises(idmap.IdOptionError):
        rules_for(options)


def test_static_nlink(program, stack):
    for d in ("lower/d/a", "lower/d/b", "upper/u/a"):
        (stack[d.split("/")[0]] / d.split("/", 1)[1]).mkdir(parents=True)
    with mounted(program, stack["lower"], stack["upper"], stack["work"], stack["mnt"],
                 "static_nlink"):
        nlinks = [os.lstat(stack["mnt"] / d).st_nlink for d in ("", "d", "u", "d/a")]
    assert nlinks == [1, 1, 1, 1]


# (The `:type` field, e.g. char-1-3 for a device kept as a regular file, is
# read from fuse-overlayfs 1.15 on: 1.10 ignores it, so it is not tried here.)
OVERRIDES = {".": b"0:0:0755", "secret": b"0:0:0600", "owned": b"1000:1000:0640",
             "d": b"5:6:0700"}


def test_override_stat_of_a_force_mask_layer(program, stack):
    lower = stack["lower"]
    (lower / "d").mkdir()
    for name in ("secret", "owned"):
        (lower / name).write_text("y")
    for name, value in OVERRIDES.items():
        os.chmod(lower / name, 0o755)
        os.setxattr(lower / name, idmap.OVERRIDE_CONTAINERS, value)
    with mounted(program, lower, stack["upper"], stack["work"], stack["mnt"],
                 "xattr_permissions=2"):
        shown = {}
        for name in OVERRIDES:
            st = os.lstat(stack["mnt"] / name)
            shown[name] = (st.st_uid, st.st_gid, st.st_mode, st.st_rdev)
    expected = {}
    for name, value in OVERRIDES.items():
        disk = os.lstat(lower / name)
        expected[name] = idmap.apply_override(disk.st_mode, disk.st_rdev,
                                              idmap.decode_override(value))
    assert shown == expected


ACL_USER = 1234


def append_as(uid: int, path) -> int:
    """0, or the errno of appending to path as uid (in a child process)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with open(path, "a") as f:
                f.write("z")
            os._exit(0)
        except OSError as e:
            os._exit(e.errno)
        finally:
            os._exit(99)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("options", ["", "noacl"])
def test_acls_are_enforced_unless_noacl(program, stack, options):
    f = stack["lower"] / "acl"
    f.write_text("a")
    os.chmod(f, 0o644)
    subprocess.run(["setfacl", "-m", f"u:{ACL_USER}:rw", str(f)], check=True)
    with mounted(program, stack["lower"], stack["upper"], stack["work"], stack["mnt"], options):
        result = append_as(ACL_USER, stack["mnt"] / "acl")
    assert result == (errno.EACCES if options == "noacl" else 0)
