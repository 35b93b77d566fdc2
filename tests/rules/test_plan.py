"""The runner's plan as data: the container's mounts as operation records, built
from the options alone, each describing itself in one line. Pure: no kernel."""
import pytest

from runner.mounts import DEVICES, HostBind, Mount, RootMount, SwitchRoot, Symlink
from runner.plan import Plan, build_plan
from unionfs.sys.capabilities import is_privileged


def plan(tmp_path, **options):
    options.setdefault("rootless", False)
    return build_plan(["sh", "-c", "echo 'hi there'"], lowers=[str(tmp_path)], **options)


def test_the_root_is_switched_after_proc_and_sysfs_and_before_dev(tmp_path):
    ops = plan(tmp_path).mounts
    kinds = [type(op) for op in ops]
    switch = kinds.index(SwitchRoot)
    assert ops[0] == RootMount()
    assert [op.target for op in ops[1:switch]] == ["/proc", "/sys"]
    after = [op.target if not isinstance(op, Symlink) else op.path for op in ops[switch + 1:]]
    assert after[0] == "/dev"
    assert after.index("/tmp") == len(after) - 1  # no volumes: /tmp is last


def test_dev_gets_the_host_nodes_a_new_devpts_shm_and_the_links(tmp_path):
    ops = plan(tmp_path).mounts
    binds = [op for op in ops if isinstance(op, HostBind)]
    assert [b.source for b in binds] == [f"/dev/{name}" for name in DEVICES]
    assert all(b.target == b.source and not b.is_dir and not b.recursive for b in binds)
    mounts = {op.target: op for op in ops if isinstance(op, Mount)}
    assert mounts["/dev"].fstype == "tmpfs" and "nosuid" in mounts["/dev"].flags
    assert mounts["/dev/pts"].fstype == "devpts" and "newinstance" in mounts["/dev/pts"].data
    assert mounts["/dev/shm"].data == "mode=1777"
    links = {op.path: op.target for op in ops if isinstance(op, Symlink)}
    assert links == {"/dev/ptmx": "pts/ptmx", "/dev/fd": "/proc/self/fd",
                     "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
                     "/dev/stderr": "/proc/self/fd/2"}


def devpts_options(plan):
    return next(op.data for op in plan.mounts if getattr(op, "fstype", None) == "devpts")


def test_rootless_devpts_has_no_tty_group(tmp_path):
    assert devpts_options(plan(tmp_path)) == "newinstance,ptmxmode=0666,mode=0620,gid=5"
    assert devpts_options(plan(tmp_path, rootless=True)) == "newinstance,ptmxmode=0666,mode=0620"


@pytest.mark.parametrize("rootless, net, fallback", [
    (False, "none", False), (False, "host", False), (True, "none", False), (True, "host", True),
])
def test_sysfs_is_a_read_only_bind_only_rootless_on_the_hosts_network(tmp_path, rootless, net,
                                                                      fallback):
    sysfs = [op for op in plan(tmp_path, rootless=rootless, net=net).mounts
             if getattr(op, "target", None) == "/sys"]
    assert len(sysfs) == 1
    if fallback:
        assert sysfs[0] == HostBind(source="/sys", target="/sys",
                                    flags=("ro", "nosuid", "nodev", "noexec"), recursive=True)
    else:
        assert isinstance(sysfs[0], Mount) and sysfs[0].fstype == "sysfs"
        assert sysfs[0].flags[0] == "ro"


def test_volumes_are_bound_last_in_their_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    ops = plan(tmp_path, volumes=[f"{tmp_path / 'a'}:/mnt/a:ro", f"{tmp_path / 'f'}:/etc/f"]).mounts
    assert ops[-2:] == (
        HostBind(source=str(tmp_path / "a"), target="/mnt/a", flags=("ro",), is_dir=True,
                 recursive=True),
        HostBind(source=str(tmp_path / "f"), target="/etc/f", flags=(), is_dir=False,
                 recursive=True))


def test_every_operation_describes_itself_in_one_line(tmp_path):
    (tmp_path / "v").mkdir()
    for rootless in (False, True):
        ops = plan(tmp_path, rootless=rootless, net="host",
                   volumes=[f"{tmp_path / 'v'}:/v:ro"]).mounts
        lines = [op.describe() for op in ops]
        assert all(line and "\n" not in line for line in lines)
        assert len(set(lines)) == len(lines)  # each says what is particular to it
    assert HostBind(source="/h", target="/c", flags=("ro",), recursive=True).describe() == \
        "bind host /h on /c (ro,recursive)"
    assert Mount(fstype="tmpfs", target="/tmp", flags=("nosuid",), data="mode=1777"
                 ).describe() == "mount tmpfs on /tmp (nosuid,mode=1777)"


def test_the_dry_run_lines_end_with_the_command(tmp_path):
    lines = plan(tmp_path, hostname="box").describe()
    assert lines[0].startswith(f"root: a union of {tmp_path}")
    assert "throwaway upper" in lines[0]
    assert lines[-1] == "command: sh -c 'echo '\"'\"'hi there'\"'\"''"
    assert "hostname box" in lines[-2]
    assert len(lines) == len(plan(tmp_path).mounts) + 4


def test_the_same_options_give_the_same_plan(tmp_path):
    assert plan(tmp_path) == plan(tmp_path)
    assert plan(tmp_path).mounts != plan(tmp_path, rootless=True).mounts


def test_rootless_by_default_unless_privileged(tmp_path):
    # decided by capabilities (CAP_SYS_ADMIN in the initial user namespace), not the uid
    assert Plan(argv=("true",), lowers=(str(tmp_path),)).rootless is (not is_privileged())
