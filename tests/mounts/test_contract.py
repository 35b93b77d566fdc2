"""The command line and process contract: daemonizing, unmount, fuse-overlayfs
compatibility, mount(8) and fstab, and clear one-line errors for bad input."""
import os
import signal
import subprocess

import pytest

from mountutil import FUSE_UNIONFS, UNIONFS, Stack, force_unmount, wait_for


@pytest.fixture
def stack(make_stack):
    s = make_stack()
    (s.lowers[0] / "top").write_text("top")
    (s.lowers[1] / "bottom").write_text("bottom")
    return s


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=30, **kw)


def server_pids(mnt):
    out = run(["pgrep", "-f", f"{mnt}$"]).stdout.split()
    return [int(p) for p in out]


def holders(path):
    """Processes with an fd or cwd under path (to explain an EBUSY)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/cwd")] + [
                os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if any(link.startswith(str(path)) for link in links):
            found.append((pid, cmd[:200]))
    return found


def lowerdir(stack):
    return ":".join(map(str, stack.lowers))


def test_mount_returns_once_live_and_umount_stops_the_server(stack):
    res = run([UNIONFS, "mount", "--lower", str(stack.lowers[0]), "--lower",
               str(stack.lowers[1]), "--upper", str(stack.upper), "--work", str(stack.work),
               str(stack.mnt)])
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(stack.mnt)) == ["bottom", "top"]   # no waiting needed
    pids = server_pids(stack.mnt)
    assert len(pids) == 1
    assert run([UNIONFS, "umount", str(stack.mnt)]).returncode == 0
    wait_for(lambda: not os.path.exists(f"/proc/{pids[0]}"), timeout=5, what="server exit")


@pytest.mark.parametrize("unmount", [["umount"], [UNIONFS, "umount"]])
def test_layers_can_be_unmounted_on_the_next_line(tmp_path, unmount):
    stack = Stack(tmp_path)
    try:
        for _ in range(5):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stack.lowers[0])], check=True)
            (stack.lowers[0] / "f").write_text("x")
            assert run([FUSE_UNIONFS, "-o", f"lowerdir={lowerdir(stack)}",
                        str(stack.mnt)]).returncode == 0
            assert (stack.mnt / "f").read_text() == "x"
            subprocess.run(unmount + [str(stack.mnt)], check=True)
            res = run(["umount", str(stack.lowers[0])])     # EBUSY if a layer fd lingered
            assert res.returncode == 0, (res.stderr, holders(stack.lowers[0]))
    finally:
        force_unmount(stack.mnt)
        subprocess.run(["umount", "-l", str(stack.lowers[0])], capture_output=True)


def test_fuse_overlayfs_style_with_source_and_generic_flags(stack):
    res = run([FUSE_UNIONFS, "overlay", str(stack.mnt), "-o",
               f"rw,lowerdir={lowerdir(stack)},upperdir={stack.upper},workdir={stack.work},"
               ",dev,suid,noatime"])
    assert res.returncode == 0, res.stderr
    (stack.mnt / "new").write_text("x")
    assert (stack.upper / "new").read_text() == "x"
    run(["umount", str(stack.mnt)])


def test_relative_and_symlinked_layer_paths(stack, tmp_path):
    os.symlink(stack.lowers[0], tmp_path / "link-to-l1")
    res = run([FUSE_UNIONFS, "-o", f"lowerdir=link-to-l1:{stack.lowers[1].name},"
               f"upperdir={stack.upper.name},workdir={stack.work.name}", stack.mnt.name],
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(stack.mnt)) == ["bottom", "top"]


def test_mount_t_fuse_type_works_with_the_default_path(stack):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = run(["mount", "-t", "fuse.fuse-unionfs", "overlay", str(stack.mnt), "-o",
               f"lowerdir={lowerdir(stack)},upperdir={stack.upper},workdir={stack.work}"],
              env=env)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(stack.mnt)) == ["bottom", "top"]
    assert run(["umount", str(stack.mnt)]).returncode == 0


def test_fstab_entry_mounts(stack, tmp_path):
    fstab = tmp_path / "fstab"
    fstab.write_text(f"overlay {stack.mnt} fuse.fuse-unionfs "
                     f"lowerdir={lowerdir(stack)},upperdir={stack.upper},"
                     f"workdir={stack.work},nofail,x-systemd.requires=foo 0 0\n")
    res = run(["mount", "--fstab", str(fstab), str(stack.mnt)],
              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert res.returncode == 0, res.stderr
    assert (stack.mnt / "top").read_text() == "top"


def test_version_answers():
    for prog in (UNIONFS, FUSE_UNIONFS):
        res = run([prog, "--version"])
        assert res.returncode == 0 and "version" in res.stdout.lower()


def test_foreground_server_unmounts_on_sigterm(stack):
    proc = subprocess.Popen([FUSE_UNIONFS, "-f", "-o", f"lowerdir={lowerdir(stack)}",
                             str(stack.mnt)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.ismount(stack.mnt), what="mount")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not os.path.ismount(stack.mnt)
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_lazily_unmounted_busy_mount_still_stops_the_server(stack):
    assert run([FUSE_UNIONFS, "-o", f"lowerdir={lowerdir(stack)}",
                str(stack.mnt)]).returncode == 0
    pid = server_pids(stack.mnt)[0]
    fd = os.open(stack.mnt / "top", os.O_RDONLY)
    try:
        subprocess.run(["umount", "-l", str(stack.mnt)], check=True)
    finally:
        os.close(fd)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5, what="server exit")


# ---- bad input: one line, the right status, nothing mounted ----------------------

def bad(stack, tmp_path):
    up, wk, l1, l2 = str(stack.upper), str(stack.work), str(stack.lowers[0]), str(stack.lowers[1])
    (tmp_path / "file").write_text("x")
    other_fs = tmp_path / "tmpfs"
    other_fs.mkdir()
    return {
        "missing lower": ([f"lowerdir={tmp_path}/nope"], 1, "does not exist"),
        "lower is a file": ([f"lowerdir={tmp_path}/file"], 1, "not a directory"),
        "upper inside lower": ([f"lowerdir={l1},upperdir={l1}/sub,workdir={wk}"], 1, "overlap"),
        "lower inside upper": ([f"lowerdir={up}/sub,upperdir={up},workdir={wk}"], 1, "overlap"),
        "work without upper": ([f"lowerdir={l1},workdir={wk}"], 1, "together"),
        "workdir on other fs": ([f"lowerdir={l1},upperdir={up},workdir={other_fs}"], 1,
                                "filesystem"),
        "unknown option": ([f"lowerdir={l1},bogus=1"], 2, "unknown option"),
        "missing mountpoint": ([f"lowerdir={l1}:{l2}"], 1, "does not exist"),
        "no lowerdir": (["upperdir=" + up], 1, "no lower layer"),
    }


CASES = ["missing lower", "lower is a file", "upper inside lower", "lower inside upper",
         "work without upper", "workdir on other fs", "unknown option", "missing mountpoint",
         "no lowerdir"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line(stack, tmp_path, case):
    (stack.lowers[0] / "sub").mkdir()
    (stack.upper / "sub").mkdir()
    opts, status, words = bad(stack, tmp_path)[case]
    if case == "workdir on other fs":
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "tmpfs")], check=True)
    mnt = str(tmp_path / "nomnt") if case == "missing mountpoint" else str(stack.mnt)
    try:
        res = run([FUSE_UNIONFS, "-o", opts[0], mnt])
    finally:
        if case == "workdir on other fs":
            subprocess.run(["umount", str(tmp_path / "tmpfs")])
    assert res.returncode == status
    lines = res.stderr.strip().splitlines()
    assert words in lines[0] and "Traceback" not in res.stderr
    assert len(lines) == 1
    assert "b'" not in lines[0] and "'/" not in lines[0]     # plain paths, not reprs
    assert not os.path.ismount(stack.mnt)


def kernel_refuses(opts, mnt):
    res = run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)])
    if res.returncode == 0:
        run(["umount", str(mnt)])
    return res.returncode != 0


OPTION_CASES = {
    "empty last lower": "lowerdir={l1}:",
    "empty first lower": "lowerdir=:{l1}",
    "empty middle lower": "lowerdir={l1}:::{l2}",
    "empty upper and work": "lowerdir={l1},upperdir=,workdir=",
    "empty upper": "lowerdir={l1},upperdir=,workdir={wk}",
    "an empty key": "lowerdir={l1},=",
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_the_kernel_refuses_are_refused_in_one_line(stack, case):
    opts = OPTION_CASES[case].format(l1=stack.lowers[0], l2=stack.lowers[1], wk=stack.work)
    assert kernel_refuses(opts, stack.mnt)
    for argv in ([FUSE_UNIONFS, "-o", opts, str(stack.mnt)],
                 [UNIONFS, "mount", "-o", opts, str(stack.mnt)]):
        res = run(argv)
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not os.path.ismount(stack.mnt)


def test_already_mounted_mountpoint_is_refused(stack):
    opts = f"lowerdir={lowerdir(stack)}"
    assert run([FUSE_UNIONFS, "-o", opts, str(stack.mnt)]).returncode == 0
    res = run([FUSE_UNIONFS, "-o", opts, str(stack.mnt)])
    assert res.returncode == 1 and "already a mount point" in res.stderr


def test_workdir_in_use_by_another_mount_is_refused(stack, tmp_path):
    opts = f"lowerdir={stack.lowers[0]},upperdir={stack.upper},workdir={stack.work}"
    assert run([FUSE_UNIONFS, "-o", opts, str(stack.mnt)]).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (stack.upper.parent / "upper2").mkdir()
    res = run([FUSE_UNIONFS, "-o",
               f"lowerdir={stack.lowers[0]},upperdir={stack.upper}2,workdir={stack.work}",
               str(other)])
    assert res.returncode == 1 and "in use" in res.stderr, res.stderr
    assert not os.path.ismount(other)


def test_unionfs_mount_usage_error_exits_2(stack):
    res = run([UNIONFS, "mount", "--bogus", str(stack.mnt)])
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_umount_of_something_not_mounted_is_one_line(stack):
    res = run([UNIONFS, "umount", str(stack.mnt)])
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1


def test_no_server_is_left_after_repeated_mounts(stack):
    opts = f"lowerdir={lowerdir(stack)}"
    for _ in range(5):
        assert run([FUSE_UNIONFS, "-o", opts, str(stack.mnt)]).returncode == 0
        assert run(["umount", str(stack.mnt)]).returncode == 0
    wait_for(lambda: not server_pids(stack.mnt), timeout=5, what="servers to exit")
