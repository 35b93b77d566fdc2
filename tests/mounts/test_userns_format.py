"""The kernel's rootless marker format, inside a user namespace.

There uid 0 may make char 0/0 devices but not write trusted.* xattrs, so
unionfs writes what `mount -t overlay -o userxattr` reads in the same
namespace: char 0/0 whiteouts and `user.overlay.opaque=y`. Checked both ways
(userns_scenario.py runs in the namespace): the same changes made through
unionfs and read back by the kernel, and made by the kernel and read back by
unionfs, must show the same tree; and the upper unionfs wrote holds only the
kernel's markers. In root's own namespace (`unshare -Urm`: uid 0 is root
there too, but trusted.* is refused) and in a plain user's (the install
under test must then be executable by everyone: scripts/setup.sh's).
"""
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

SCENARIO = os.path.join(os.path.dirname(__file__), "userns_scenario.py")
PLAIN_USER = "nobody"

# What the scenario's changes leave in the upper, in the kernel's rootless form.
EXPECTED_MARKERS = {"device_whiteouts": ["d1", "d4/x", "d4/y", "f2", "link1"],
                    "oci_names": [], "opaque_user": ["d3", "f5"], "xattr_whiteouts": []}


@pytest.fixture
def base():
    path = tempfile.mkdtemp(prefix="unionfs-userns-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    # the namespace's mounts died with it; its files may belong to a plain user
    shutil.rmtree(path, ignore_errors=True)


def in_user_namespace(base: str, writer: str, as_user: str | None) -> dict:
    script = os.path.join(base, "scenario.py")
    shutil.copy(SCENARIO, script)
    work = os.path.join(base, "w")
    os.mkdir(work)
    argv = ["unshare", "-Urm", sys.executable, script, work, writer]
    if as_user:
        pw = pwd.getpwnam(as_user)
        os.chown(work, pw.pw_uid, pw.pw_gid)
        argv = ["runuser", "-u", as_user, "--"] + argv
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(params=["root", "plain-user"])
def who(request):
    return None if request.param == "root" else PLAIN_USER


def test_an_upper_unionfs_wrote_in_a_user_namespace_reads_the_same_under_the_kernel(base, who):
    got = in_user_namespace(base, "unionfs", who)
    assert got["uid_map"][:2] == ["0", "0" if who is None else str(pwd.getpwnam(who).pw_uid)]
    assert got["markers"] == EXPECTED_MARKERS
    assert got["reader"] == got["writer"]           # the kernel, -o userxattr
    assert got["writer_again"] == got["writer"]     # unionfs, remounted


def test_an_upper_the_kernel_wrote_with_userxattr_reads_the_same_under_unionfs(base, who):
    got = in_user_namespace(base, "kernel", who)
    assert got["markers"] == EXPECTED_MARKERS
    assert got["reader"] == got["writer"]           # unionfs
    assert got["writer_again"] == got["writer"]     # the kernel, remounted
