"""Who may do what through the daemon: taken from the socket, never the request.

A root daemon whose sockets are open to a group: a member of it mounts
through the daemon as themselves (fusermount3, a server with their ids),
sees and controls only their own mounts, and cannot see, stat or unmount
root's."""
import grp
import os
import subprocess
import tempfile

import pytest
from daemonutil import wait_listed

from bench.podman import PodmanUser
from mountutil import force_unmount

GROUP = "unionfs-test"


@pytest.fixture
def member():
    created = False
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True)
        created = True
    user = PodmanUser("ufsdaemonuser")
    subprocess.run(["usermod", "-aG", GROUP, user.name], check=True)
    yield user
    user.remove()
    if created:
        subprocess.run(["groupdel", GROUP])


def owned_stack(user):
    root = tempfile.mkdtemp(prefix="unionfs-user-stack-")
    os.chmod(root, 0o755)
    dirs = {n: os.path.join(root, n) for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        os.mkdir(d)
    with open(os.path.join(dirs["lower"], "f"), "w") as f:
        f.write("theirs\n")
    for path in [root, *dirs.values(), os.path.join(dirs["lower"], "f")]:
        os.chown(path, user.uid, user.gid)
    return root, dirs


def uid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


def test_a_member_sees_and_controls_only_their_own_mounts(make_daemon, member, make_stack):
    d = make_daemon(group=GROUP)
    s = make_stack()
    (s.lowers[0] / "f").write_text("root's\n")
    res = d.mount(s.lowers, s.upper, s.work, s.mnt)
    assert res.returncode == 0, res.stderr
    [root_mount] = d.mounts()
    # root's mount: invisible to the member, and out of reach
    assert d.api("GET", "/v1/mounts", user=member.name) == (200, [])
    for method, path in (("GET", f"/v1/mounts/{root_mount['id']}"),
                         ("GET", f"/v1/mounts/{root_mount['id']}/stats"),
                         ("DELETE", f"/v1/mounts/{root_mount['id']}")):
        assert d.api(method, path, user=member.name)[0] == 404
    assert os.path.ismount(s.mnt)
    # the member's own mount, through the daemon, served with their ids
    root, dirs = owned_stack(member)
    try:
        res = d.mount([dirs["lower"]], dirs["upper"], dirs["work"], dirs["mnt"],
                      user=member.name)
        assert res.returncode == 0, res.stderr
        wait_listed(d, 2)
        status, mine = d.api("GET", "/v1/mounts", user=member.name)
        assert status == 200 and [m["mountpoint"] for m in mine] == [dirs["mnt"]]
        assert uid_of(mine[0]["pid"]) == member.uid
        out = subprocess.run(member.command(["sh", "-c", f"cat {dirs['mnt']}/f; "
                                             f"echo mine > {dirs['mnt']}/new"]),
                             capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout == "theirs\n", out.stderr
        assert os.stat(os.path.join(dirs["upper"], "new")).st_uid == member.uid
        status, _ = d.api("DELETE", f"/v1/mounts/{mine[0]['id']}", user=member.name)
        assert status == 200
        wait_listed(d, 1)
    finally:
        force_unmount(dirs["mnt"])
        subprocess.run(["rm", "-rf", root])


def test_the_sockets_are_closed_to_others_without_a_group(daemon):
    for path in (daemon.socket, daemon.socket + ".mount"):
        assert os.stat(path).st_mode & 0o777 == 0o600
