"""Mount requests on the daemon's mount socket: check who asks, hand the mount
to a pooled server, record it.

The client (daemon.client) has validated its configuration, opened the
layers and mounted /dev/fuse itself, in its own namespaces and with its own
rights. It sends one message with those descriptors (and its user and mount
namespaces'). The daemon never trusts what the message says about who the
client is: it takes the ids from the socket (SO_PEERCRED), checks that a
user namespace descriptor is the client's own, translates the ids into that
namespace, and has the server become exactly that. Then it forwards the
message and descriptors to a pooled server, waits for its answer, records
the mount, and answers the client.

A client that cannot parse and check a command line itself (the C
fuse-unionfs) asks first with {"op": "prepare"} on its own connection
(daemon.prepare), then sends the same mount request.
"""
import os
import secrets
import socket

import trio

from . import wire
from .registry import Mount

ANSWER_TIMEOUT = 60.0


class Refused(Exception):
    """The request is refused (one line for the client)."""


def _ns_inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def _own_ns(kind: str) -> int:
    return os.stat(f"/proc/self/ns/{kind}").st_ino


def _groups_of(pid: int) -> list:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                return [int(g) for g in line.split()[1:]]
    return []


def _inside(pid: int, which: str, kernel_id: int) -> int:
    """The id that kernel_id (as this daemon sees it) has in pid's user namespace."""
    with open(f"/proc/{pid}/{which}_map") as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if outside <= kernel_id < outside + count:
                return inside + kernel_id - outside
    raise Refused(f"id {kernel_id} has no mapping in the client's user namespace")


def identity(peer: tuple, fds: list, named: dict) -> dict:
    """Whom the server is to become, from the socket's credentials."""
    pid, uid, gid = peer
    userns = named.get("userns")
    if userns is not None and _ns_inode(fds[userns]) != _own_ns("user"):
        if os.stat(f"/proc/{pid}/ns/user").st_ino != _ns_inode(fds[userns]):
            raise Refused("the user namespace sent is not the client's")
        return {"uid": _inside(pid, "uid", uid), "gid": _inside(pid, "gid", gid),
                "groups": None, "foreign_userns": True}
    named.pop("userns", None)       # the daemon's own: nothing to join
    return {"uid": uid, "gid": gid, "groups": _groups_of(pid), "foreign_userns": False}


async def receive(sock):
    """(message, fds) from a trio socket (daemon.wire, asynchronously)."""
    import array
    import json
    fds, chunks = [], []
    while True:
        data, ancdata, flags, _ = await sock.recvmsg(65536, socket.CMSG_SPACE(wire.MAX_FDS * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data or flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise wire.WireError("bad or missing request")
        chunks.append(data)
        if data.endswith(b"\n"):
            break
    try:
        message = json.loads(b"".join(chunks))
    except ValueError:
        close_all(fds)
        raise wire.WireError("not a JSON message") from None
    return message, fds


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def handle(sock, daemon):
    """Serve one client connection on the mount socket; the new Mount, or None."""
    fds = []
    mount = None
    try:
        peer = wire.peer_credentials(sock)
        message, fds = await receive(sock)
        try:
            if message.get("op") == "prepare":
                from .prepare import prepare
                answer = await prepare(peer, message, fds)
            else:
                mount = await _mount(daemon, peer, message, fds)
                answer = {"ready": True, "id": mount.id, "pid": mount.pid}
        except Refused as e:
            answer = {"error": str(e)}
        await sock.send(wire.encode(answer))
    except (OSError, wire.WireError) as e:
        daemon.log(f"mount request: {e}")
    finally:
        close_all(fds)
        sock.close()
    return mount


async def _mount(daemon, peer, message, fds) -> dict:
    named = dict(message.get("fds") or {})
    if message.get("op") != "mount" or "fuse" not in named or not named.get("lowers"):
        raise Refused("not a mount request")
    indexes = [named["fuse"], *named["lowers"], named.get("upper"), named.get("work"),
               named.get("userns"), named.get("mntns")]
    if any(i is not None and not (isinstance(i, int) and 0 <= i < len(fds)) for i in indexes):
        raise Refused("descriptors do not match the request")
    creds = identity(peer, fds, named)
    mount_id = secrets.token_hex(6)
    control = os.path.join(daemon.state_dir, f"{mount_id}.sock")
    log_path = os.path.join(daemon.state_dir, f"{mount_id}.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    # the control socket is bound here: the server, with the client's ids, may
    # not be able to create anything in the daemon's state directory
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(control)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    send_fds = list(fds) + [log_fd, listener.fileno()]
    named["log"] = len(fds)
    named["control"] = len(fds) + 1
    info = {"id": mount_id, "mountpoint": message.get("mountpoint"), "owner_uid": peer[1],
            "lowers": message.get("lowers", []), "upper": message.get("upper")}
    forwarded = {"config": message["config"], "fds": named, "creds": creds,
                 "control": control, "info": info}
    try:
        with trio.fail_after(ANSWER_TIMEOUT):
            server = await daemon.pool.claim()
            await server.send(forwarded, send_fds)
            answer = await server.receive(ANSWER_TIMEOUT)
    except trio.TooSlowError:
        raise Refused("unionfs daemon: no server answered in time") from None
    finally:
        os.close(log_fd)
        listener.close()
    server.close()
    if "error" in answer:
        raise Refused(answer["error"])
    mntns = named.get("mntns")
    mount = Mount(id=mount_id, pid=server.pid, owner_uid=peer[1],
                  mountpoint=message.get("mountpoint") or "", source=message.get("source", ""),
                  lowers=message.get("lowers", []), upper=message.get("upper"),
                  work=message.get("work"), options=message.get("options", []),
                  control=control, log=log_path,
                  mount_namespace=_ns_inode(fds[mntns]) if mntns is not None else 0)
    daemon.registry.add(mount)
    daemon.events.publish({"type": "mount", "id": mount_id, "mountpoint": mount.mountpoint,
                           "pid": server.pid, "owner_uid": peer[1]})
    return mount
