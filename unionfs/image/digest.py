"""Content digests: parsing and checking `sha256:<hex>`, and hashing streams.

A digest from outside (a manifest, an index, a file name) is only a claim: it
is parsed strictly here and compared with what was hashed, never used as a
path before `parse` accepted it.
"""
import re

ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})\Z")


class DigestError(ValueError):
    """A malformed digest, or content that does not match its digest."""


def parse(digest: str) -> str:
    """The hex part of a well-formed sha256 digest; DigestError otherwise."""
    if not isinstance(digest, str):
        raise DigestError(f"not a digest: {digest!r}")
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise DigestError(f"not a sha256 digest: {digest[:80]!r}")
    return m.group(1)


def is_digest(text: str) -> bool:
    return isinstance(text, str) and _DIGEST_RE.match(text) is not None


def of_bytes(data: bytes) -> str:
    import hashlib  # here, not at the top: OpenSSL's ~3 ms, on unionfs run's path
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check(data: bytes, expected: str, what: str = "blob") -> None:
    got = of_bytes(data)
    if got != expected:
        raise DigestError(f"{what} does not match its digest: expected {expected}, got {got}")


class HashingReader:
    """A file-like reader that hashes (and optionally copies to `sink`)
    every byte read through it, and counts them. With hashing=False it only
    counts (and copies): for bytes someone else hashes as they pass."""

    def __init__(self, raw, sink=None, hashing: bool = True):
        self.raw = raw
        self.sink = sink
        import hashlib
        self.hasher = hashlib.sha256() if hashing else None
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            if self.hasher is not None:
                self.hasher.update(data)
            self.size += len(data)
            if self.sink is not None:
                self.sink.write(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass

    @property
    def digest(self) -> str:
        if self.hasher is None:
            raise ValueError("this reader only counts: the bytes are hashed elsewhere")
        return "sha256:" + self.hasher.hexdigest()


class HashingWriter:
    """A file-like writer that hashes and counts what passes into `raw`."""

    def __init__(self, raw):
        import hashlib
        self.raw = raw
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.hasher.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def flush(self) -> None:
        if hasattr(self.raw, "flush"):
            self.raw.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()
