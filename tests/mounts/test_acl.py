"""POSIX ACLs through the union, against the kernel's overlayfs: enforced
(unless `noacl`, fuse-overlayfs's option), and a parent's default ACL
inherited by new objects, those built in the workdir too (a directory made
where a lower one was removed, a file made over a whiteout)."""
import errno
import os
import subprocess

import pytest

ACL_USER = 1234


def append_as(uid: int, path) -> int:
    """0, or the errno of appending to path as uid (in a child process)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with open(path, "a") as f:
                f.write("z")
            code = 0
        except OSError as e:
            code = e.errno
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def acl_stack(make_stack, tmp_path):
    os.chmod(tmp_path, 0o755)       # the ACL user must reach the mount
    for parent in tmp_path.parents:
        if str(parent).startswith("/tmp/pytest-of-"):
            os.chmod(parent, 0o755)
    stack = make_stack(1)
    low = stack.lowers[0]
    (low / "granted").write_text("a")
    os.chmod(low / "granted", 0o644)
    subprocess.run(["setfacl", "-m", f"u:{ACL_USER}:rw", str(low / "granted")], check=True)
    (low / "p" / "old").mkdir(parents=True)
    (low / "p" / "old" / "x").write_text("x")
    (low / "p" / "oldf").write_text("f")
    subprocess.run(["setfacl", "-d", "-m", f"u:{ACL_USER}:rwx", str(low / "p")], check=True)
    return stack


@pytest.mark.parametrize("options, result", [((), 0), (("noacl",), errno.EACCES)])
def test_an_acl_grant_is_enforced_unless_noacl(acl_stack, options, result):
    with acl_stack.kernel():
        assert append_as(ACL_USER, acl_stack.mnt / "granted") == 0
    with acl_stack.unionfs(options=options):
        assert append_as(ACL_USER, acl_stack.mnt / "granted") == result


CHANGES = ("umask 0; cd p && rm -r old && mkdir old && rm oldf && echo new > oldf "
           "&& mkdir fresh && echo n > freshf")


def acls(mnt) -> dict:
    found = {}
    for name in ("old", "oldf", "fresh", "freshf"):
        found[name] = subprocess.run(["getfacl", "-cp", name], cwd=mnt / "p",
                                     capture_output=True, text=True, check=True).stdout
        found[name] += oct(os.lstat(mnt / "p" / name).st_mode)
    return found


def test_new_objects_inherit_the_default_acl_as_on_the_kernel(acl_stack, make_stack):
    ko = make_stack(1, tag="k")
    subprocess.run(["cp", "-a", f"{acl_stack.lowers[0]}/.", str(ko.lowers[0])], check=True)
    with ko.kernel():
        subprocess.run(["sh", "-c", CHANGES], cwd=ko.mnt, check=True)
        expected = acls(ko.mnt)
    with acl_stack.unionfs():
        subprocess.run(["sh", "-c", CHANGES], cwd=acl_stack.mnt, check=True)
        assert acls(acl_stack.mnt) == expected
    assert f"default:user:{ACL_USER}:rwx" in expected["old"]      # a real inheritance
    assert f"user:{ACL_USER}:rwx" in expected["oldf"]
