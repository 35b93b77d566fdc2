"""What is being built in a store's tmp/ and moved into place: locks, atomic
small files, resumable blob writers, pending layers. Used through store.py
(which re-exports every name here); split out only to keep store.py short.

hashlib, shutil, tempfile and the applier are imported where they are used:
`unionfs run IMAGE` opens the store, creates and removes a container, and
needs none of them.
"""
import fcntl
import json
import os
import time

from . import digest as dg

CHUNK = 1 << 20


class StoreError(Exception):
    """A store operation failed (one line)."""



def may_chown_and_mknod() -> tuple[bool, bool]:
    from ..sys import capabilities
    caps = capabilities.effective_capabilities()
    return capabilities.CAP_CHOWN in caps, capabilities.CAP_MKNOD in caps and \
        capabilities.in_init_user_namespace()


class Lock:
    """flock on a file under locks/: shared or exclusive, held for a block."""

    def __init__(self, path: str, exclusive: bool, blocking: bool = True):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            fcntl.flock(self.fd, op if blocking else op | fcntl.LOCK_NB)
        except BaseException:
            os.close(self.fd)
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_serial = [0]


def unique_name(prefix: str) -> str:
    """A name no other process or call of this one uses (pid, time, a counter)."""
    _serial[0] += 1
    return f"{prefix}{os.getpid()}-{time.monotonic_ns()}-{_serial[0]}"


def make_temp_dir(parent: str, prefix: str) -> str:
    """A new 0700 directory under parent (tempfile.mkdtemp without its import)."""
    while True:
        path = os.path.join(parent, unique_name(prefix))
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def write_atomic(path: str, data: bytes, durable: bool = True) -> None:
    """Write a small file under a temporary name and rename it into place."""
    d = os.path.dirname(path)
    while True:
        tmp = os.path.join(d, unique_name(".tmp-"))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            continue
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_tree(path: str, trash_dir: str) -> None:
    """Make a directory vanish at once (rename into the trash), then delete it."""
    dest = make_temp_dir(trash_dir, "del-")
    try:
        os.rename(path, os.path.join(dest, "x"))
    except FileNotFoundError:
        pass
    delete_tree(dest)


def delete_tree(path: str) -> None:
    """rm -rf, never following a symlink, best effort (what is left, prune
    collects). shutil.rmtree would do, but its import is on the exit path of
    every `unionfs run IMAGE` without --name; os.fwalk works on directory fds
    all the same."""
    for _, dirs, files, dir_fd in os.fwalk(path, topdown=False):
        for name in files + dirs:
            try:
                try:
                    os.rmdir(name, dir_fd=dir_fd) if name in dirs else \
                        os.unlink(name, dir_fd=dir_fd)
                except NotADirectoryError:      # a symlink to a directory
                    os.unlink(name, dir_fd=dir_fd)
                except PermissionError:         # a 0500 dir a rootless container left
                    os.chmod(dir_fd, 0o700)
                    os.rmdir(name, dir_fd=dir_fd) if name in dirs else \
                        os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class BlobWriter:
    """A blob being written, resumable: the partial file tmp/partial/<hex>
    stays when the writer is closed without commit(), and a later writer of
    the same digest starts at `offset` (the registry client asks for the
    rest with a Range request). Only one writer per digest at a time (flock).
    Use as a context manager."""

    def __init__(self, store, digest: str, size: int | None):
        self.store = store
        self.digest = digest
        self.hex = dg.parse(digest)
        self.size = size
        self.done = store.has_blob(digest)
        self.path = os.path.join(store.root, "tmp", "partial", self.hex)
        self.file = None
        self.hasher = None
        self.offset = 0
        if self.done:
            return
        self.file = open(self.path, "a+b")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
            self.done = store.has_blob(digest)      # written while we waited
            import hashlib
            self.hasher = hashlib.sha256()
            self.file.seek(0)
            while chunk := self.file.read(CHUNK):
                self.hasher.update(chunk)
                self.offset += len(chunk)
            if size is not None and self.offset > size:
                self.discard()
                self.__init__(store, digest, size)
        except BaseException:
            self.close()
            raise

    def write(self, data) -> None:
        if self.done:
            raise StoreError(f"blob {self.digest} is complete already")
        self.file.write(data)
        self.hasher.update(data)
        self.offset += len(data)
        if self.size is not None and self.offset > self.size:
            self.discard()
            raise dg.DigestError(f"blob {self.digest} is larger than its {self.size} bytes")

    def hashed(self) -> tuple:
        """(digest, size) of every byte written so far, the partial's prefix
        included (apply_layer's blob_hash: the blob is hashed once)."""
        return "sha256:" + self.hasher.hexdigest(), self.offset

    def commit(self) -> str:
        """Verify and move the blob into place; DigestError (and the partial
        removed) if it does not match."""
        if self.done:
            self.close()
            return self.digest
        got = "sha256:" + self.hasher.hexdigest()
        if got != self.digest or (self.size is not None and self.offset != self.size):
            self.discard()
            raise dg.DigestError(f"blob {self.digest} does not match its content "
                                 f"(got {got}, {self.offset} bytes)")
        self.file.flush()
        os.fsync(self.file.fileno())
        os.rename(self.path, self.store.blob_path(self.digest))
        self.done = True
        self.close()
        return self.digest

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.close()
        self.offset = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PendingLayer:
    """A layer being unpacked: the applier writes into a temp dir under
    tmp/, and commit() renames it to layers/<hex> once its diff_id is
    verified; leaving the block without commit() removes the temp dir.

        with store.writing(), store.pending_layer(expected_diff_id) as pending:
            if not pending.exists:
                result = pending.unpack(tar_reader)     # a consumer of the tar stream
            pending.commit(diff_id_as_hashed, tar_size, blob_digest, compression)

    With an expected diff_id the layer's lock is held for the whole block, so
    two pulls sharing a layer unpack it once: the second finds `exists`."""

    def __init__(self, store, diff_id: str | None):
        self.store = store
        self.expected = diff_id
        if diff_id is not None:
            dg.parse(diff_id)
        self._lock = store.lock(f"layer-{dg.parse(diff_id)}.lock") if diff_id else None
        self.exists = diff_id is not None and store.has_layer(diff_id)
        self.work = store.tmpdir("layer-")
        self.root = os.path.join(self.work, "layer", "diff")
        self.unpacked = False

    def unpack(self, tar_reader, recorder=None):
        """Apply the uncompressed tar stream (read up to its end marker); the
        applier's ApplyResult."""
        from .applier import apply_tar
        os.makedirs(self.root, 0o755, exist_ok=True)
        os.chmod(self.root, 0o755)
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            may_chown, may_mknod = may_chown_and_mknod()
            result = apply_tar(tar_reader, root_fd, may_chown=may_chown, may_mknod=may_mknod,
                               recorder=recorder)
        finally:
            os.close(root_fd)
        self.unpacked = True
        return result

    def commit(self, diff_id: str, size: int, blob_digest: str | None = None,
               compression: str = "none", tar_split: bool = False) -> bool:
        """Check the hashed diff_id and move the layer into place; False if
        it was there already (this copy is dropped)."""
        if self.expected is not None and diff_id != self.expected:
            raise dg.DigestError(f"layer does not match its diff_id: expected {self.expected}, "
                                 f"got {diff_id}")
        if not self.unpacked:
            return False
        lock = self.store.lock(f"layer-{dg.parse(diff_id)}.lock") if self._lock is None else None
        try:
            if self.store.has_layer(diff_id):
                return False
            info = {"diff_id": diff_id, "size": size, "created": time.time(),
                    "blob": blob_digest, "compression": compression, "tar_split": tar_split}
            write_atomic(os.path.join(self.work, "layer", "layer.json"),
                         json.dumps(info).encode(), durable=False)
            os.rename(os.path.join(self.work, "layer"), self.store.layer_path(diff_id))
            return True
        finally:
            if lock is not None:
                lock.release()

    def close(self) -> None:
        import shutil
        shutil.rmtree(self.work, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
