"""Messages between clients, the daemon and servers: one JSON line each, with
file descriptors riding along (SCM_RIGHTS) where a mount needs them.

A message is a JSON object on one line (JSON never holds a raw newline).
Descriptors travel with the first byte of the line, so a receiver that
reads a message gets its descriptors with it (`recv_message`). Blocking
calls on plain sockets: the client and the servers' request channel use
these; the daemon has trio versions (daemon.main).

Standard library only, and cheap to import: `fuse-unionfs` imports it on
every mount.
"""
import array
import json
import os
import socket

MAX_FDS = 16
MAX_LINE = 1 << 20


class WireError(Exception):
    """A malformed or missing message (one line)."""


def encode(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


def send_message(sock: socket.socket, obj, fds=()) -> None:
    data = encode(obj)
    sent = 0
    if fds:
        sent = sock.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds))])
    sock.sendall(data[sent:])


def recv_message(sock: socket.socket):
    """(message, [fds]); WireError at EOF or on garbage. Received fds are the
    caller's to close."""
    fds = []
    chunks = []
    size = 0
    while True:
        data, ancdata, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise WireError("too many file descriptors in one message")
        if not data:
            _close_all(fds)
            raise WireError("the other side closed the connection")
        chunks.append(data)
        size += len(data)
        if data.endswith(b"\n"):
            break
        if size > MAX_LINE:
            _close_all(fds)
            raise WireError("message too long")
    try:
        message = json.loads(b"".join(chunks))
    except ValueError:
        _close_all(fds)
        raise WireError("not a JSON message") from None
    if not isinstance(message, dict):
        _close_all(fds)
        raise WireError("not a JSON object")
    for fd in fds:
        os.set_inheritable(fd, False)
    return message, fds


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def peer_credentials(sock: socket.socket) -> tuple:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    import struct
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)
