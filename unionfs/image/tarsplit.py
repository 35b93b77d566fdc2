"""Tar-split: an uncompressed layer blob kept as its unpacked files plus the
tar's other bytes, so a docker-archive load does not write every layer twice.

While a layer is applied, the recorder sees the tar stream and keeps every
byte except regular files' contents (headers, PAX records, padding, the
end-of-archive blocks: a few hundred bytes per entry) in `tar-split.raw`,
and lists the stream as records in `tar-split.json`: `n` (the next n raw
bytes) or `[path, size]` (that many bytes of the unpacked file). Reading the
blob back replays the records; its sha256 is checked against the diff_id at
the end, so a changed layer file is an error, never a wrong blob.

The recorder gives up (the caller then keeps the blob itself) when a file
whose contents it references is removed or replaced by a later entry, or
for sparse members.
"""
import json
import os

from ..sys import libc

RAW = "tar-split.raw"
INDEX = "tar-split.json"
CHUNK = 1 << 20


class TarSplitError(Exception):
    pass


class Recorder:
    """Wraps the uncompressed tar stream (read once, in order)."""

    def __init__(self, raw, raw_out_path: str):
        self.raw = raw
        self.out = open(raw_out_path, "wb")
        self.pos = 0
        self.buf = bytearray()          # raw bytes not yet written out
        self.skip_until = 0             # stream offset where skipped file data ends
        self.records = []
        self.referenced = set()         # path tuples whose contents are referenced
        self.valid = True
        self.reason = None

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            start = self.pos
            self.pos += len(data)
            if self.valid and self.pos > self.skip_until:
                self.buf += memoryview(data)[max(0, self.skip_until - start):]
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def _flush(self) -> None:
        if self.buf:
            self.out.write(self.buf)
            self.records.append(len(self.buf))
            self.buf = bytearray()

    def file_data(self, offset: int, size: int, parts: tuple) -> None:
        """The next `size` bytes, from `offset`, are the contents of `parts`."""
        if not self.valid:
            return
        if offset != self.pos:      # tarfile read past the header: not our layout
            self.invalidate("unexpected read position")
            return
        self._flush()
        self.records.append([b"/".join(parts).decode("utf-8", "surrogateescape"), size])
        self.referenced.add(parts)
        self.skip_until = offset + size

    def removing(self, parts: tuple, is_dir: bool) -> None:
        """An entry at `parts` is about to be removed or replaced."""
        if not self.valid:
            return
        n = len(parts)
        if parts in self.referenced or (is_dir and any(p[:n] == parts
                                                       for p in self.referenced)):
            self.invalidate(f"{b'/'.join(parts)!r} is replaced by a later entry")

    def invalidate(self, reason: str) -> None:
        self.valid = False
        self.reason = reason
        self.buf = bytearray()

    def finish(self, layer_dir: str) -> bool:
        """After the whole stream was read: write the index. False if invalid."""
        try:
            if not self.valid:
                return False
            self._flush()
            self.out.flush()
            with open(os.path.join(layer_dir, INDEX), "w") as f:
                json.dump({"version": 1, "size": self.pos, "records": self.records}, f)
            return True
        finally:
            self.out.close()


class Reader:
    """The blob rebuilt from a layer dir and its tar-split, checked against
    `diff_id` when the end is reached."""

    def __init__(self, layer_dir: str, diff_id: str):
        with open(os.path.join(layer_dir, INDEX)) as f:
            doc = json.load(f)
        self.size = doc["size"]
        self.records = doc["records"]
        self.diff_id = diff_id
        self.raw = open(os.path.join(layer_dir, RAW), "rb")
        self.root = os.open(os.path.join(layer_dir, "diff"), os.O_PATH | os.O_DIRECTORY |
                            os.O_CLOEXEC)
        import hashlib
        self.hasher = hashlib.sha256()
        self.chunks = self._chunks()
        self.pending = b""
        self.done = False
        self.pos = 0

    def _chunks(self):
        for rec in self.records:
            if isinstance(rec, int):
                left = rec
                while left:
                    data = self.raw.read(min(left, CHUNK))
                    if not data:
                        raise TarSplitError("tar-split raw data is short")
                    left -= len(data)
                    yield data
            else:
                path, size = rec
                try:
                    fd = libc.openat2(self.root, path.encode("utf-8", "surrogateescape"),
                                      os.O_RDONLY | os.O_NOFOLLOW)
                except OSError as e:
                    raise TarSplitError(f"layer file {path}: {e.strerror}") from None
                with os.fdopen(fd, "rb") as f:
                    left = size
                    while left:
                        data = f.read(min(left, CHUNK))
                        if not data:
                            raise TarSplitError(f"layer file {path} is shorter than recorded")
                        left -= len(data)
                        yield data

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n is not None and n >= 0 else float("inf")
        have = 0
        if self.pending:
            take = self.pending[:want] if want != float("inf") else self.pending
            self.pending = self.pending[len(take):]
            out.append(take)
            have += len(take)
        while have < want and not self.done:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.done = True
                got = "sha256:" + self.hasher.hexdigest()
                if got != self.diff_id:
                    raise TarSplitError(f"layer {self.diff_id} rebuilt from its files has "
                                        f"digest {got}: the layer was changed")
                break
            self.hasher.update(chunk)
            room = want - have
            if len(chunk) > room:
                chunk, self.pending = chunk[:room], chunk[room:]
            out.append(chunk)
            have += len(chunk)
        data = b"".join(out)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        """Forward only (a resumed upload starts at an offset)."""
        if whence != 0 or offset < self.tell():
            raise OSError("a rebuilt layer blob can only seek forward")
        while self.tell() < offset:
            if not self.read(min(offset - self.tell(), CHUNK)):
                break
        return self.tell()

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if self.root >= 0:
            os.close(self.root)
            self.root = -1
            self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
