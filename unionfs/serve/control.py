"""A server's control socket: its counters, provenance, events and unmount, for
the daemon (or anyone allowed to open the socket: it is 0600).

One JSON request per line, one JSON answer per line:
    {"op": "stats"}                   -> the mount's info, tables and counters
    {"op": "which", "path": "a/b"}    -> provenance of a path (fs.provenance)
    {"op": "events"}                  -> {"subscribed": true}, then one event
                                         per line until the connection closes
    {"op": "unmount"}                 -> unmounts in the client's mount
                                         namespace; the server then exits
Runs as a task beside the FUSE loop, on the same trio loop, so it reads the
tables without locks and never blocks a request.
"""
import json
import os
import socket

import trio

EVENT_BACKLOG = 1000


def companion(listen_fd, info, mntns_fd):
    """The control task for serve(companion=...), or None without a socket.

    listen_fd: a listening UNIX socket, bound by the daemon (0600) where it
    keeps its records; the daemon removes the file when the server is gone."""
    if listen_fd is None:
        return None

    async def run(union, operations):
        if info.get("lowers"):
            union.name_layers(info["lowers"], info.get("upper"))
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=listen_fd))
        listener = trio.SocketListener(sock)
        handler = _Handler(union, operations, info, mntns_fd)
        await trio.serve_listeners(handler.connection, [listener])
    return run


class _Handler:
    def __init__(self, union, operations, info, mntns_fd):
        self.union = union
        self.operations = operations
        self.info = info
        self.mntns_fd = mntns_fd

    async def connection(self, stream):
        buffer = b""
        try:
            while True:
                while b"\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                line, buffer = buffer.split(b"\n", 1)
                try:
                    request = json.loads(line)
                    op = request["op"]
                except (ValueError, KeyError, TypeError):
                    await _send(stream, {"error": "bad request"})
                    continue
                if op == "events":
                    await self.events(stream)
                    return
                answer = await self.answer(op, request)
                with trio.CancelScope(shield=True):
                    await _send(stream, answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def answer(self, op, request):
        if op == "stats":
            return {"info": self.info, **self.operations.stats()}
        if op == "which":
            try:
                return self.union.which(str(request.get("path", "")))
            except OSError as e:
                return {"error": e.strerror or str(e)}
        if op == "unmount":
            # the unmount ends the FUSE loop, which cancels this task: finish the answer first
            with trio.CancelScope(shield=True):
                return await self.unmount()
        return {"error": f"unknown op {op!r}"}

    async def events(self, stream):
        send, receive = trio.open_memory_channel(EVENT_BACKLOG)

        def listener(event):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                pass        # a listener too slow to keep up loses events, not requests
        self.operations.events.listeners.append(listener)
        try:
            await _send(stream, {"subscribed": True})
            async for event in receive:
                await _send(stream, event)
        finally:
            if listener in self.operations.events.listeners:
                self.operations.events.listeners.remove(listener)

    async def unmount(self):
        mountpoint = self.info.get("mountpoint")
        if not mountpoint:
            return {"error": "no mountpoint known"}
        if self.mntns_fd is not None and not _own_namespace(self.mntns_fd):
            argv = ["nsenter", f"--mount=/proc/self/fd/{self.mntns_fd}", "--", "umount",
                    mountpoint]
            result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                            check=False, pass_fds=(self.mntns_fd,))
            if result.returncode != 0:
                return {"error": result.stderr.decode(errors="replace").strip()
                        or "umount failed"}
            return {"ok": True}
        from .process import unmount
        try:
            await trio.to_thread.run_sync(unmount, mountpoint)
        except OSError as e:
            return {"error": f"cannot unmount {mountpoint}: {e.strerror}"}
        return {"ok": True}


def _own_namespace(fd) -> bool:
    return os.fstat(fd).st_ino == os.stat("/proc/self/ns/mnt").st_ino


async def _send(stream, obj):
    await stream.send_all((json.dumps(obj) + "\n").encode())
