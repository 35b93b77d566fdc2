"""`unionfs run`'s life: signals to the runner, teardown on every path, many runs
in a row, a failing mount, the union server's process started early.

Every run gets its own TMPDIR, checked empty afterwards (conftest.py).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from runner_rootfs import (
    UNIONFS,
    mounts_matching,
    processes_mentioning,
    run_on,
    wait_for_path,
    wait_or_kill,
)

pytestmark = pytest.mark.timeout(120)
run = run_on


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_runner_stops_the_container_and_cleans_up(lower, state_base, tmp_path,
                                                                signum, start_runner):
    sync = tmp_path / "sync"
    sync.mkdir()
    runner = start_runner(
        ["--lower", lower, "-v", f"{sync}:/sync", "--", "sh", "-c",
         "touch /sync/ready; exec sleep 1000"])
    wait_for_path(sync / "ready", runner)
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
    wait_for_path(sync / "ready", runner)
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
    wait_for_path(ready, runner)
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
        status = wait_or_kill(pid)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5
    assert not processes_mentioning("sleep 1002")


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
    wait_for_path(sync / "ready", runner)
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
import os, sys  # the early-server driver (a line no other process has)
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
    assert ("unionfs-run(image)", END_TO_END) in ran, notes
    assert not [note for note in notes.values() if note.startswith("failed")], notes
    assert "unionfs-run" in format_table(records)
