"""`unionfs daemon`: pre-started servers, mounts handed to them, the control API.

The daemon runs in the foreground on trio. It owns two sockets (daemon.paths):
the API (HTTP, daemon.http + daemon.api) and the mount socket (mount
requests with descriptors, daemon.mounting); a pool of pre-started servers
(daemon.pool); the records of the mounts it handed out (daemon.registry);
and the event hub that fans the servers' events (and its own: mount,
unmount) out to API clients. The servers are never its children for long:
they live in sessions of their own, so stopping the daemon (SIGINT/SIGTERM)
leaves every mount served, and the next daemon adopts them.

Sockets are 0600, or 0660 with `--group` (the group's members may then ask
for mounts of their own and see those); who asks is always taken from the
socket's peer credentials.
"""
import grp
import os
import signal
import socket
import sys

import trio

from . import api, http, mounting, paths, prepare  # noqa: F401 (loaded ahead)
from .pool import Pool
from .registry import Registry

EVENT_BACKLOG = 1000


class EventHub:
    """Events to API clients; each sees its own mounts' (root: all)."""

    def __init__(self):
        self.subscribers: list = []

    def publish(self, event: dict) -> None:
        import time
        event.setdefault("time", time.time())
        for uid, send in list(self.subscribers):
            if uid == 0 or event.get("owner_uid") == uid:
                try:
                    send.send_nowait(event)
                except trio.WouldBlock:
                    pass
                except trio.BrokenResourceError:
                    self.subscribers.remove((uid, send))

    async def stream(self, uid: int):
        send, receive = trio.open_memory_channel(EVENT_BACKLOG)
        entry = (uid, send)
        self.subscribers.append(entry)
        try:
            yield {"type": "subscribed"}
            async for event in receive:
                yield event
        finally:
            if entry in self.subscribers:
                self.subscribers.remove(entry)


class Daemon:
    def __init__(self, api_socket: str, pool_size: int, group: str | None):
        self.api_socket = os.path.abspath(api_socket)
        self.mount_socket = paths.mount_socket(self.api_socket)
        self.state_dir = paths.state_dir(self.api_socket)
        self.group = group
        self.events = EventHub()
        self.pool = Pool(pool_size, self.log)
        self.registry = Registry(self.state_dir, self._gone)

    def log(self, message: str) -> None:
        print(f"unionfs daemon: {message}", file=sys.stderr, flush=True)

    def info(self) -> dict:
        memory = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    memory[key.lower() + "_kib"] = int(value.split()[0])
        return {"pid": os.getpid(), "socket": self.api_socket, "pool": self.pool.stats(),
                "mounts": len(self.registry.mounts), "memory": memory}

    def _gone(self, mount) -> None:
        self.events.publish({"type": "unmount", "id": mount.id, "mountpoint": mount.mountpoint,
                             "pid": mount.pid, "owner_uid": mount.owner_uid})

    def _listen(self, path: str) -> trio.socket.SocketType:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        old = os.umask(0o177)
        try:
            sock._sock.bind(path)
        finally:
            os.umask(old)
        if self.group is not None:
            os.chown(path, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(path, 0o660)
        sock.listen(128)
        return sock

    async def _relay_events(self, mount) -> None:
        """A server's events, into the hub, tagged with its mount."""
        try:
            stream = await trio.open_unix_socket(mount.control)
        except OSError:
            return
        try:
            async with stream:
                await self._relay_stream(stream, mount)
        except (OSError, trio.BrokenResourceError):
            return      # the mount went away (and its server with it) under us

    async def _relay_stream(self, stream, mount) -> None:
        await stream.send_all(b'{"op": "events"}\n')
        buffer = b""
        import json
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line)
                if event.get("subscribed"):
                    continue
                event.update(id=mount.id, owner_uid=mount.owner_uid)
                self.events.publish(event)

    async def run(self) -> None:
        os.makedirs(os.path.dirname(self.api_socket), mode=0o755, exist_ok=True)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        api_sock = self._listen(self.api_socket)
        mount_sock = self._listen(self.mount_socket)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.registry.run)
            for mount in list(self.registry.mounts.values()):
                nursery.start_soon(self._relay_events, mount)
            await nursery.start(self.pool.run)
            nursery.start_soon(self._serve_api, api_sock)
            nursery.start_soon(self._serve_mounts, mount_sock, nursery)
            self.log(f"listening on {self.api_socket} (pool of {self.pool.size}; "
                     f"{len(self.registry.mounts)} mounts adopted)")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    self.log("stopping (the mounts stay served)")
                    nursery.cancel_scope.cancel()
                    break
        for path in (self.api_socket, self.mount_socket):
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _serve_api(self, sock) -> None:
        async def handler(request):
            return await api.handle(request, self)
        listener = trio.SocketListener(sock)
        await trio.serve_listeners(lambda stream: http.serve_connection(stream, handler),
                                   [listener])

    async def _serve_mounts(self, sock, nursery) -> None:
        while True:
            conn, _ = await sock.accept()

            async def one(conn=conn):
                mount = await mounting.handle(conn, self)
                if mount is not None:
                    nursery.start_soon(self._relay_events, mount)
            nursery.start_soon(one)


def run(api_socket: str | None, pool_size: int, group: str | None) -> int:
    daemon = Daemon(api_socket or paths.default_socket(), pool_size, group)
    trio.run(daemon.run)
    return 0
