"""`unionfs ps --mounts`: the unionfs mounts of the caller's namespace (each
server answers for itself) and the daemon's, with who serves each."""
import os
import subprocess

from daemonutil import UNIONFS

from mountutil import force_unmount


def _layers(tmp_path, name):
    paths = [str(tmp_path / name / d) for d in ("l", "u", "w", "m")]
    for p in paths:
        os.makedirs(p)
    return paths


def _ps(env):
    done = subprocess.run([UNIONFS, "ps", "--mounts"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return {line.split()[0]: line for line in done.stdout.splitlines()[1:]}


def test_a_mount_with_its_own_server_is_listed(tmp_path):
    low, up, work, mnt = _layers(tmp_path, "own")
    env = dict(os.environ, UNIONFS_NO_DAEMON="1", UNIONFS_SOCKET=str(tmp_path / "none.sock"))
    subprocess.run([UNIONFS, "mount", "--lower", low, "--upper", up, "--work", work, mnt],
                   check=True, env=env)
    try:
        rows = _ps(env)
    finally:
        force_unmount(mnt)
    assert mnt in rows and "own server" in rows[mnt]


def test_a_daemon_mount_is_listed_with_its_id_and_layers(daemon, tmp_path):
    low, up, work, mnt = _layers(tmp_path, "daemon")
    subprocess.run([UNIONFS, "mount", "--lower", low, "--upper", up, "--work", work, mnt],
                   check=True, env=daemon.env)
    try:
        rows = _ps(daemon.env)
        (served,) = [m for m in daemon.mounts() if m["mountpoint"] == mnt]
    finally:
        force_unmount(mnt)
    assert f"daemon {served['id']}" in rows[mnt]
    assert f"{low} + {up}" in rows[mnt]


def test_an_unmounted_mount_is_no_longer_listed(tmp_path):
    low, up, work, mnt = _layers(tmp_path, "gone")
    env = dict(os.environ, UNIONFS_NO_DAEMON="1", UNIONFS_SOCKET=str(tmp_path / "none.sock"))
    subprocess.run([UNIONFS, "mount", "--lower", low, "--upper", up, "--work", work, mnt],
                   check=True, env=env)
    force_unmount(mnt)
    assert mnt not in _ps(env)
