"""unionfs.serve.process: real server processes spawned, given a mount, stopped.

Each test owns what it starts: handles are stopped or discarded, mounts
unmounted, in fixtures that always run.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from runner_rootfs import mounts_matching, processes_mentioning
from unionfs.serve import process
from unionfs.serve.config import MountConfig
from unionfs.sys import mountinfo

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stack(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("serving FUSE here needs root (/dev/fuse is 0600)")
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "hello").write_text("from the lower layer\n")
    yield dirs
    if mountinfo.is_mountpoint(str(dirs["mnt"])):
        subprocess.run(["umount", "-l", str(dirs["mnt"])], check=False)


@pytest.fixture
def handles():
    """Handles to clean up: whatever a test leaves running is killed and reaped."""
    started = []
    yield started
    for handle in started:
        handle.discard()


def config(stack, **extra):
    return MountConfig(lowers=[str(stack["lower"])], upper=str(stack["upper"]),
                       work=str(stack["work"]), mountpoint=str(stack["mnt"]), **extra)


def test_ready_means_the_mount_is_live_and_stop_waits_for_the_exit(stack, handles, tmp_path):
    handle = process.spawn()
    handles.append(handle)
    log = tmp_path / "server.log"
    log.write_text("")
    handle.mount(config(stack), log_path=str(log))
    # no waiting, no polling: the answer came after the kernel had the mount
    assert mountinfo.mounts_at(str(stack["mnt"]))[0].fstype == "fuse.unionfs"
    assert (stack["mnt"] / "hello").read_text() == "from the lower layer\n"
    assert os.readlink(f"/proc/{handle.pid}/cwd") == "/"
    assert handle.stop(str(stack["mnt"])) is None
    assert not mountinfo.is_mountpoint(str(stack["mnt"]))
    assert os.WIFEXITED(handle.status) and os.WEXITSTATUS(handle.status) == 0
    assert "Traceback" not in log.read_text()


def test_a_bad_config_is_one_line_and_the_server_exits_by_itself(stack, handles, tmp_path):
    handle = process.spawn()
    handles.append(handle)
    cfg = config(stack)
    cfg.lowers = [str(tmp_path / "missing")]
    with pytest.raises(process.ServerError, match=r"^unionfs: lower layer .* does not exist$"):
        handle.mount(cfg)
    handle.wait_exit(timeout=10)
    assert os.WEXITSTATUS(handle.status) == 1 and not os.WIFSIGNALED(handle.status)
    assert not mountinfo.is_mountpoint(str(stack["mnt"]))


def test_a_server_never_given_a_mount_exits_when_its_channel_closes(handles):
    handle = process.spawn()
    handles.append(handle)
    handle.wait_exit(timeout=30)  # closes our end first: the child sees EOF
    assert os.WIFEXITED(handle.status) and os.WEXITSTATUS(handle.status) == 0


def test_discard_kills_and_reaps(handles):
    handle = process.spawn()
    handles.append(handle)
    handle.discard()
    assert os.WIFSIGNALED(handle.status) and os.WTERMSIG(handle.status) == signal.SIGKILL
    with pytest.raises(ChildProcessError):
        os.waitpid(handle.pid, os.WNOHANG)
    handle.discard()  # idempotent


def test_a_server_that_is_gone_is_reported_as_gone(stack, handles):
    handle = process.spawn()
    handles.append(handle)
    os.kill(handle.pid, signal.SIGKILL)
    process.wait_for_exit(handle.pid, 10)
    with pytest.raises(process.ServerGone, match="before it was given its mount"):
        handle.send_mount(config(stack))
    assert handle.status is not None  # reaped


def test_two_spawned_servers_do_not_hold_each_others_channels(handles):
    first, second = process.spawn(), process.spawn()
    handles += [first, second]
    first.wait_exit(timeout=30)  # EOF reaches the first although the second was forked later
    assert os.WIFEXITED(first.status) and os.WEXITSTATUS(first.status) == 0


def spawn_shell(script):
    pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", script], os.environ)
    return process.ServerHandle(pid, None)


def test_a_server_that_does_not_go_gets_sigterm_then_sigkill(handles, monkeypatch):
    monkeypatch.setattr(process, "KILL_TIMEOUT", 0.2)
    polite = spawn_shell("sleep 30")
    stubborn = spawn_shell("trap '' TERM; while :; do sleep 0.05; done")
    handles += [polite, stubborn]
    time.sleep(0.1)  # let the shell set its trap
    polite.wait_exit(timeout=0.2)
    stubborn.wait_exit(timeout=0.2)
    assert os.WTERMSIG(polite.status) == signal.SIGTERM
    assert os.WTERMSIG(stubborn.status) == signal.SIGKILL


def test_an_unprivileged_unmount_falls_back_to_fusermount3():
    if os.geteuid() != 0:
        pytest.skip("needs root to mount the tmpfs")
    import tempfile
    target = tempfile.mkdtemp(prefix="unionfs-unmount-test-", dir="/tmp")  # nobody can reach it
    os.chmod(target, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            message = b"no error"
            try:
                os.setresuid(65534, 65534, 65534)  # umount2 is now EPERM
                process.unmount(target)
            except OSError as e:
                message = f"{e.errno} {e.strerror}".encode()
            finally:
                os.write(write_end, message)
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            answer = f.read().decode()
        os.waitpid(pid, 0)
    finally:
        subprocess.run(["umount", target], check=False)
        os.rmdir(target)
    # fusermount3 was asked, and said no (a tmpfs is no FUSE mount of nobody's)
    assert answer.startswith("1 fusermount3: "), answer


def is_running(pid):
    """Neither gone nor a zombie (whose reaping is its new parent's business)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:\tZ") for line in f)
    except FileNotFoundError:
        return False


def test_unionfs_mount_daemon_is_detached_and_umount_waits_for_it(stack):
    cfg = config(stack)
    result = subprocess.run([UNIONFS, "mount", "--lower", cfg.lowers[0], "--upper", cfg.upper,
                             "--work", cfg.work, cfg.mountpoint], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    pid = process.server_pid(cfg.mountpoint)
    assert pid is not None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[3]) == pid          # a session of its own (sid)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    result = subprocess.run([UNIONFS, "umount", cfg.mountpoint], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not is_running(pid)  # gone by the time umount returned


def test_dry_run_prints_the_plan_and_starts_nothing(stack, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    marker = f"dry-run-marker-{os.getpid()}"
    result = subprocess.run([UNIONFS, "run", "--lower", str(stack["lower"]), "-v",
                             f"{tmp_path}:/host:ro", "--dry-run", "--", "echo", marker],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, TMPDIR=str(state)))
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"root: a union of {stack['lower']}")
    assert f"bind host {tmp_path} on /host (ro,recursive)" in lines
    assert lines[-1] == f"command: echo {marker}"
    assert os.listdir(state) == []
    assert not mounts_matching(str(state)) and not processes_mentioning(marker)
