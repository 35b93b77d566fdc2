"""`unionfs run` by a plain user with subordinate ids: the runner maps them
(newuidmap/newgidmap) and serves the union inside that user namespace, so
an image's files owned by many uids keep their owners, and chown to any
mapped id works (runner.subids).

The user is made for the module (useradd, /etc/subuid and /etc/subgid,
/dev/fuse open to it: bench.podman.PodmanUser) and runs the install under
test, which must be one every user can execute (CI's /opt/unionfs; else
`UNIONFS_PREFIX=/opt/unionfs-X UNIONFS_LINK_BIN=0 ./scripts/setup.sh` and
its venv's python for pytest).
"""
import os
import subprocess
import sys
import tempfile

import pytest

from bench.podman import PodmanUser
from runner_rootfs import build_rootfs

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def user():
    if os.geteuid() != 0:
        pytest.skip("makes a plain user with useradd (needs root)")
    made = PodmanUser(f"ufssub{os.getpid() % 100000}")
    try:
        probe = subprocess.run(made.command([UNIONFS, "--version"]), capture_output=True,
                               text=True)
        if probe.returncode != 0:
            pytest.skip(f"a plain user cannot execute {UNIONFS} ({probe.stderr.strip()}): use "
                        "an install every user can execute (UNIONFS_PREFIX=/opt/unionfs-X "
                        "UNIONFS_LINK_BIN=0 ./scripts/setup.sh)")
        yield made
    finally:
        made.remove()


@pytest.fixture(scope="module")
def lower(user):
    """A busybox root whose /data/five belongs to the user's fifth subordinate
    uid and gid (5:5 inside) and /data/mine to the user (0:0 inside)."""
    base = tempfile.mkdtemp(prefix="unionfs-subids-")
    os.chmod(base, 0o755)
    root = build_rootfs(os.path.join(base, "lower"))
    first = user.subids().start
    for name, owner in (("five", first + 4), ("mine", user.uid)):
        path = os.path.join(root, "data", name)
        with open(path, "w") as f:
            f.write(f"{name}\n")
        os.chmod(path, 0o644)
        os.chown(path, owner, owner if owner != user.uid else user.gid)
    os.chown(os.path.join(root, "data"), user.uid, user.gid)
    subprocess.run(["chmod", "-R", "a+rX", base], check=True)
    yield root
    subprocess.run(["rm", "-rf", base], check=True)


@pytest.fixture
def run(user, lower):
    """run(ARGS..., upper=None) as the user; afterwards no state dir and no
    process of the user or its subordinate ids may remain."""
    state = tempfile.mkdtemp(prefix="unionfs-subids-state-")
    os.chown(state, user.uid, user.gid)

    def run_as_user(*args, upper=None):
        layers = ["--lower", lower]
        if upper is not None:
            layers += ["--upper", os.path.join(upper, "u"), "--work", os.path.join(upper, "w")]
        return subprocess.run(user.command(["env", f"TMPDIR={state}", UNIONFS, "run", *layers,
                                            *args]), capture_output=True, text=True, timeout=120)
    yield run_as_user
    leftovers, processes = os.listdir(state), user.pids()
    os.rmdir(state) if not leftovers else subprocess.run(["rm", "-rf", state])
    assert not leftovers, f"state left behind: {leftovers}"
    assert not processes, f"processes of the user left behind: {processes}"


@pytest.fixture
def upper(user):
    base = tempfile.mkdtemp(prefix="unionfs-subids-upper-")
    for name in ("u", "w"):
        os.mkdir(os.path.join(base, name))
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", base], check=True)
    yield base
    subprocess.run(["rm", "-rf", base], check=True)


def test_a_file_of_a_subordinate_uid_keeps_its_owner(run):
    done = run("--", "stat", "-c", "%u:%g", "/data/five", "/data/mine")
    assert (done.returncode, done.stdout.split()) == (0, ["5:5", "0:0"]), done.stderr


def test_the_caller_is_root_inside(run):
    done = run("--", "id", "-u")
    assert (done.returncode, done.stdout.strip()) == (0, "0"), done.stderr


def test_chown_to_a_mapped_id_lands_on_its_subordinate_id_in_the_upper(run, upper, user):
    done = run("--", "chown", "7:8", "/data/mine", upper=upper)
    assert done.returncode == 0, done.stderr
    st = os.lstat(os.path.join(upper, "u", "data", "mine"))
    first_uid = user.subids().start
    with open("/etc/subgid") as f:
        first_gid = next(int(line.split(":")[1]) for line in f
                         if line.startswith(user.name + ":"))
    assert (st.st_uid, st.st_gid) == (first_uid + 6, first_gid + 7)


def test_a_subordinate_user_writes_its_own_file(run):
    done = run("-u", "5:5", "--", "sh", "-c", "echo more >> /data/five && cat /data/five")
    assert (done.returncode, done.stdout) == (0, "five\nmore\n"), done.stderr


def test_a_subordinate_user_cannot_write_the_callers_file(run):
    done = run("-u", "5:5", "--", "sh", "-c", "echo more >> /data/mine")
    assert done.returncode != 0
    assert "Permission denied" in done.stderr


def test_the_dry_run_names_the_mapping(run, user):
    done = run("--dry-run", "--", "true")
    first = user.subids().start
    assert f"1-65536 are {first}-{first + 65535}" in done.stdout, done.stdout + done.stderr
