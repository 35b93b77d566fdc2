"""`unionfs push`: an image of the store to a registry, sending only what it lacks.

Owns the order of a push: a HEAD of the destination tag first (when it
already names our manifest's digest the registry holds the whole image, since
a registry accepts a manifest only once it has every blob it references:
nothing is sent, not even the manifest); then for each blob, in parallel,
a HEAD; a blob the registry lacks is mounted from another repository of the
same registry that holds it (found from the names of the store's images), and
uploaded otherwise, in one PUT or, when the registry asks for chunks or
refuses the PUT's size, in PATCH chunks; the manifest goes last.
"""
from __future__ import annotations

from . import formats
from . import reference as refs_mod
from .pull import NullProgress, _all
from .registry import Client, RegistryError, push_scope

READ_SIZE = 1 << 20
DEFAULT_JOBS = 4
FALLBACK_CHUNK = 16 << 20


def mount_sources(store, registry: str, repository: str) -> dict:
    """{blob digest: [repository, ...]}: other repositories of this registry
    that hold each blob, as far as the store's image names tell."""
    found: dict = {}
    for image in store.images():
        repos = set()
        for name in image.names:
            try:
                r = refs_mod.parse(name)
            except refs_mod.ReferenceError:
                continue
            if r.registry == registry and r.repository != repository:
                repos.add(r.repository)
        if not repos:
            continue
        for desc in (image.manifest.config, *image.manifest.layers):
            found.setdefault(desc.digest, []).extend(sorted(repos))
    return found


class _BlobReader:
    """The store's blob `digest` read in pieces: read(offset, length) gives a
    fresh async iterator over those bytes. A blob kept as a file is read at
    any offset; one rebuilt from a layer's tar-split (a docker-archive's
    uncompressed layer: no file) can only be read in order, so the open
    reader is reused while the pieces follow each other and opened anew
    (skipping to the offset) otherwise, e.g. for a retry. Reaching the end
    checks a rebuilt blob against its digest."""

    def __init__(self, store, digest: str, size: int):
        self.store, self.digest, self.size = store, digest, size
        self.file = None
        self.pos = 0

    def _read(self, n: int) -> bytes:
        data = self.file.read(n)
        self.pos += len(data)
        return data

    def _seek(self, offset: int) -> None:
        if self.file is not None and self.pos == offset:
            return
        self.close()
        self.file = self.store.open_blob(self.digest)
        if hasattr(self.file, "seek"):
            self.file.seek(offset)
            self.pos = offset
            return
        while self.pos < offset:
            if not self._read(min(READ_SIZE, offset - self.pos)):
                break

    def _piece(self, offset: int, length: int) -> bytes | None:
        """Up to READ_SIZE bytes at offset (None: the blob ended early)."""
        self._seek(offset)
        data = self._read(min(READ_SIZE, length))
        if not data:
            return None
        if self.pos == self.size:
            self._read(1)       # the end: a rebuilt blob is checked here
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            self.pos = 0

    def __call__(self, offset: int, length: int):
        import trio

        async def chunks():
            pos, left = offset, length
            while left:
                data = await trio.to_thread.run_sync(self._piece, pos, left)
                if data is None:
                    raise RegistryError(f"blob {self.digest} is shorter in the store than "
                                        "its descriptor")
                pos += len(data)
                left -= len(data)
                yield data
        return chunks()


def _reader(store, digest: str, size: int) -> _BlobReader:
    """The blob's reader for an upload, after checking its size in the store."""
    have = store.blob_size(digest)
    if have != size:
        raise RegistryError(f"blob {digest} has {have} bytes in the store, its descriptor "
                            f"says {size}")
    return _BlobReader(store, digest, size)


async def push_blob(client: Client, repo: str, store, desc, sources, progress,
                    chunk_size: int | None) -> str:
    """One blob; returns how it got there: exists, mounted or uploaded."""
    import trio
    scopes = (push_scope(repo),)
    if await client.blob_size(repo, desc.digest, scopes) is not None:
        return "exists"
    location = None
    for source in sources:
        location, minimum = await client.start_upload(repo, desc.digest, mount_from=source)
        if location is None:
            return "mounted"
        break       # the registry opened an upload instead: use it
    if location is None:
        location, minimum = await client.start_upload(repo, desc.digest)
    chunk = chunk_size
    if minimum and (chunk is None or chunk < minimum) and desc.size > minimum:
        chunk = minimum
    read = await trio.to_thread.run_sync(_reader, store, desc.digest, desc.size)
    on_sent = lambda n: progress.advance(desc.digest, n)  # noqa: E731
    try:
        try:
            await client.upload(repo, desc.digest, desc.size, location, read, chunk, on_sent)
        except RegistryError as e:
            if e.status != 413 or chunk:
                raise
            # The registry (or a proxy before it) refused the size of one PUT: send
            # the blob again in PATCH chunks, each well below what was refused.
            location, _ = await client.start_upload(repo, desc.digest)
            chunk = min(FALLBACK_CHUNK, max(1 << 20, -(-desc.size // 4)))
            await client.upload(repo, desc.digest, desc.size, location, read, chunk, on_sent)
    finally:
        read.close()
    return "uploaded"


async def push(store, source: str, dest, *, tls_verify: bool = True, creds=None,
               progress=None, jobs: int = DEFAULT_JOBS, chunk_size: int | None = None,
               timeout: float = 60.0) -> str:
    """Push the store's image `source` to dest (a reference.Reference);
    returns the manifest digest."""
    import trio

    progress = progress or NullProgress()
    image = await trio.to_thread.run_sync(store.resolve, source)
    data = await trio.to_thread.run_sync(store.read_blob, image.manifest_digest)
    manifest = formats.Manifest.parse(data)
    repo, target = dest.repository, dest.tag or dest.digest
    if dest.digest and dest.digest != image.manifest_digest:
        raise RegistryError(f"{dest}: the image's manifest is {image.manifest_digest}")
    async with Client(dest.registry, tls_verify=tls_verify, creds=creds,
                      timeout=timeout) as client:
        scopes = (push_scope(repo),)
        if await client.head_manifest(repo, target, scopes) == image.manifest_digest:
            return image.manifest_digest
        sources = await trio.to_thread.run_sync(mount_sources, store, dest.registry, repo)
        blobs = list({d.digest: d for d in (manifest.config, *manifest.layers)}.values())
        limiter = trio.CapacityLimiter(max(1, jobs))

        async def one(desc):
            async with limiter:
                progress.start(desc.digest, desc.size, "blob")
                try:
                    status = await push_blob(client, repo, store, desc,
                                             sources.get(desc.digest, []), progress,
                                             chunk_size)
                except BaseException:
                    progress.finish(desc.digest, "failed")
                    raise
                progress.finish(desc.digest, status)

        await _all(trio, [(one, (d,)) for d in blobs])
        await client.put_manifest(repo, target, manifest.media_type, data)
    return image.manifest_digest
