"""The installed fuse-unionfs is a C client (client/fuse-unionfs-client.c): with
a daemon it mounts without starting Python (the daemon's prepare op parses and
checks in the client's view), and everything else is the Python program's
(fuse-unionfs-py), with the same lines and exit statuses.

Which program did the work is read from an strace of the command's own
process (no -f: fusermount3 stays setuid): an exec of fuse-unionfs-py is the
fallback."""
import os
import subprocess
import tempfile

import pytest
from daemonutil import wait_listed
from test_access import GROUP, member, owned_stack, uid_of  # noqa: F401 (member: a fixture)

from mountutil import FUSE_UNIONFS, VENV_BIN, force_unmount, wait_for

PYTHON_FUSE_UNIONFS = os.path.join(VENV_BIN, "fuse-unionfs-py")


def run(argv, env, user=None, cwd=None):
    """(result, whether the Python program ran) of one fuse-unionfs run."""
    fd, trace = tempfile.mkstemp(prefix="unionfs-trace-")
    os.close(fd)
    os.chmod(trace, 0o666)
    argv = ["strace", "-qq", "-e", "trace=execve", "-e", "signal=none", "-o", trace, *argv]
    if user is not None:
        argv = ["runuser", "-u", user, "--", "env",
                *[f"{k}={v}" for k, v in env.items() if k.startswith("UNIONFS")], *argv]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
        with open(trace) as f:
            python = "fuse-unionfs-py" in f.read()
    finally:
        os.unlink(trace)
    return res, python


def tree(root):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with open(path) as f:
                found.append((os.path.relpath(path, root), f.read()))
        found += [(os.path.relpath(os.path.join(dirpath, d), root) + "/", None)
                  for d in dirnames]
    return sorted(found)


@pytest.fixture
def layers(make_stack):
    s = make_stack()
    (s.lowers[1] / "f").write_text("lower f\n")
    (s.lowers[1] / "d").mkdir()
    (s.lowers[1] / "d" / "inside").write_text("i")
    (s.lowers[0] / "d").mkdir()
    (s.lowers[0] / "top").write_text("top\n")
    (s.upper / "up").write_text("upper\n")
    return s


def options(s):
    return (f"lowerdir={s.lowers[0]}:{s.lowers[1]},upperdir={s.upper},workdir={s.work}")


def test_the_installed_fuse_unionfs_is_the_c_client():
    with open(FUSE_UNIONFS, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert os.access(PYTHON_FUSE_UNIONFS, os.X_OK)


def test_a_mount_through_the_c_client_shows_what_the_python_clients_does(daemon, layers,
                                                                        tmp_path):
    res, python = run([FUSE_UNIONFS, "-o", options(layers), str(layers.mnt)], daemon.env)
    assert res.returncode == 0 and not python, res.stderr
    try:
        [m] = daemon.mounts()
        assert m["mountpoint"] == str(layers.mnt)
        with open(f"/proc/{m['pid']}/cmdline", "rb") as f:
            assert b"unionfs.serve.pooled" in f.read()
        seen = tree(layers.mnt)
        (layers.mnt / "new").write_text("written\n")
        assert (layers.upper / "new").read_text() == "written\n"
        os.unlink(layers.mnt / "new")
    finally:
        subprocess.run(["umount", str(layers.mnt)], check=True)
    wait_listed(daemon, 0)
    res = subprocess.run([PYTHON_FUSE_UNIONFS, "-o", options(layers), str(layers.mnt)],
                         capture_output=True, text=True, env=daemon.env, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        wait_listed(daemon, 1)
        assert tree(layers.mnt) == seen
        assert ("top", "top\n") in seen and ("up", "upper\n") in seen
    finally:
        subprocess.run(["umount", str(layers.mnt)], check=True)


def test_relative_paths_are_the_clients_directorys(daemon, layers):
    base = layers.mnt.parent
    rel = lambda p: os.path.relpath(p, base)  # noqa: E731
    opts = (f"lowerdir={rel(layers.lowers[0])}:{rel(layers.lowers[1])},"
            f"upperdir={rel(layers.upper)},workdir={rel(layers.work)}")
    res, python = run([FUSE_UNIONFS, "-o", opts, rel(layers.mnt)], daemon.env, cwd=base)
    assert res.returncode == 0 and not python, res.stderr
    try:
        assert (layers.mnt / "top").read_text() == "top\n"
        [m] = daemon.mounts()
        assert m["mountpoint"] == str(layers.mnt)
    finally:
        subprocess.run(["umount", str(layers.mnt)], check=True)


@pytest.mark.parametrize("case", ["unknown option", "missing lower", "relative missing",
                                  "no mountpoint", "upper without work", "mountpoint is a file",
                                  "inside a layer"])
def test_a_bad_command_line_fails_as_the_python_programs_does(daemon, layers, case):
    mnt = str(layers.mnt)
    argv = {
        "unknown option": ["-o", options(layers) + ",bogus=1", mnt],
        "missing lower": ["-o", f"lowerdir={layers.lowers[0]}/nope", mnt],
        "relative missing": ["-o", "lowerdir=nope:also", mnt],
        "no mountpoint": ["-o", options(layers)],
        "upper without work": ["-o", f"lowerdir={layers.lowers[0]},upperdir={layers.upper}",
                               mnt],
        "mountpoint is a file": ["-o", options(layers), str(layers.lowers[0] / "top")],
        "inside a layer": ["-o", f"lowerdir={layers.lowers[1]}", str(layers.lowers[1] / "d")],
    }[case]
    fast, python = run([FUSE_UNIONFS, *argv], daemon.env, cwd=layers.mnt.parent)
    assert not python
    slow = subprocess.run([PYTHON_FUSE_UNIONFS, *argv], capture_output=True, text=True,
                          env=daemon.env, timeout=60, cwd=layers.mnt.parent)
    assert (fast.returncode, fast.stderr, fast.stdout) == \
        (slow.returncode, slow.stderr, slow.stdout)
    assert fast.returncode in (1, 2) and fast.stderr.count("\n") == 1, fast.stderr
    assert not os.path.ismount(layers.mnt) and daemon.mounts() == []


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["-V"], ["-h", "x"]])
def test_help_and_version_are_the_python_programs(daemon, args):
    fast, python = run([FUSE_UNIONFS, *args], daemon.env)
    assert python
    slow = subprocess.run([PYTHON_FUSE_UNIONFS, *args], capture_output=True, text=True,
                          timeout=60)
    assert (fast.returncode, fast.stdout, fast.stderr) == \
        (slow.returncode, slow.stdout, slow.stderr) and fast.returncode == 0


def own_server(layers, env):
    res, python = run([FUSE_UNIONFS, "-o", options(layers), str(layers.mnt)], env)
    assert res.returncode == 0, res.stderr
    try:
        assert python
        assert (layers.mnt / "top").read_text() == "top\n"
    finally:
        subprocess.run(["umount", str(layers.mnt)], check=True)


def test_without_a_daemon_the_python_program_mounts_with_a_server_of_its_own(layers,
                                                                             tmp_path):
    own_server(layers, {**os.environ, "UNIONFS_SOCKET": str(tmp_path / "none.sock")})


def test_unionfs_no_daemon_skips_the_daemon(daemon, layers):
    own_server(layers, {**daemon.env, "UNIONFS_NO_DAEMON": "1"})
    assert daemon.mounts() == []


def test_foreground_is_the_python_programs(daemon, layers):
    proc = subprocess.Popen([FUSE_UNIONFS, "-f", "-o", options(layers), str(layers.mnt)],
                            env=daemon.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.ismount(layers.mnt) or proc.poll() is not None,
                 what="the foreground mount")
        assert (layers.mnt / "top").read_text() == "top\n"
        assert daemon.mounts() == []
    finally:
        force_unmount(str(layers.mnt))
        proc.wait(timeout=10)


def test_a_mount_unmounted_at_once_leaves_the_daemon_running(daemon, layers):
    """The event relay met a server gone before it asked: the daemon died
    (BrokenResourceError out of its nursery) when the server was gone before
    it asked; a race, so this catches it only sometimes."""
    for _ in range(10):
        res, python = run([FUSE_UNIONFS, "-o", options(layers), str(layers.mnt)], daemon.env)
        assert res.returncode == 0 and not python, res.stderr
        subprocess.run(["umount", str(layers.mnt)], check=True)
    wait_listed(daemon, 0)
    assert daemon.proc.poll() is None, open(daemon.log_path).read()


def test_a_plain_user_mounts_through_fusermount3(make_daemon, member):  # noqa: F811
    d = make_daemon(group=GROUP)
    root, dirs = owned_stack(member)
    try:
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        res, python = run([FUSE_UNIONFS, "-o", opts, dirs["mnt"]], d.env, user=member.name)
        assert res.returncode == 0 and not python, res.stderr
        wait_listed(d, 1)
        [m] = d.mounts()
        assert uid_of(m["pid"]) == member.uid
        out = subprocess.run(member.command(["cat", f"{dirs['mnt']}/f"]), capture_output=True,
                             text=True)
        assert out.stdout == "theirs\n", out.stderr
        # checked as the member: root's directory is out of their reach
        res, python = run([FUSE_UNIONFS, "-o", f"lowerdir=/root,upperdir={dirs['upper']},"
                           f"workdir={dirs['work']}", dirs["lower"]], d.env, user=member.name)
        slow = subprocess.run(member.command(
            ["env", f"UNIONFS_SOCKET={d.socket}", PYTHON_FUSE_UNIONFS, "-o",
             f"lowerdir=/root,upperdir={dirs['upper']},workdir={dirs['work']}", dirs["lower"]]),
            capture_output=True, text=True)
        assert (res.returncode, res.stderr) == (slow.returncode, slow.stderr) and not python
        assert res.returncode == 1
    finally:
        # the member's mount: root cannot stat it (no allow_other), so ismount
        # (force_unmount) says no; unmount it whatever it says
        subprocess.run(["umount", "-l", dirs["mnt"]], capture_output=True)
        subprocess.run(["rm", "-rf", root])


def test_root_of_a_user_namespace_mounts_through_the_daemon(make_daemon, member):  # noqa: F811
    """podman's mount program, rootless: root of a user namespace of its own,
    in a mount namespace of its own; the daemon checks in that view."""
    d = make_daemon(group=GROUP)
    root, dirs = owned_stack(member)
    try:
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        script = (f"strace -qq -e trace=execve -e signal=none -o {root}/trace "
                  f"{FUSE_UNIONFS} -o {opts} {dirs['mnt']} && cat {dirs['mnt']}/f && "
                  f"findmnt -n -o FSTYPE {dirs['mnt']} && umount {dirs['mnt']}")
        res = subprocess.run(member.command(["env", f"UNIONFS_SOCKET={d.socket}", "unshare",
                                             "-Urm", "sh", "-c", script]),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["theirs", "fuse.fuse-unionfs"]
        with open(f"{root}/trace") as f:
            assert "fuse-unionfs-py" not in f.read()
        assert not os.path.ismount(dirs["mnt"])         # never in the daemon's namespace
    finally:
        force_unmount(dirs["mnt"])
        subprocess.run(["rm", "-rf", root])
