"""The daemon's mounts: one record per server it gave a mount, kept on disk.

A record (STATE/<id>.json) says who owns the mount (the client's uid), where
it is (the mount point as the client named it, its namespace's inode), what
it stacks, which process serves it and on which control socket. The records
outlive the daemon: a restarted daemon reads them back and keeps those whose
server still runs (`adopt`), so mounts never depend on the daemon's life.
A record goes when its server exits (the daemon watches each one's pidfd).
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field

import trio


@dataclass
class Mount:
    id: str
    pid: int
    owner_uid: int
    mountpoint: str
    source: str
    lowers: list
    upper: str | None
    work: str | None
    options: list = field(default_factory=list)
    since: float = field(default_factory=time.time)
    control: str = ""
    log: str = ""
    mount_namespace: int = 0
    adopted: bool = False

    def public(self) -> dict:
        out = asdict(self)
        out["layers"] = {"lowers": out.pop("lowers"), "upper": out.pop("upper"),
                         "work": out.pop("work")}
        return out


def _alive(pid: int) -> bool:
    """Is pid one of our servers (not a reused pid)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"unionfs.serve.pooled" in f.read()
    except OSError:
        return False


class Registry:
    def __init__(self, state_dir: str, on_gone):
        self.state_dir = state_dir
        self.mounts: dict = {}       # id -> Mount
        self.on_gone = on_gone       # called with a Mount once its server exited
        self._nursery = None

    def path(self, mount_id: str) -> str:
        return os.path.join(self.state_dir, f"{mount_id}.json")

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.adopt()
            task_status.started()
            await trio.sleep_forever()

    def adopt(self) -> None:
        """Take back the mounts of a daemon that ran before this one."""
        for name in sorted(os.listdir(self.state_dir)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.state_dir, name)) as f:
                    mount = Mount(**json.load(f))
            except (OSError, ValueError, TypeError):
                continue
            if not _alive(mount.pid):
                self._forget_files(mount)
                continue
            mount.adopted = True
            self._add(mount)

    def add(self, mount: Mount) -> None:
        tmp = self.path(mount.id) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(mount), f)
        os.rename(tmp, self.path(mount.id))
        self._add(mount)

    def _add(self, mount: Mount) -> None:
        self.mounts[mount.id] = mount
        self._nursery.start_soon(self._watch, mount)

    async def _watch(self, mount: Mount) -> None:
        try:
            fd = os.pidfd_open(mount.pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        self.mounts.pop(mount.id, None)
        self._forget_files(mount)
        self.on_gone(mount)

    def _forget_files(self, mount: Mount) -> None:
        for path in (self.path(mount.id), mount.control, mount.log):
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def visible_to(self, uid: int) -> list:
        """The mounts a user may see: root all, others their own."""
        return [m for m in self.mounts.values() if uid == 0 or m.owner_uid == uid]
