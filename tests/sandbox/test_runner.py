"""`unionfs run`: real namespaces and real mounts on a busybox rootfs; what the
container sees and what the layers get. (Signals, teardown and the early
server: test_runner_lifecycle.py.)

Every run gets its own TMPDIR (where the runner keeps its state dir), so a
test can check afterwards that nothing is left: no state dir, no mount, no
process (conftest.py).
"""
import os
import shutil
import socket
import stat
import subprocess
import tempfile

import pytest

from runner.plan import PlanError, build_plan, parse_env, parse_user, parse_volume
from runner_rootfs import (
    UNIONFS,
    build_rootfs,
    mounts_matching,
    processes_mentioning,
    run_on,
    run_unionfs,
    snapshot,
    wait_for_path,
)

pytestmark = pytest.mark.timeout(120)
run = run_on



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
        wait_for_path(sync / "ready", runner)
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


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "no such option"),
    (["--net", "bridge"], "--net"),
    (["-u", "1:"], "-u"),
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
    # (uid, gid, what is left to look up in the container's /etc/passwd and /etc/group)
    assert parse_user(None) == (0, 0, None)
    assert parse_user("1000:100") == (1000, 100, None)
    assert parse_user("1000") == (1000, 0, (1000, None))     # the gid is the user's
    assert parse_user("root") == (0, 0, ("root", None))
    assert parse_user("1:x") == (1, 0, (1, "x"))
    for bad in ("-1", "", "1:", ":1", "a b", "4294967295", "a:b:c"):
        with pytest.raises(PlanError, match="bad -u"):
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


def test_net_host_shares_the_hosts_interfaces(lower, state_base):
    host_links = len([n for n in os.listdir("/sys/class/net")])
    result = run(lower, state_base, "--net", "host", "--", "sh", "-c", "ls /sys/class/net | wc -l")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == host_links
    isolated = run(lower, state_base, "--", "sh", "-c", "ls /sys/class/net")
    assert isolated.stdout.split() == ["lo"]
