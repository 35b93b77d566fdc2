"""The prepare op: a fuse-unionfs command line parsed and checked for a client
that cannot do it itself (the C client, client/fuse-unionfs-client.c).

    {"op": "prepare", "argv": [...], "fds": {"userns": 0, "mntns": 1, "root": 2, "cwd": 3}}

arrives on the mount socket with four descriptors: the client's user and
mount namespaces, its root and its current directory. fuse-unionfs's own
parser (cli.fuse.parse) reads argv, and serve.validate checks the result
*as the client*: in a child forked for the request that joins the client's
user namespace (if it is another one) and mount namespace, takes its root,
its ids and groups (serve.pooled.take_identity) and its current directory,
so that every path, permission and mount table seen is the client's (a
rootless podman's mount program lives in namespaces of its own). The
mount options follow the client's capabilities, read from /proc/PID/status
of the socket's peer (client.fuse_mount_options: one rule for both clients).
The answer is one of

    {"plan": {...}}     what to open and mount, and the mount request to send
                        (client.layout, client.mount_request: the same request
                        the Python client sends, so the server side is one path)
    {"error": "one line", "status": N}   what fuse-unionfs prints, and its exit status
    {"fallback": "why"}  the client runs the Python fuse-unionfs instead (--help,
                        --version, -f, -d, a view the daemon cannot take, ...)

The child writes its answer to a pipe and exits; nothing is mounted here.
Where the client's view is the daemon's own (same namespaces, root, ids,
groups and capabilities: root's podman with a root daemon, a user with the
user's daemon) and every path is absolute, a worker thread of the daemon
checks instead (a fork costs ~3 ms).
"""
import json
import os

import trio

# imported here, ahead of the first request: the forked child imports nothing
from ..cli.fuse import parse
from ..serve.config import OptionError
from ..serve.pooled import take_identity
from ..serve.validate import MountError, validate
from ..sys import libc
from ..sys.capabilities import effective_capabilities
from . import client, fusemount, wire
from .mounting import Refused, identity

CHECK_TIMEOUT = 60.0


def plan(argv, capabilities, absolute_only=False):
    """The answer for argv, in the client's view (the forked child runs this,
    or the daemon itself when it shares the client's). absolute_only: None
    for a command line with a relative path (it needs the client's directory)."""
    try:
        cfg = parse(argv)
    except OptionError as e:
        return {"error": f"fuse-unionfs: {e} (see fuse-unionfs --help)", "status": 2}
    except SystemExit:
        return {"fallback": "help or version"}
    if cfg.foreground:
        return {"fallback": "foreground"}
    if absolute_only and not all(os.path.isabs(p) for p in
                                 [*cfg.lowers, cfg.upper or "/", cfg.work or "/",
                                  cfg.mountpoint or "/"]):
        return None
    try:
        validate(cfg)
    except MountError as e:
        return {"error": f"unionfs: {e}", "status": 1}
    flags, options = client.fuse_mount_options(cfg, capabilities)
    layer_paths, named = client.layout(cfg)
    request = client.mount_request(cfg, named, flags, options)
    return {"plan": {
        "open": layer_paths, "mountpoint": cfg.mountpoint, "source": cfg.source,
        "fstype": f"fuse.{cfg.subtype}", "mount_flags": fusemount.mount_bits(flags),
        "fuse_options": ",".join(sorted(options)),
        "fusermount_options": fusemount.fusermount_options(cfg.source, cfg.subtype, flags,
                                                           options),
        "request": wire.encode(request).decode().rstrip("\n")}}


def _same_file(a, b) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _same_view(fds, named, creds, capabilities) -> bool:
    """Does the client see what the daemon sees, with the daemon's rights?
    (its user and mount namespaces, root, ids, groups and capabilities)"""
    return (named.get("userns") is None
            and os.fstat(fds[named["mntns"]]).st_ino == os.stat("/proc/self/ns/mnt").st_ino
            and _same_file(os.fstat(fds[named["root"]]), os.stat("/"))
            and (creds["uid"], creds["gid"]) == (os.geteuid(), os.getegid())
            and set(creds["groups"] or ()) == set(os.getgroups())
            and capabilities == effective_capabilities())


def take_view(fds, named, creds) -> None:
    """Become the client where it stands (the forked child, single-threaded)."""
    if named.get("userns") is not None:
        libc.setns(fds[named["userns"]], libc.CLONE_NEWUSER)
    mntns = fds[named["mntns"]]
    if os.fstat(mntns).st_ino != os.stat("/proc/self/ns/mnt").st_ino:
        libc.setns(mntns, libc.CLONE_NEWNS)
    root = fds[named["root"]]
    if not _same_file(os.fstat(root), os.stat("/")):
        os.fchdir(root)
        os.chroot(".")
    take_identity(creds, None)
    os.fchdir(fds[named["cwd"]])


def _child(write_fd, fds, named, creds, argv, capabilities) -> None:
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)        # parse() prints --help's text: not into the daemon's log
        take_view(fds, named, creds)
        answer = plan(argv, capabilities)
    except BaseException as e:  # noqa: BLE001 (a child: it must reach _exit)
        answer = {"fallback": f"cannot check in the client's view: {e}"}
    try:
        data = wire.encode(answer)
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(0)


async def prepare(peer, message, fds) -> dict:
    """The answer to a prepare request (the client's descriptors in fds)."""
    named = dict(message.get("fds") or {})
    argv = message.get("argv")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise Refused("not a prepare request")
    keys = ("userns", "mntns", "root", "cwd")
    if not all(isinstance(named.get(k), int) and 0 <= named[k] < len(fds) for k in keys):
        raise Refused("descriptors do not match the request")
    pid = peer[0]
    creds = identity(peer, fds, named)
    if os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.fstat(fds[named["mntns"]]).st_ino:
        raise Refused("the mount namespace sent is not the client's")
    capabilities = effective_capabilities(pid)
    if _same_view(fds, named, creds, capabilities):
        # no fork needed (~3 ms): a worker thread, so that a layer on a hung
        # mount stalls this request only
        answer = await trio.to_thread.run_sync(plan, argv, capabilities, True)
        if answer is not None:
            return answer
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        _child(write_fd, fds, named, creds, argv, capabilities)
    os.close(write_fd)
    data = b""
    try:
        with trio.move_on_after(CHECK_TIMEOUT):
            async with trio.lowlevel.FdStream(read_fd) as stream:
                while not data.endswith(b"\n"):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
    finally:
        if not data.endswith(b"\n"):
            try:
                os.kill(child, 9)
            except ProcessLookupError:
                pass
        await _reap(child)
    try:
        return json.loads(data)
    except ValueError:
        return {"fallback": "the check gave no answer"}


async def _reap(pid) -> None:
    pidfd = os.pidfd_open(pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    os.waitpid(pid, 0)
