"""`unionfs run`: real namespaces and real mounts on a busybox rootfs.

Every run gets its own TMPDIR (where the runner keeps its state dir), so a
test can check afterwards that nothing is left: no state dir, no mount, no
process.
"""
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from runner.plan import PlanError, build_plan, parse_env, parse_user, parse_volume
from runner_rootfs import (
    UNIONFS,
    build_rootfs,
    mounts_matching,
    processes_mentioning,
    run_unionfs,
    snapshot,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def lower(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("these runner tests run as root (FUSE allow_other, namespaces)")
    return build_rootfs(str(tmp_path_factory.mktemp("rootfs") / "lower"))


@pytest.fixture
def state_base(tmp_path, lower):
    """A private TMPDIR for the runner; afterwards nothing may remain of any run."""
    base = tmp_path / "state"
    base.mkdir()
    yield str(base)
    leftovers = os.listdir(base)
    mounts = mounts_matching(str(base))
    processes = processes_mentioning(str(base))
    for pid, _ in processes:
        os.kill(pid, signal.SIGKILL)
    for line in mounts:
        subprocess.run(["umount", "-l", line.split()[4]], check=False)
    assert not processes, f"processes left behind: {processes}"
    assert not mounts, f"mounts left behind: {mounts}"
    assert not leftovers, f"state left behind: {leftovers}"


@pytest.fixture
def start_runner(state_base):
    """Start `unionfs run ARGS` in the background; killed at teardown if still running."""
    started = []

    def start(args, **kwargs):
        kwargs.setdefault("env", dict(os.environ, TMPDIR=state_base))
        process = subprocess.Popen([UNIONFS, "run", *args], **kwargs)
        started.append(process)
        return process
    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def run(lower, state_base, *args, **kwargs):
    kwargs.setdefault("env", dict(os.environ, TMPDIR=state_base))
    return run_unionfs(["--lower", lower, *args], **kwargs)


def test_a_program_on_the_union_can_be_executed(lower, tmp_path):
    # Everything below needs this; when it fails, the filesystem is at fault,
    # not the runner (e.g. exec's open carries __FMODE_EXEC, 0x20, in its flags).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run([UNIONFS, "mount", "--lower", lower, str(mnt)], check=True, timeout=60)
    try:
        result = subprocess.run(["chroot", str(mnt), "/bin/true"], capture_output=True,
                                text=True, timeout=60)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert result.returncode == 0, f"exec on a unionfs mount fails: {result.stderr.strip()}"


@pytest.mark.parametrize("command, status", [
    (["/bin/true"], 0),
    (["sh", "-c", "exit 7"], 7),
    (["no-such-command"], 127),
    (["/data/plain.txt"], 126),
    (["/data"], 126),
    (["sh", "-c", "kill -9 $$"], 128 + 9),
    (["sh", "-c", "kill -TERM $$"], 128 + 15),
])
def test_exit_status(lower, state_base, command, status):
    result = run(lower, state_base, "--", *command)
    assert result.returncode == status, result.stderr
    if status in (126, 127):
        assert len(result.stderr.splitlines()) == 1
        assert command[0] in result.stderr


def test_command_is_under_pid_1_in_its_own_pid_namespace(lower, state_base):
    result = run(lower, state_base, "--", "sh", "-c",
                 "echo $$; ls /proc | grep -c '^[0-9]'; cat /proc/1/status | grep PPid")
    assert result.returncode == 0, result.stderr
    shell_pid, process_count, ppid_line = result.stdout.split("\n")[:3]
    assert shell_pid == "2"            # PID 1 is the runner's init
    assert int(process_count) <= 4     # init, sh, ls, grep: nothing from the host
    assert ppid_line.split() == ["PPid:", "0"]


def test_zombies_are_reaped_and_orphans_do_not_outlive_the_run(lower, state_base):
    # The orphaned sleeps are re-parented to PID 1; when the command exits they
    # are killed with the namespace, and the run still ends at once.
    result = run(lower, state_base, "--", "sh", "-c",
                 "(sleep 1000 &) ; (true &) ; sleep 0.1; "
                 "grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "0"
    assert not processes_mentioning("sleep 1000")


def test_hostname_is_isolated(lower, state_base):
    before = socket.gethostname()
    result = run(lower, state_base, "--hostname", "boxy", "--", "sh", "-c",
                 "hostname; cat /proc/sys/kernel/hostname")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["boxy", "boxy"]
    assert socket.gethostname() == before


def test_the_containers_root_has_only_the_default_capabilities(lower, state_base):
    result = run(lower, state_base, "--", "sh", "-c",
                 "grep -E '^Cap(Eff|Bnd)' /proc/self/status; hostname other 2>/dev/null; "
                 "mount -t tmpfs none /mnt 2>/dev/null; echo $?")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    effective, bounding = (int(line.split()[1], 16) for line in lines[:2])
    expected = sum(1 << cap for cap in (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))
    assert effective == bounding == expected
    assert lines[2] != "0"  # mounting is not allowed inside


def test_container_environment(lower, state_base, tmp_path):
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "in").write_text("from the host\n")
    result = run(lower, state_base, "-e", "GREETING=hi there", "-w", "/data/sub",
                 "-u", "65534:65534", "-v", f"{tmp_path / 'vol'}:/mnt/vol:ro", "--", "sh", "-c",
                 "echo $GREETING; pwd; id -u; id -g; cat /mnt/vol/in; "
                 "touch /mnt/vol/new 2>/dev/null || echo read-only; "
                 "cat /proc/self/status | grep NoNewPrivs; "
                 "ls /dev; grep -c ' / ' /proc/mounts; ip link 2>/dev/null | grep -c '^[0-9]'")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:7] == ["hi there", "/data/sub", "65534", "65534", "from the host",
                         "read-only", "NoNewPrivs:\t1"]
    devices = set(lines[7:-2])
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm"} <= devices
    assert lines[-1] == "1"  # --net none: loopback only
    assert not (tmp_path / "vol" / "new").exists()


def test_special_filesystems_inside(lower, state_base):
    result = run(lower, state_base, "--", "sh", "-c",
                 "grep -E ' /(proc|dev|dev/pts|dev/shm|sys|tmp) ' /proc/mounts | cut -d' ' -f2-4;"
                 "echo x > /dev/null && head -c 4 /dev/zero | wc -c; "
                 "touch /sys/x 2>/dev/null || echo ro")
    assert result.returncode == 0, result.stderr
    fields = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[:-2]}
    assert fields["/proc"][0] == "proc"
    assert fields["/dev"][0] == "tmpfs"
    assert fields["/dev/pts"][0] == "devpts"
    assert fields["/dev/shm"][0] == "tmpfs"
    assert fields["/sys"][0] == "sysfs" and fields["/sys"][1].startswith("ro,")
    assert fields["/tmp"][0] == "tmpfs"
    assert result.stdout.splitlines()[-2:] == ["4", "ro"]


def test_host_does_not_see_the_containers_mounts(lower, state_base, tmp_path, start_runner):
    sync = tmp_path / "sync"
    sync.mkdir()
    runner = start_runner(
        ["--lower", lower, "-v", f"{sync}:/sync", "--", "sh", "-c",
         "touch /sync/ready; while [ ! -e /sync/go ]; do sleep 0.02; done"])
    try:
        _wait_for(sync / "ready", runner)
        ours = mounts_matching(state_base)
        volume_binds = mounts_matching(str(sync))
    finally:
        (sync / "go").touch()
        assert runner.wait(timeout=30) == 0
    # The host sees exactly one mount of the run: the union it serves; the
    # container's /proc, /dev, /sys, /tmp and the volume are not there.
    assert len(ours) == 1 and ours[0].split()[4].endswith("/root")
    assert volume_binds == []


def test_writes_land_in_the_upper_and_the_lower_is_untouched(lower, state_base, tmp_path):
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    lower_before = snapshot(lower)
    result = run(lower, state_base, "--upper", str(upper), "--work", str(work), "--",
                 "sh", "-c", "echo new > /new.txt; echo changed >> /etc/greeting; "
                 "rm /data/doomed; cat /etc/greeting; ls /data")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello from the lower layer", "changed", "plain.txt",
                                          "sub"]
    assert (upper / "new.txt").read_text() == "new\n"
    assert (upper / "etc" / "greeting").read_text() == "hello from the lower layer\nchanged\n"
    assert snapshot(lower) == lower_before
    # rm of a lower file leaves a whiteout: kernel form (char 0/0) or OCI form.
    doomed = upper / "data" / "doomed"
    if os.path.lexists(doomed):
        st = os.lstat(doomed)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    else:
        assert (upper / "data" / ".wh.doomed").exists()
    # The same upper, run again: the deletion and the new file persist.
    again = run(lower, state_base, "--upper", str(upper), "--work", str(work), "--",
                "sh", "-c", "ls /data; cat /new.txt")
    assert again.stdout.splitlines() == ["plain.txt", "sub", "new"], again.stderr


def test_throwaway_upper_is_removed_unless_kept(lower, state_base):
    result = run(lower, state_base, "--", "sh", "-c", "echo gone > /scratch")
    assert result.returncode == 0, result.stderr
    assert os.listdir(state_base) == []
    kept = run(lower, state_base, "--keep", "--", "sh", "-c", "echo kept > /scratch")
    assert kept.returncode == 0, kept.stderr
    message = kept.stderr.strip()
    assert message.startswith("unionfs run: kept the upper layer in ")
    upper = message.split(" in ", 1)[1].split(" (")[0]
    try:
        assert open(os.path.join(upper, "scratch")).read() == "kept\n"
    finally:
        subprocess.run(["rm", "-rf", os.path.dirname(upper)], check=True)


def test_two_containers_at_once_on_the_same_lower(lower, state_base, tmp_path, start_runner):
    sync = tmp_path / "sync"
    sync.mkdir()
    runners, uppers = [], []
    for name in ("one", "two"):
        upper, work = tmp_path / f"upper-{name}", tmp_path / f"work-{name}"
        upper.mkdir()
        work.mkdir()
        uppers.append(upper)
        # Each writes its name, then waits until both are running, then reads back.
        script = (f"echo {name} > /etc/greeting; touch /sync/{name}; "
                  "while [ ! -e /sync/one ] || [ ! -e /sync/two ]; do sleep 0.02; done; "
                  "cat /etc/greeting")
        runners.append(start_runner(
            ["--lower", lower, "--upper", str(upper), "--work", str(work),
             "-v", f"{sync}:/sync", "--", "sh", "-c", script],
            stdout=subprocess.PIPE, text=True))
    outputs = [r.communicate(timeout=60)[0] for r in runners]
    assert [r.returncode for r in runners] == [0, 0]
    assert outputs == ["one\n", "two\n"]
    assert [(u / "etc" / "greeting").read_text() for u in uppers] == ["one\n", "two\n"]
    assert open(os.path.join(lower, "etc", "greeting")).read() == "hello from the lower layer\n"


def _wait_or_kill(pid, limit=30.0):
    """The wait status of child `pid`, killing it if it is still there after `limit` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _wait_for(path, process, limit=30.0):
    deadline = time.monotonic() + limit
    while not path.exists():
        assert process.poll() is None, "the runner exited early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_runner_stops_the_container_and_cleans_up(lower, state_base, tmp_path,
                                                                signum, start_runner):
    sync = tmp_path / "sync"
    sync.mkdir()
    runner = start_runner(
        ["--lower", lower, "-v", f"{sync}:/sync", "--", "sh", "-c",
         "touch /sync/ready; exec sleep 1000"])
    _wait_for(sync / "ready", runner)
    runner.send_signal(signum)
    assert runner.wait(timeout=30) == 128 + signum
    assert not processes_mentioning("sleep 1000")


def test_a_command_that_ignores_sigterm_is_killed_by_a_second_signal(
        lower, state_base, tmp_path, start_runner):
    sync = tmp_path / "sync"
    sync.mkdir()
    runner = start_runner(
        ["--lower", lower, "-v", f"{sync}:/sync", "--", "sh", "-c",
         "trap '' TERM; touch /sync/ready; sleep 1000; sleep 1000"])
    _wait_for(sync / "ready", runner)
    runner.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # not an assertion on time: the first signal must be delivered first
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 128 + signal.SIGKILL
    assert not processes_mentioning("sleep 1000")


HUNDRED_RUNS_DRIVER = """
import os, sys, time
import unionfs.cli  # what the `unionfs run` command line has loaded
from runner.plan import build_plan
from runner.run import execute
plan = build_plan(["/bin/true"], lowers=[sys.argv[1]])
fds_before = len(os.listdir("/proc/self/fd"))
started = time.monotonic()
for i in range(100):
    status = execute(plan)
    if status != 0:
        sys.exit(f"run {i}: status {status}")
elapsed = time.monotonic() - started
print(fds_before, len(os.listdir("/proc/self/fd")), f"{elapsed:.1f}")
"""


def test_hundred_runs_leave_nothing_behind(lower, state_base):
    # One driver process runs the runner 100 times in a row (the command line
    # around it is exercised by every other test; here it would only add an
    # interpreter start per run). Each run mounts, runs, unmounts, cleans up.
    result = subprocess.run([sys.executable, "-c", HUNDRED_RUNS_DRIVER, lower], cwd="/",
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TMPDIR=state_base))
    assert result.returncode == 0, result.stderr
    fds_before, fds_after, elapsed = result.stdout.split()
    assert fds_after == fds_before, "the runner leaks file descriptors"
    print(f"100 runs of /bin/true: {elapsed} s ({float(elapsed) * 10:.0f} ms a run)")
    assert not processes_mentioning(lower)
    # state_base's teardown checks mounts, processes and state dirs.


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "no such option"),
    (["--net", "bridge"], "--net"),
    (["-u", "root"], "-u"),
    (["-v", "relative-only"], "-v"),
    (["--upper", "/tmp"], "--upper and --work go together"),
    ([], "missing command"),
])
def test_bad_options_give_a_one_line_usage_error(lower, state_base, args, message):
    result = run(lower, state_base, *args, *(["--", "true"] if args else []))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert message.lower() in result.stderr.lower()
    assert result.stderr.startswith("unionfs run: ")


def test_missing_layer_is_a_usage_error(state_base, tmp_path):
    result = run_unionfs(["--lower", str(tmp_path / "nope"), "--", "true"])
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1


def test_rootfs_runs_in_an_existing_tree_without_mounting(lower, state_base):
    result = run_unionfs(["--rootfs", lower, "--", "sh", "-c", "cat /etc/greeting; echo $$"],
                         env=dict(os.environ, TMPDIR=state_base))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello from the lower layer", "2"]


# Pure option rules (no kernel).

def test_parse_user():
    assert parse_user(None) == (0, 0)
    assert parse_user("1000") == (1000, 0)
    assert parse_user("1000:100") == (1000, 100)
    for bad in ("root", "1:x", "-1", ""):
        with pytest.raises(PlanError):
            parse_user(bad)


def test_parse_volume(tmp_path):
    volume = parse_volume(f"{tmp_path}:/mnt:ro")
    assert (volume.source, volume.target, volume.read_only, volume.is_dir) == (
        str(tmp_path), "/mnt", True, True)
    for bad in ("x", f"{tmp_path}:rel", f"{tmp_path}:/a:/b:ro", f"{tmp_path / 'no'}:/a"):
        with pytest.raises(PlanError):
            parse_volume(bad)


def test_parse_env_takes_host_values_for_bare_keys():
    env = dict(parse_env(["A=1", "B", "C=x=y", "MISSING"], host_env={"B": "2"}))
    assert env["A"] == "1" and env["B"] == "2" and env["C"] == "x=y"
    assert "MISSING" not in env and env["PATH"].startswith("/usr/local/sbin")


def test_plan_rejects_conflicting_layers(tmp_path):
    with pytest.raises(PlanError):
        build_plan(["true"], lowers=[str(tmp_path)], rootfs=str(tmp_path))
    with pytest.raises(PlanError):
        build_plan(["true"], lowers=[str(tmp_path)], upper=str(tmp_path), work=str(tmp_path))
    with pytest.raises(PlanError):
        build_plan([], lowers=[str(tmp_path)])


def test_rootless_run_uses_a_user_namespace(lower, tmp_path_factory):
    # An unprivileged user (nobody) runs a world-readable copy of the rootfs with
    # --rootfs; the union itself would need /dev/fuse, which is 0600 here. The
    # runner is called in a forked child that dropped to nobody, so the test
    # does not depend on nobody being able to start this interpreter.
    from runner.run import execute  # imported here: nobody may not read the stdlib
    public = tempfile.mkdtemp(prefix="unionfs-rootless-test-", dir="/tmp")
    try:
        os.chmod(public, 0o755)
        root = build_rootfs(os.path.join(public, "root"))
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 99
            try:
                os.close(read_end)
                os.dup2(write_end, 1)
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                os.chdir(public)
                os.environ["TMPDIR"] = public
                plan = build_plan(["sh", "-c", "id -u; echo $$; hostname; "
                                   "cat /proc/self/uid_map; "
                                   "grep -c -E ' /(proc|sys|dev|tmp) ' /proc/mounts"],
                                  rootfs=root, hostname="rootless")
                assert plan.rootless
                status = execute(plan)
            except BaseException as e:  # the child must never return into pytest
                os.write(1, f"child failed: {e!r}".encode())
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            output = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, output
        lines = output.split()
        assert lines[:3] == ["0", "2", "rootless"]
        assert lines[3:6] == ["0", "65534", "1"]
        assert lines[6] == "4"
    finally:
        shutil.rmtree(public)


def _fake_mount_program(tmp_path, body):
    """A stand-in mount program (the runner's documented debugging hook)."""
    program = tmp_path / "mount-program"
    program.write_text("#!/bin/sh\n" + body + "\n")
    program.chmod(0o755)
    return str(program)


def test_a_failing_mount_is_one_line_and_leaves_nothing(lower, state_base, tmp_path):
    program = _fake_mount_program(tmp_path, 'echo "fake: cannot mount $4" >&2; exit 1')
    result = run(lower, state_base, "--", "true",
                 env=dict(os.environ, TMPDIR=state_base, UNIONFS_RUN_MOUNT_PROGRAM=program))
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "fake: cannot mount" in result.stderr


def test_sigterm_while_mounting_stops_the_server_and_cleans_up(
        lower, state_base, tmp_path, start_runner):
    ready = tmp_path / "ready"
    program = _fake_mount_program(tmp_path, f"touch {ready}; exec sleep 1001")
    runner = start_runner(
        ["--lower", lower, "--", "true"],
        env=dict(os.environ, TMPDIR=state_base, UNIONFS_RUN_MOUNT_PROGRAM=program))
    _wait_for(ready, runner)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 128 + signal.SIGTERM
    assert not processes_mentioning("sleep 1001")


def test_interactive_ctrl_c_reaches_the_command_not_the_runner(lower, state_base):
    # On a terminal the command's process group owns it, as a shell's job would:
    # Ctrl-C interrupts `sleep` inside, and the container keeps running.
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TMPDIR"] = state_base
        os.execv(UNIONFS, [UNIONFS, "run", "--lower", lower, "--", "sh", "-i"])
    seen = b""

    def read_until(marker, limit=30.0):
        nonlocal seen
        deadline = time.monotonic() + limit
        while marker not in seen:
            assert time.monotonic() < deadline, f"never saw {marker!r} in {seen!r}"
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        return seen

    try:
        read_until(b"# ")
        os.write(fd, b"sleep 1002; echo after-sleep\n")
        read_until(b"sleep 1002")
        while not processes_mentioning("sleep 1002"):
            time.sleep(0.02)
        os.write(fd, b"\x03")
        os.write(fd, b"echo alive; exit 5\n")
        read_until(b"alive")
    finally:
        status = _wait_or_kill(pid)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5
    assert not processes_mentioning("sleep 1002")


def test_chroot_only_where_pivot_root_is_impossible_and_it_says_so(state_base):
    # pivot_root cannot move the host's own root ("/"): the runner falls back
    # to chroot and warns; the container's mounts still stay in its namespace.
    result = run_unionfs(["--rootfs", "/", "--", "sh", "-c", "echo $$; hostname"],
                         env=dict(os.environ, TMPDIR=state_base))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "unionfs"]
    assert "pivot_root impossible" in result.stderr and "chroot" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_plain_run_says_nothing(lower, state_base):
    result = run(lower, state_base, "--", "sh", "-c", "cat /etc/greeting")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "hello from the lower layer\n", "")


def test_sigkill_of_the_runner_still_leaves_no_mount_and_no_process(
        lower, state_base, tmp_path, start_runner):
    # No teardown can run in a SIGKILLed runner: the container dies with it
    # (PR_SET_PDEATHSIG) and the server, told by SIGTERM, unmounts and exits.
    # Only the state dir (the throwaway upper) is left, by design.
    sync = tmp_path / "sync"
    sync.mkdir()
    runner = start_runner(
        ["--lower", lower, "-v", f"{sync}:/sync", "--", "sh", "-c",
         "touch /sync/ready; exec sleep 1004"])
    _wait_for(sync / "ready", runner)
    runner.kill()
    runner.wait(timeout=30)
    deadline = time.monotonic() + 30
    while processes_mentioning(state_base) or mounts_matching(state_base) \
            or processes_mentioning("sleep 1004"):
        assert time.monotonic() < deadline, "the server or the container outlived the runner"
        time.sleep(0.05)
    for leftover in os.listdir(state_base):
        shutil.rmtree(os.path.join(state_base, leftover))


# The union server's process started at the runner's start (runner.prestart,
# unionfs.serve.process.start_spare).

def test_an_early_server_is_started_only_for_a_layer_stack():
    from runner.prestart import is_console_run, wanted
    assert wanted(["--lower", "/l", "--", "true"], environ={})
    assert wanted(["--lower=/l", "-e", "A=1", "--", "sh", "--rootfs"], environ={})
    assert not wanted(["--rootfs", "/r", "--", "true"], environ={})
    assert not wanted(["--lower", "/l", "--help"], environ={})
    assert not wanted(["--", "--lower"], environ={})
    assert not wanted(["--lower", "/l", "--", "true"],
                      environ={"UNIONFS_RUN_MOUNT_PROGRAM": "/usr/bin/fuse-overlayfs"})
    assert is_console_run(["/venv/bin/unionfs", "run", "--lower", "/l"])
    assert not is_console_run(["/venv/bin/unionfs", "mount", "run"])
    assert not is_console_run(["pytest", "run"])


def test_a_usage_error_leaves_no_early_server(lower, state_base):
    marker = f"early-server-marker-{os.getpid()}"
    result = run(lower, state_base, "--net", "bogus", "--", "echo", marker)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not processes_mentioning(marker)  # killed and reaped before the runner exits


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.08])
def test_sigkill_of_the_runner_at_start_leaves_no_early_server(lower, state_base, start_runner,
                                                               delay):
    marker = f"early-sigkill-marker-{os.getpid()}-{delay}"
    runner = start_runner(["--lower", lower, "--", "echo", marker],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    runner.kill()
    runner.wait(timeout=30)
    deadline = time.monotonic() + 30
    while processes_mentioning(marker) or mounts_matching(state_base):
        assert time.monotonic() < deadline, "the early server outlived the runner"
        time.sleep(0.05)
    for leftover in os.listdir(state_base):
        shutil.rmtree(os.path.join(state_base, leftover))


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.06, 0.1, 0.15])
def test_sigterm_to_the_runner_at_start_leaves_nothing(lower, state_base, start_runner, delay):
    # Before the runner's handlers exist SIGTERM simply kills it (nothing was
    # created yet); afterwards it tears down whatever the start got to.
    marker = f"early-sigterm-marker-{os.getpid()}-{delay}"
    # the marker rides as sh's $0: busybox sleep would refuse it as an argument
    runner = start_runner(["--lower", lower, "--", "sh", "-c", "sleep 10", marker],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=30)
    assert runner.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), stderr
    deadline = time.monotonic() + 30
    while processes_mentioning(marker):
        assert time.monotonic() < deadline, "a process outlived the runner"
        time.sleep(0.05)
    # state_base's teardown checks mounts and state dirs.


EARLY_SERVER_DRIVER = """
import os, sys
from unionfs.serve import child, process
from runner.plan import build_plan
from runner.run import RunError, execute
mode, lower, doomed = sys.argv[1:]
if mode == "failing-import":
    def import_server_modules():
        raise RuntimeError("no pyfuse3 today")
    child.import_server_modules = import_server_modules
plan = build_plan(["/bin/true"], lowers=[doomed if mode == "failing-mount" else lower])
if mode == "failing-mount":
    os.rmdir(doomed)  # gone after the plan was checked: the server cannot open it
pid = process.start_spare().pid
if mode == "claimed":
    def no_second_server(*args):
        raise AssertionError("the early server was not used")
    process.spawn = no_second_server
elif mode == "gone":
    os.kill(pid, 9)
    os.waitpid(pid, 0)
try:
    status = execute(plan)
except RunError as e:
    print(e)
    sys.exit(3)
print(status)
"""


@pytest.mark.parametrize("mode, status, output", [
    ("claimed", 0, "0"),
    ("gone", 0, "0"),   # a server is forked the ordinary way
    ("failing-mount", 3, "mounting the layers failed: unionfs: lower layer"),
    ("failing-import", 3, "mounting the layers failed: unionfs server: RuntimeError"),
])
def test_the_early_server_serves_or_reports_in_one_line(lower, state_base, tmp_path, mode,
                                                        status, output):
    doomed = tmp_path / "doomed-lower"
    doomed.mkdir()
    result = subprocess.run([sys.executable, "-c", EARLY_SERVER_DRIVER, mode, lower, str(doomed)],
                            cwd="/", capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, TMPDIR=state_base))
    assert result.returncode == status, result.stderr
    assert result.stdout.startswith(output), result.stdout
    assert len(result.stdout.splitlines()) == 1 and result.stderr == ""
    assert not processes_mentioning(EARLY_SERVER_DRIVER.splitlines()[1])


def test_startup_bench_returns_records_for_every_contender_it_ran():
    from bench.startup import END_TO_END, PREMOUNTED, format_table, measure_startup
    notes = {}
    records = measure_startup(reps=1, warmup=0, notes=notes)
    assert records, notes
    for record in records:
        assert set(record) == {"impl", "workload", "metric", "value", "unit", "rep"}
        assert record["workload"] == "startup" and record["unit"] == "ms"
        assert record["metric"] in (PREMOUNTED, END_TO_END) and record["value"] > 0
    ran = {(r["impl"], r["metric"]) for r in records}
    assert ("unionfs-run(in-process)", PREMOUNTED) in ran, notes
    assert ("unionfs-run", END_TO_END) in ran, notes
    assert not [note for note in notes.values() if note.startswith("failed")], notes
    assert "unionfs-run" in format_table(records)


def test_net_host_shares_the_hosts_interfaces(lower, state_base):
    host_links = len([n for n in os.listdir("/sys/class/net")])
    result = run(lower, state_base, "--net", "host", "--", "sh", "-c", "ls /sys/class/net | wc -l")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == host_links
    isolated = run(lower, state_base, "--", "sh", "-c", "ls /sys/class/net")
    assert isolated.stdout.split() == ["lo"]
