"""Container records in the store: containers/<id>/container.json plus the
container's upper/ and work/ dirs. What the runner needs from the store.

    c = containers.create(store, image, name=None, command=None)
    c.upper, c.work, c.lowerdirs (top first), c.config (the image's run config)
    containers.update(store, c.id, state="running", pid=..., ...)
    containers.get(store, "name-or-id-prefix"); containers.list_all(store)
    containers.remove(store, "name-or-id", force=False)

A record pins its layers (by diff_id) and its image: prune and `image rm`
never delete what a container uses, even if its image's name is gone.
"""
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field

from .store import Image, Store, StoreError, remove_tree, write_atomic

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
STATES = ("created", "running", "exited")


@dataclass
class Container:
    id: str
    name: str
    image: str                  # the reference given (a name or an id)
    manifest_digest: str
    image_id: str               # config digest
    diff_ids: list              # top first
    config: dict                # the image's run config (Entrypoint, Cmd, Env, ...)
    command: list | None = None
    created: float = 0.0
    state: str = "created"
    pid: int | None = None
    exit_code: int | None = None
    started: float | None = None
    finished: float | None = None
    extra: dict = field(default_factory=dict)
    root: str = ""              # containers/<id>, filled in when read

    @property
    def upper(self) -> str:
        return os.path.join(self.root, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.root, "work")

    def lowerdirs(self, store: Store) -> list:
        return [store.layer(d).lowerdir() for d in self.diff_ids]

    def is_running(self) -> bool:
        if self.state != "running" or not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _dir(store: Store, cid: str) -> str:
    return store.p("containers", cid)


def _read(store: Store, cid: str) -> Container:
    path = os.path.join(_dir(store, cid), "container.json")
    with open(path, "rb") as f:
        doc = json.load(f)
    doc.pop("root", None)
    c = Container(**doc)
    c.root = _dir(store, cid)
    return c


def _write(store: Store, c: Container) -> None:
    doc = asdict(c)
    doc.pop("root")
    write_atomic(os.path.join(_dir(store, c.id), "container.json"),
                 json.dumps(doc, indent=1).encode())


def list_all(store: Store) -> list:
    out = []
    for cid in os.listdir(store.p("containers")):
        try:
            out.append(_read(store, cid))
        except (FileNotFoundError, NotADirectoryError, ValueError, TypeError):
            continue        # being made or removed, or not ours
    return sorted(out, key=lambda c: -c.created)


def get(store: Store, key: str) -> Container:
    matches = [c for c in list_all(store) if c.name == key]
    if not matches:
        matches = [c for c in list_all(store) if len(key) >= 4 and c.id.startswith(key)]
    if not matches:
        raise StoreError(f"no container {key!r}")
    if len(matches) > 1:
        raise StoreError(f"container id prefix {key!r} is ambiguous")
    return matches[0]


def create(store: Store, image: Image, ref: str, name: str | None = None,
           command: list | None = None) -> Container:
    """A new container record with empty upper and work dirs (made in tmp/
    and renamed into place, under the store's meta lock so names are unique)."""
    if name is not None and not _NAME_RE.match(name):
        raise StoreError(f"invalid container name {name!r}")
    cid = secrets.token_hex(32)
    with store.writing():
        lock = store.lock("meta.lock")
        try:
            taken = {c.name for c in list_all(store)}
            if name is None:
                name = _generated_name(cid, taken)
            elif name in taken:
                raise StoreError(f"the container name {name!r} is already in use")
            c = Container(id=cid, name=name, image=ref, manifest_digest=image.manifest_digest,
                          image_id=image.id, diff_ids=[layer.diff_id for layer in image.layers],
                          config=image.config.run_config, command=command, created=time.time())
            work = store.tmpdir("container-")
            try:
                for d in ("upper", "work"):
                    os.mkdir(os.path.join(work, d), 0o755)
                c.root = work
                doc = asdict(c)
                doc.pop("root")
                write_atomic(os.path.join(work, "container.json"),
                             json.dumps(doc, indent=1).encode())
                os.rename(work, _dir(store, cid))
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            c.root = _dir(store, cid)
            return c
        finally:
            lock.release()


def update(store: Store, cid: str, **fields) -> Container:
    lock = store.lock("meta.lock")
    try:
        c = _read(store, cid)
        for key, value in fields.items():
            if not hasattr(c, key) or key in ("id", "root"):
                raise StoreError(f"no container field {key!r}")
            setattr(c, key, value)
        _write(store, c)
        return c
    finally:
        lock.release()


def remove(store: Store, key: str, force: bool = False) -> Container:
    c = get(store, key)
    if c.is_running() and not force:
        raise StoreError(f"container {c.name} is running (pid {c.pid})")
    with store.writing():
        remove_tree(c.root, store.p("tmp"))
    return c


def _generated_name(cid: str, taken: set) -> str:
    adjectives = ("brave", "calm", "eager", "fond", "keen", "lucid", "merry", "quiet", "swift")
    nouns = ("otter", "heron", "lynx", "finch", "badger", "marten", "wren", "ibex", "vole")
    n = int(cid[:8], 16)
    base = f"{adjectives[n % len(adjectives)]}_{nouns[n // 9 % len(nouns)]}"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name
