"""Checks from fuse-overlayfs's own test scripts (tests/*.sh in
containers/fuse-overlayfs) that fuse-unionfs failed, in our words, run
against both programs: fuse-overlayfs 1.10 passes each.

The scripts themselves are not kept here; docs/rootless.md has the table of
which of them pass with which program, and why the others fail.
"""
import errno
import os
import pathlib
import shutil
import subprocess
import tempfile

import podman_env
import pytest
from podman_env import PROGRAMS

pytestmark = pytest.mark.parametrize("program", PROGRAMS)


@pytest.fixture
def stack():
    """lower/upper/work/mnt under a directory any uid can traverse; unmounted
    and removed at teardown."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="unionfs-fo-suite-", dir="/tmp"))
    base.chmod(0o755)
    dirs = {n: base / n for n in ("lower", "upper", "work", "mnt")}
    for d in dirs.values():
        d.mkdir()
    yield dirs
    if os.path.ismount(dirs["mnt"]):
        subprocess.run(["umount", "-l", str(dirs["mnt"])], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def mount(program, dirs, options="", as_user=None):
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    argv = [podman_env.program_path(program), "-o", opts + (f",{options}" if options else ""),
            str(dirs["mnt"])]
    proc = subprocess.run(as_user.command(argv) if as_user else argv, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def known(request, program, reason):
    if program == "fuse-unionfs":
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def churn(mnt, worker: int, rounds: int) -> list:
    errors = []
    for r in range(rounds):
        d = mnt / f"d_{worker}_{r}"
        try:
            (d / "sub").mkdir(parents=True)
            (d / "sub" / "f").write_text("x")
            (d / "sub" / "f").unlink()
            (d / "sub").rmdir()
            d.rmdir()
        except OSError as e:
            errors.append(f"{d.name}: {errno.errorcode[e.errno]}")
    return errors


def test_concurrent_mkdir_rmdir_churn(program, stack):
    """test-stress.sh 15 and 34: workers making and removing their own trees.
    Filesystems reuse a removed directory's inode number at once; the union
    must never answer ESTALE for the new one."""
    mount(program, stack)
    read, write = os.pipe()
    children = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, "\n".join(churn(stack["mnt"], worker, 200)).encode() + b"\n")
            os._exit(0)
        children.append(pid)
    os.close(write)
    with os.fdopen(read) as f:
        errors = [line for line in f.read().splitlines() if line]
    for pid in children:
        os.waitpid(pid, 0)
    assert errors == [] and os.listdir(stack["mnt"]) == []


def test_fuse_overlayfs_xattrs_are_hidden(program, stack):
    """test-xattr.sh 6: user.fuseoverlayfs.* in a layer is bookkeeping."""
    f = stack["lower"] / "f"
    f.write_text("x")
    os.setxattr(f, "user.fuseoverlayfs.origin", b"internal")
    os.setxattr(f, "user.visible", b"yes")
    mount(program, stack)
    assert os.listxattr(stack["mnt"] / "f") == ["user.visible"]
    with pytest.raises(OSError) as info:
        os.setxattr(stack["mnt"] / "f", "user.fuseoverlayfs.x", b"forged")
    assert info.value.errno == errno.EPERM


def test_noxattrs_turns_xattrs_off(program, stack):
    """test-xattr.sh 11: with noxattrs=1 every xattr request fails with
    EOPNOTSUPP (fuse-overlayfs answers ENOSYS, which the kernel reports so;
    fuse-unionfs answers EOPNOTSUPP itself, keeping its stats xattr)."""
    (stack["lower"] / "f").write_text("x")
    mount(program, stack, "noxattrs=1")
    with pytest.raises(OSError) as info:
        os.setxattr(stack["mnt"] / "f", "user.a", b"1")
    assert info.value.errno == errno.EOPNOTSUPP


def test_fallocate(request, program, stack):
    """test-special-files.sh 5: fallocate(2) on a new file (util-linux's
    fallocate: glibc's posix_fallocate would quietly write zeros instead)."""
    known(request, program, "pyfuse3 has no fallocate handler: EOPNOTSUPP")
    mount(program, stack)
    proc = subprocess.run(["fallocate", "-l", "1M", str(stack["mnt"] / "f")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.stat(stack["mnt"] / "f").st_size == 1 << 20


def test_owner_chmods_a_read_only_lower_file_as_a_plain_user(request, program, stack,
                                                              test_user):
    """unpriv.sh: a plain user's mount; the owner of a 0444 lower file may
    chmod and touch it (the copy-up must not need write permission on it)."""
    if program == "fuse-unionfs" and not podman_env.others_can_run(
            podman_env.fuse_unionfs_program()):
        known(request, program, "the fuse-unionfs interpreter is not executable by a plain "
              "user (run the tier with an install under /opt: docs/rootless.md)")
    for d in stack.values():
        os.chown(d, test_user.uid, test_user.gid)
    f = stack["lower"] / "b"
    f.write_text("b")
    os.chown(f, test_user.uid, test_user.gid)
    f.chmod(0o444)
    mount(program, stack, as_user=test_user)
    script = f"chmod 406 {stack['mnt']}/b && touch {stack['mnt']}/b && stat -c %a {stack['mnt']}/b"
    proc = subprocess.run(test_user.command(["sh", "-c", script]), capture_output=True,
                          text=True, timeout=30)
    subprocess.run(test_user.command(["fusermount3", "-u", str(stack["mnt"])]),
                   capture_output=True)
    assert (proc.returncode, proc.stdout.strip()) == (0, "406"), proc.stderr
    assert oct((stack["upper"] / "b").stat().st_mode & 0o7777) == oct(0o406)
