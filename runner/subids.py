"""A rootless run's user namespace with the caller's subordinate ids mapped.

Without this, a rootless container's user namespace maps one id (the
caller's): files of an image owned by other uids show as the overflow id
and cannot be chowned to. With ranges in /etc/subuid and /etc/subgid and
newuidmap/newgidmap installed, the runner itself enters a user namespace
mapping 0 to the caller and 1..N to its subordinate range (podman's layout)
before it mounts the union, plus a mount namespace of its own: the union's
server is forked inside, so it can chown upper files to any mapped id and
mounts /dev/fuse directly (allow_other: the container's users are others),
and the keeper then needs no user namespace of its own (runner.sandbox).

`ranges()` is pure (the files' text in, the map out); `enter()` is the one
step that cannot be undone: after it the runner is uid 0 of the new
namespace for the rest of its life, teardown included.
"""
import os

from unionfs.sys import libc

SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"


class SubidError(RuntimeError):
    """The mapping could not be made (one line)."""


def parse_ranges(text, name, number):
    """[(start, count), ...] of the lines of `text` (the subuid format,
    `owner:start:count`) whose owner is the user's name or number."""
    found = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(number)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            found.append((start, count))
    return found


def id_map(own, ranges):
    """The map lines (inside, outside, count): 0 is `own`, then each range in
    turn from 1 (newuidmap checks them against the files again)."""
    lines, inside = [(0, own, 1)], 1
    for start, count in ranges:
        lines.append((inside, start, count))
        inside += count
    return tuple(lines)


def available_maps(uid=None, gid=None, name=None):
    """(uid_map, gid_map) for the caller, or None where the host cannot give
    one (no ranges for the user, or newuidmap/newgidmap missing)."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    if name is None:
        import pwd
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
    if not (_on_path("newuidmap") and _on_path("newgidmap")):
        return None
    maps = []
    for path, own in ((SUBUID, uid), (SUBGID, gid)):
        try:
            with open(path) as f:
                ranges = parse_ranges(f.read(), name, uid)
        except OSError:
            return None
        if not ranges:
            return None
        maps.append(id_map(own, ranges))
    return tuple(maps)


def _on_path(program):
    """shutil.which's answer without shutil (~5 ms to import on the start-up path)."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if os.access(os.path.join(folder or ".", program), os.X_OK):
            return True
    return False


def enter(uid_map, gid_map):
    """Unshare a user namespace, have newuidmap/newgidmap map it (they must
    run outside it: a helper forked before the unshare), become its root,
    then unshare a private mount namespace owned by it."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    helper = os.fork()
    if helper == 0:
        os.close(ready_w)
        status = 1
        try:
            if os.read(ready_r, 1) == b"x":
                status = _write_maps(os.getppid(), uid_map, gid_map)
        finally:
            os._exit(status)
    os.close(ready_r)
    try:
        libc.unshare(libc.CLONE_NEWUSER)
    except OSError as e:
        os.close(ready_w)
        os.waitpid(helper, 0)
        raise SubidError(f"cannot create a user namespace: {e.strerror}") from None
    os.write(ready_w, b"x")
    os.close(ready_w)
    _, status = os.waitpid(helper, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SubidError("newuidmap/newgidmap refused the subordinate ids of "
                         f"{SUBUID} and {SUBGID} (the message above says why)")
    # The map made our ids 0; set them anyway so that saved ids agree.
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    os.setgroups([])
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)


def _write_maps(pid, uid_map, gid_map):
    for program, lines in (("newuidmap", uid_map), ("newgidmap", gid_map)):
        argv = [program, str(pid), *(str(n) for line in lines for n in line)]
        try:
            child = os.posix_spawnp(program, argv, os.environ)
        except OSError:
            return 1
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return 1
    return 0
