"""`unionfs run IMAGE` by a plain user: a store of the user's own, an image
loaded into it rootless, run in a user namespace over a FUSE mount made with
fusermount3; its config, a user name, a kept container, ps and rm.

It runs the install under test as user nobody, so that install must be one
every user can execute (CI's /opt/unionfs; for a venv of your own:
`UNIONFS_PREFIX=/opt/unionfs-BRANCH UNIONFS_LINK_BIN=0 ./scripts/setup.sh`
and its venv's python for pytest), and /dev/fuse must be open to the user
(setup.sh makes it 0666).
"""
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest
from run_images import base_layer, tar_of

USER = "nobody"
UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")

pytestmark = pytest.mark.timeout(180)


def as_user(*argv, env=None, timeout=120):
    return subprocess.run(["runuser", "-u", USER, "--", "env", *(f"{k}={v}" for k, v in
                                                                   (env or {}).items()), *argv],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("runs a plain user through runuser (needs root)")
    probe = as_user(UNIONFS, "--version")
    if probe.returncode != 0:
        pytest.skip(f"{USER} cannot execute {UNIONFS} ({probe.stderr.strip()}): use an install "
                    "every user can execute (UNIONFS_PREFIX=/opt/unionfs-X UNIONFS_LINK_BIN=0 "
                    "./scripts/setup.sh)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) or os.stat("/dev/fuse").st_mode & 0o006 \
            != 0o006:
        pytest.skip("/dev/fuse is not open to plain users (chmod 0666 /dev/fuse)")
    # pytest's tmp_path lies under a 0700 directory the user cannot enter
    root = tempfile.mkdtemp(prefix="unionfs-rootless-image-")
    os.chmod(root, 0o755)
    from imagebuild import write_oci_layout
    layout = os.path.join(root, "oci")
    write_oci_layout(layout, [base_layer(str(tmp_path_factory.getbasetemp())),
                              tar_of({"srv/hello": b"hello rootless\n"})], ref_name="1",
                     run={"Cmd": ["sh", "-c", "cat /srv/hello; id -u; id -g; echo $HOME"],
                          "User": "app"})
    subprocess.run(["chmod", "-R", "a+rX", layout], check=True)
    uid = pwd.getpwnam(USER).pw_uid
    state = os.path.join(root, "state")
    os.mkdir(state)
    os.chown(state, uid, uid)
    store = os.path.join(root, "store")
    os.mkdir(store)
    os.chown(store, uid, uid)
    env = {"HOME": root, "TMPDIR": state}
    loaded = as_user(UNIONFS, "load", "--store", store, "-i", layout, "--name", "localhost/rl",
                     env=env)
    assert loaded.returncode == 0, loaded.stderr
    yield {"store": store, "env": env, "state": state}
    leftovers = os.listdir(state)
    subprocess.run(["umount", "-l", *[os.path.join(state, d, "root") for d in leftovers]],
                   capture_output=True)
    shutil.rmtree(root)
    assert leftovers == [], "a run left its state dir"


def test_a_plain_user_runs_an_image_of_its_own_store(home):
    result = as_user(UNIONFS, "run", "--store", home["store"], "localhost/rl:1", env=home["env"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello rootless", "1234", "2345", "/home/app"]


def test_a_plain_users_container_is_kept_listed_and_removed(home):
    result = as_user(UNIONFS, "run", "--store", home["store"], "--name", "mine", "-u", "root",
                     "localhost/rl:1", "sh", "-c", "id -u; echo kept > /srv/kept",
                     env=home["env"])
    assert (result.returncode, result.stdout) == (0, "0\n"), result.stderr
    ps = as_user(UNIONFS, "ps", "-a", "--store", home["store"], env=home["env"])
    assert ps.stdout.split()[-3:] == ["Exited", "(0)", "mine"], ps.stdout
    again = as_user(UNIONFS, "run", "--store", home["store"], "localhost/rl:1", "true",
                    env=home["env"])
    assert again.returncode == 0, again.stderr
    committed = as_user(UNIONFS, "commit", "--store", home["store"], "mine", "localhost/rl:2",
                        env=home["env"])
    assert committed.returncode == 0, committed.stderr
    result = as_user(UNIONFS, "run", "--store", home["store"], "localhost/rl:2", "cat",
                     "/srv/kept", env=home["env"])
    assert (result.returncode, result.stdout) == (0, "kept\n"), result.stderr
    removed = as_user(UNIONFS, "rm", "--store", home["store"], "mine", env=home["env"])
    assert (removed.returncode, removed.stdout) == (0, "mine\n"), removed.stderr
    assert os.listdir(os.path.join(home["store"], "containers")) == []
