"""The plan's mount records carried out without privilege: the /sys bind that
replaces sysfs for a rootless run on the host's network (a user namespace
without its own network namespace may not mount sysfs)."""
import os
import shutil
import tempfile

import pytest

from runner_rootfs import build_rootfs

pytestmark = pytest.mark.timeout(120)


def run_as_nobody(argv, **options):
    """execute() a --rootfs plan in a forked child that dropped to nobody; (status, stdout)."""
    from runner.plan import build_plan
    from runner.run import execute
    public = tempfile.mkdtemp(prefix="unionfs-rootless-mounts-", dir="/tmp")
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
                plan = build_plan(argv, rootfs=root, **options)
                os.write(1, f"rootless={plan.rootless}\n".encode())
                status = execute(plan)
            except BaseException as e:  # the child must never return into pytest
                os.write(1, f"child failed: {e!r}".encode())
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            output = f.read()
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), output
    finally:
        shutil.rmtree(public)


def test_rootless_on_the_hosts_network_gets_a_read_only_bind_of_sys():
    if os.geteuid() != 0:
        pytest.skip("the test drops from root to nobody")
    status, output = run_as_nobody(
        ["sh", "-c", "grep ' /sys ' /proc/mounts; ls /sys/class/net | wc -l; "
                     "touch /sys/x 2>/dev/null || echo read-only"], net="host")
    assert status == 0, output
    lines = output.splitlines()
    assert lines[0] == "rootless=True"
    fstype, options = lines[1].split()[2:4]
    assert fstype == "sysfs" and options.split(",")[:4] == ["ro", "nosuid", "nodev", "noexec"]
    assert int(lines[2]) == len(os.listdir("/sys/class/net"))  # the host's interfaces
    assert lines[3] == "read-only"
