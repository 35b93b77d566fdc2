"""The pool: server processes started ahead of need, imported and waiting.

Each is `python -m unionfs.serve.pooled FD` in a session of its own (so it
outlives the daemon), holding the other end of a socketpair. It says
{"imported": true} once pyfuse3, trio and the filesystem are loaded; from
then on `claim()` may hand it out. Taking one starts a replacement in the
background; a pooled server that dies before it is claimed is dropped and
replaced. `size` servers are kept ready; claims wait for one when all are
taken (up to the first one that becomes ready).
"""
import socket
import sys

import trio

from . import wire

START_TIMEOUT = 60.0


class PooledServer:
    def __init__(self, process, channel: trio.socket.SocketType):
        self.process = process
        self.channel = channel

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, message, fds=()) -> None:
        data = wire.encode(message)
        sent = 0
        if fds:
            import array
            sent = await self.channel.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                           array.array("i", fds))])
        while sent < len(data):
            sent += await self.channel.send(data[sent:])

    async def receive(self, timeout=START_TIMEOUT):
        buffer = b""
        with trio.fail_after(timeout):
            while not buffer.endswith(b"\n"):
                data = await self.channel.recv(65536)
                if not data:
                    raise wire.WireError("the server closed its channel")
                buffer += data
        import json
        return json.loads(buffer)

    def close(self) -> None:
        self.channel.close()


class Pool:
    def __init__(self, size: int, log):
        self.size = size
        self.log = log
        self.ready: list = []
        self.starting = 0
        self._changed = trio.Event()
        self._nursery = None
        self.started_total = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._refill()
            task_status.started()
            await trio.sleep_forever()

    def _refill(self):
        while len(self.ready) + self.starting < self.size:
            self.starting += 1
            self._nursery.start_soon(self._start_one)

    async def _start_one(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        server = None
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "unionfs.serve.pooled", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), start_new_session=True,
                stdin=subprocess_devnull(), stdout=subprocess_devnull(),
                stderr=subprocess_devnull())
            theirs.close()
            self.started_total += 1
            server = PooledServer(process, trio.socket.from_stdlib_socket(ours))
            hello = await server.receive()
            if not hello.get("imported"):
                raise wire.WireError(f"unexpected hello {hello}")
        except (OSError, wire.WireError, ValueError, trio.TooSlowError) as e:
            self.log(f"pool: a server failed to start: {e}")
            if server is not None:
                server.close()
                server.process.kill()
            self.starting -= 1
            await trio.sleep(1)     # do not spin on a broken installation
            self._refill()
            return
        finally:
            if theirs.fileno() >= 0:
                theirs.close()
        self.starting -= 1
        self.ready.append(server)
        self._wake()
        self._nursery.start_soon(self._watch, server)

    async def _watch(self, server):
        """Drop and replace a ready server that dies before it is claimed."""
        await server.process.wait()
        if server in self.ready:
            self.ready.remove(server)
            server.close()
            self.log(f"pool: server {server.pid} died unclaimed; replacing it")
            self._refill()

    def _wake(self):
        self._changed.set()
        self._changed = trio.Event()

    async def claim(self) -> PooledServer:
        while not self.ready:
            self._refill()
            await self._changed.wait()
        server = self.ready.pop(0)
        self._refill()
        return server

    def stats(self) -> dict:
        return {"size": self.size, "ready": len(self.ready), "starting": self.starting,
                "started": self.started_total}


def subprocess_devnull():
    import subprocess
    return subprocess.DEVNULL
