"""Container records in the store: containers/<id>/container.json plus the
container's upper/ and work/ dirs, and the lock its run holds. What the
runner needs from the store.

    c, image = containers.prepare(store, "busybox", name=None, command=None)
    c = containers.create(store, image, ref, name=None, command=None)
    c, lock = containers.start(store, image, ref, name=None, command=None)
    c.upper, c.work, c.lowerdirs (top first), c.config (the image's run config)
    containers.finish(store, c, lock, exit_code, remove=False)
    containers.update(store, c.id, state="running", pid=..., ...)
    containers.get(store, "name-or-id-prefix"); containers.list_all(store)
    containers.remove(store, "name-or-id", force=False)

A record pins its layers (by diff_id) and its image: prune and `image rm`
never delete what a container uses, even if its image's name is gone.

Running: `unionfs run` holds containers/<id>/running.lock (flock, exclusive)
from the moment the container exists (it is locked before its dir is
renamed into place) until the run's teardown is over; the processes it
forks (the container's keeper and PID 1) inherit the lock, so it is held
exactly as long as something of the run lives, and a killed run releases it.
`is_running()` asks the lock, never a pid (pids are reused); `remove`
refuses a running container, or with force stops its run first.
"""
import errno
import fcntl
import json
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field

from .store import Image, Store, StoreError, remove_tree, write_atomic

RUN_LOCK = "running.lock"
STOP_TIMEOUT = 10.0         # rm -f: SIGTERM to the run, SIGKILL after this
STOP_KILL_WAIT = 5.0

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
        """Does a run hold this container's lock right now?"""
        lock = _try_lock(self.root, exclusive=False)
        if lock is None:
            return True
        if lock >= 0:
            os.close(lock)
        return False


def _try_lock(root: str, exclusive: bool = True, create: bool = False) -> int | None:
    """The container's run lock taken without waiting (an fd: close it to let
    go), or None if a run holds it. A container that never ran has no lock
    file: nothing holds it (an fd of -1 is returned then, unless `create`)."""
    path = os.path.join(root, RUN_LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


class RunLock:
    """A run's hold on its container (see the module's docstring)."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def valid_name(name: str) -> bool:
    return _NAME_RE.match(name) is not None


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


def _write(store: Store, c: Container, durable: bool = True) -> None:
    doc = asdict(c)
    doc.pop("root")
    write_atomic(os.path.join(_dir(store, c.id), "container.json"),
                 json.dumps(doc, indent=1).encode(), durable=durable)


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
    return _make(store, image, ref, name, command)[0]


def start(store: Store, image: Image, ref: str, name: str | None = None,
          command: list | None = None, durable: bool = True) -> tuple:
    """A new container for a run that starts now: its record says running
    (this process's pid) and its lock is held from before the container
    becomes visible. Returns (container, RunLock). `durable=False` skips the
    fsync of the record (a container removed after its run)."""
    return _make(store, image, ref, name, command, running=True, durable=durable)


def _make(store, image, ref, name, command, running=False, durable=True) -> tuple:
    if name is not None and not _NAME_RE.match(name):
        raise StoreError(f"invalid container name {name!r} (letters, digits and _.-, "
                         "starting with a letter or digit)")
    cid = os.urandom(32).hex()
    with store.writing():
        # No prune runs while we hold writing(): layers here now stay, since
        # the record below pins them. (The image may have gone since it was
        # resolved.)
        missing = [layer.diff_id for layer in image.layers if not store.has_layer(layer.diff_id)]
        if missing:
            raise StoreError(f"the image {ref} was removed from the store meanwhile (layer "
                             f"{missing[0]} is gone)")
        lock = store.lock("meta.lock")
        try:
            taken = {c.name for c in list_all(store)}
            if name is None:
                name = _generated_name(cid, taken)
            elif name in taken:
                raise StoreError(f"the container name {name!r} is already in use")
            now = time.time()
            c = Container(id=cid, name=name, image=ref, manifest_digest=image.manifest_digest,
                          image_id=image.id, diff_ids=[layer.diff_id for layer in image.layers],
                          config=image.config.run_config, command=command, created=now)
            if running:
                c.state, c.pid, c.started = "running", os.getpid(), now
            work = store.tmpdir("container-")
            run_lock = None
            try:
                for d in ("upper", "work"):
                    os.mkdir(os.path.join(work, d), 0o755)
                if running:
                    run_lock = RunLock(_try_lock(work, create=True))
                c.root = work
                doc = asdict(c)
                doc.pop("root")
                write_atomic(os.path.join(work, "container.json"),
                             json.dumps(doc, indent=1).encode(), durable=durable)
                os.rename(work, _dir(store, cid))
            except BaseException:
                if run_lock is not None:
                    run_lock.release()
                remove_tree(work, store.p("tmp"))
                raise
            c.root = _dir(store, cid)
            return c, run_lock
        finally:
            lock.release()


def finish(store: Store, c: Container, lock: RunLock, exit_code: int | None,
           remove: bool = False) -> None:
    """A run is over (its teardown done): record how it ended (exit_code None:
    it never started) and let go of the lock; with `remove`, delete the
    container instead (still holding the lock, so nothing sees it half gone)."""
    try:
        if remove:
            with store.writing():
                remove_tree(c.root, store.p("tmp"))
            return
        fields = {"state": "exited" if exit_code is not None else "created",
                  "exit_code": exit_code, "finished": time.time()}
        meta = store.lock("meta.lock")
        try:
            current = _read(store, c.id)
            for key, value in fields.items():
                setattr(current, key, value)
            _write(store, current)
        finally:
            meta.release()
    finally:
        lock.release()


def prepare(store: Store, ref: str, name: str | None = None,
            command: list | None = None) -> tuple:
    """What `unionfs run IMAGE` needs: the image resolved (its `lowerdirs`
    top first, `config.run_config`) and a new container record with empty
    upper and work dirs. Returns (container, image)."""
    image = store.resolve(ref)
    return create(store, image, ref, name, command), image


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
    """Delete a container (record, upper, work). One whose run is going on is
    refused, unless `force`: its `unionfs run` gets SIGTERM (SIGKILL if it
    is still there after STOP_TIMEOUT) and the container goes once its run
    let go of it (an unnamed one its run removes itself)."""
    c = get(store, key)
    fd = _try_lock(c.root)
    if fd is None:
        if not force:
            raise StoreError(f"container {c.name} is running (unionfs run, pid {c.pid}): "
                             "stop it first, or remove it with -f")
        fd = _stop(c)
    try:
        with store.writing():
            remove_tree(c.root, store.p("tmp"))
    finally:
        if fd >= 0:
            os.close(fd)
    return c


def _stop(c: Container) -> int:
    """Stop a container's run (the pid its record names holds the lock, so it
    is that run's); the lock, once it is free."""
    deadline = time.monotonic() + STOP_TIMEOUT
    sent = None
    while True:
        fd = _try_lock(c.root)
        if fd is not None:
            return fd
        now = time.monotonic()
        if sent is None or (sent == signal.SIGTERM and now > deadline):
            sent = signal.SIGTERM if sent is None else signal.SIGKILL
            try:
                os.kill(c.pid, sent)
            except (ProcessLookupError, TypeError):
                pass
            if sent == signal.SIGKILL:
                deadline = now + STOP_KILL_WAIT
        elif sent == signal.SIGKILL and now > deadline:
            raise StoreError(f"container {c.name}: its run (pid {c.pid}) did not stop")
        time.sleep(0.05)


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
