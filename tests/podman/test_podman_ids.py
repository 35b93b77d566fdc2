"""Owners and modes through podman's id options: `--userns=keep-id`
(uidmapping=/gidmapping= to the mount program) and
`overlay.force_mask=shared` (xattr_permissions=2: the layers' files are
0755 on disk and their real owner and mode live in an override xattr).
"""
import os
import stat

import pytest
from podman_env import MODES, PROGRAMS

from unionfs.fs import idmap

pytestmark = pytest.mark.parametrize("program", PROGRAMS)

KEEP_ID = """
id -u; id -g
stat -c '%n %u:%g %a' /etc/secret /data/owned /etc/passwd /
cat /etc/secret 2>/dev/null || echo secret unreadable
echo x 2>/dev/null >> /etc/passwd || echo passwd not writable
rm /etc/group 2>/dev/null || echo group not removable
touch /tmp/mine && stat -c 'mine %u:%g' /tmp/mine
echo own >> /data/owned 2>/dev/null || echo owned not writable
"""


def run_keep_id(pm):
    proc = pm.run_container(KEEP_ID, "--userns=keep-id")
    return {"rc": proc.returncode, "err": proc.returncode and proc.stderr,
            "out": proc.stdout.splitlines()}


@pytest.mark.parametrize("mode", ["rootless"])
def test_keep_id_owners_and_root_files(podman, oracle, mode):
    got = run_keep_id(podman)
    me = podman.user
    assert got["rc"] == 0, got["err"]
    assert got["out"] == [
        str(me.uid), str(me.gid),
        "/etc/secret 0:0 600", "/data/owned 1000:1000 644", "/etc/passwd 0:0 644", "/ 0:0 555",
        "secret unreadable", "passwd not writable", "group not removable",
        f"mine {me.uid}:{me.gid}", "owned not writable"]
    assert got == oracle(run_keep_id, got)


FORCE_MASK = ("overlay.force_mask=shared",)

# Not /data/suid nor /tmp: podman 4.3's storage drops setuid, setgid and sticky
# bits when it writes the override xattrs of an image's files (0:0:0777 for /tmp).
SHOW = "stat -c '%n %u:%g %a' /etc/secret /data/owned /data/sub/f /bin/busybox"
SHOWN = ["/etc/secret 0:0 600", "/data/owned 1000:1000 644", "/data/sub/f 0:0 644",
         "/bin/busybox 0:0 755"]


def run_force_mask(pm):
    proc = pm.run_container(SHOW + "; cat /etc/secret")
    return {"rc": proc.returncode, "err": proc.returncode and proc.stderr,
            "out": proc.stdout.splitlines()}


@pytest.mark.parametrize("mode", MODES)
def test_force_mask_shared_modes_and_owners(make_podman, oracle, program, mode):
    pm = make_podman(program, mode == "rootless", FORCE_MASK)
    got = run_force_mask(pm)
    assert got["rc"] == 0, got["err"]
    assert got["out"] == SHOWN + ["root only"]
    assert got == oracle(run_force_mask, got, FORCE_MASK)


CHANGE = """
set -e
echo n > /new && chmod 640 /new && chown 5:6 /new
mkdir /d && chmod 700 /d && chown 0:7 /d
chmod 600 /data/sub/f
chown 8:0 /data/sub/f
stat -c '%n %u:%g %a' /new /d /data/sub/f
"""


def upper_override(upper: str, name: str) -> tuple:
    """The real mode of a file in the container's upper and its override
    (uid, gid, perm), read under the name the upper's root says it uses (a
    copied-up file also keeps the lower layer's own override xattr)."""
    which = idmap.layer_override_name({n.encode() for n in os.listxattr(upper)})
    path = os.path.join(upper, name)
    ov = idmap.decode_override(os.getxattr(path, which, follow_symlinks=False)) if which \
        else None
    return stat.S_IMODE(os.lstat(path).st_mode), ov and (ov.uid, ov.gid, ov.perm)


def run_force_mask_changes(pm):
    proc = pm.run_container(CHANGE, "--name", "fm", rm=False)
    upper = pm.container_upper("fm")
    disk = {n: upper_override(upper, n) for n in ("new", "d", "data/sub/f")} \
        if proc.returncode == 0 else {}
    again = pm.run_container(SHOW)
    return {"rc": proc.returncode, "err": proc.returncode and proc.stderr,
            "out": proc.stdout.splitlines(), "disk": disk, "again": again.stdout.splitlines()}


@pytest.mark.parametrize("mode", MODES)
def test_force_mask_shared_new_files(make_podman, oracle, program, mode):
    pm = make_podman(program, mode == "rootless", FORCE_MASK)
    got = run_force_mask_changes(pm)
    assert got["rc"] == 0, got["err"]
    assert got["out"] == ["/new 5:6 640", "/d 0:7 700", "/data/sub/f 8:0 600"]
    # on disk: readable by the storage's owner, the real owner and mode in the xattr
    assert got["disk"] == {"new": (0o755, (5, 6, 0o640)), "d": (0o755, (0, 7, 0o700)),
                           "data/sub/f": (0o755, (8, 0, 0o600))}
    assert got["again"] == SHOWN            # the image itself is unchanged
    assert got == oracle(run_force_mask_changes, got, FORCE_MASK)


CREATE = """
umask 022
echo n > /new; mkdir /d; mkdir -m 700 /private; (umask 077; echo s > /s)
chgrp 7 /new; chown 9 /d; chmod 600 /data/owned
stat -c '%n %u:%g %a' /new /d /private /s /data/owned
"""


def run_force_mask_create(pm):
    proc = pm.run_container(CREATE)
    return {"rc": proc.returncode, "out": proc.stdout.splitlines()}


@pytest.mark.parametrize("mode", MODES)
def test_force_mask_shared_create_modes_and_partial_changes(make_podman, program, mode):
    pm = make_podman(program, mode == "rootless", FORCE_MASK)
    got = run_force_mask_create(pm)
    assert got == {"rc": 0, "out": ["/new 0:7 644", "/d 9:0 755", "/private 0:0 700",
                                    "/s 0:0 600", "/data/owned 1000:1000 600"]}
