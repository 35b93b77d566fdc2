"""podman run on a FUSE mount program: writes, deletes, a deleted image
directory made again, volumes and /etc/hosts after listings, many runs in a row.

Each test runs with fuse-overlayfs (the oracle) and fuse-unionfs, as root and
as a plain user; fuse-unionfs's observations must equal fuse-overlayfs's.
"""
import os

import pytest
from podman_env import MODES, PROGRAMS

pytestmark = [pytest.mark.parametrize("program", PROGRAMS),
              pytest.mark.parametrize("mode", MODES)]

CHANGES = """
set -e
echo new > /etc/new
echo more >> /etc/passwd
rm /etc/secret
rm -r /data
mkdir /data
echo x > /data/x
mkdir /data/sub
echo "data: $(ls -A /data | tr '\\n' ' ')"
echo "sub: $(ls -A /data/sub | tr '\\n' ' ')"
test ! -e /etc/secret && echo secret gone
cat /etc/new
tail -n 1 /etc/passwd
mkdir -p /a/b/c && echo deep > /a/b/c/f && mv /a/b/c/f /a/g && cat /a/g
ln -s /etc/new /etc/link && cat /etc/link && ln /etc/new /etc/hard && stat -c %h /etc/new
"""


def run_changes(pm):
    first = pm.run_container(CHANGES)
    again = pm.run_container("cat /etc/secret; ls -A /data /data/sub | tr '\\n' ' '; "
                             "test -e /etc/new || echo no new")
    return {"rc": first.returncode, "out": first.stdout, "err": first.returncode and first.stderr,
            "again_rc": again.returncode, "again": again.stdout}


def test_run_writes_deletes_recreates(podman, oracle):
    got = run_changes(podman)
    assert got["rc"] == 0, got["err"]
    assert got["out"].splitlines() == [
        "data: sub x ", "sub: ", "secret gone", "new", "more", "deep", "new", "2"]
    # --rm: the next container starts from the image again
    assert got["again_rc"] == 0
    assert got["again"].split() == ["root", "only", "/data:", "owned", "sub", "suid",
                                    "/data/sub:", "f", "no", "new"]
    assert got == oracle(run_changes, got)


LISTINGS = """
ls / >/dev/null; ls -la / >/dev/null; ls -la /etc >/dev/null; ls -laR /vol >/dev/null
cat /vol/in
echo out > /vol/out
grep -c localhost /etc/hosts
for m in /vol /etc/hosts /etc/hostname; do
  grep -q " $m " /proc/self/mountinfo && echo "$m mounted"
done
ls -A /vol | tr '\\n' ' '; echo
hostname
"""


def run_volumes(pm):
    vol = os.path.join(pm.storage, "vol")
    os.mkdir(vol)
    with open(os.path.join(vol, "in"), "w") as f:
        f.write("from the host\n")
    if pm.user:
        os.chown(vol, pm.user.uid, pm.user.gid)
    proc = pm.run_container(LISTINGS, "--hostname", "box", "-v", f"{vol}:/vol")
    with open(os.path.join(vol, "out")) as f:
        written = f.read()
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.returncode and proc.stderr,
            "written": written}


def test_volumes_and_etc_hosts_after_listing_root(podman, oracle):
    got = run_volumes(podman)
    assert got["rc"] == 0, got["err"]
    lines = got["out"].splitlines()
    assert lines[0] == "from the host"
    assert int(lines[1]) >= 1           # /etc/hosts is podman's, not an empty file
    assert lines[2:] == ["/vol mounted", "/etc/hosts mounted",
                         "/etc/hostname mounted", "in out ", "box"]
    assert got["written"] == "out\n"
    assert got == oracle(run_volumes, got)


RUNS = 20


def layer_dirs(pm):
    """The storage's layer directories and layer links."""
    overlay = os.path.join(pm.root, "overlay")
    return sorted(os.listdir(overlay)) + sorted(os.listdir(os.path.join(overlay, "l")))


def run_many(pm):
    before = layer_dirs(pm)
    codes = [pm.run_container("true").returncode for _ in range(RUNS)]
    left = pm.run("ps", "-aq").stdout.split()
    return {"codes": codes, "containers": left, "mounts": pm.mounts_left(),
            "servers": pm.servers_left(), "layers_unchanged": layer_dirs(pm) == before}


def test_twenty_runs_leave_nothing_behind(podman, oracle):
    got = run_many(podman)
    assert got["codes"] == [0] * RUNS
    assert got["containers"] == [] and got["mounts"] == [] and got["servers"] == []
    assert got["layers_unchanged"]      # every container's layer went with it
    assert got == oracle(run_many, got)
