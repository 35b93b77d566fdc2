"""`unionfs pull`: an image from a registry into the store, ready to run.

Owns the order of a pull: the manifest (an index or list resolved to one
platform), the config (small, verified, stored), then every layer the store
lacks, fetched in parallel and unpacked while it streams (transfer.py), and
last the image record and its name, so that a pull killed at any point
leaves only blobs, partial blobs and temporary directories: never a name
that points at something missing. A layer whose unpacked form and blob are
both in the store is not fetched again. The store's shared writing lock is
held from the first blob to the image record, so a prune or `image rm`
waits (nothing refers to a pull's blobs before its record exists).
"""
from __future__ import annotations

import os
from contextlib import asynccontextmanager
from dataclasses import dataclass

from . import formats
from .registry import Client, RegistryError, printable

MAX_CONFIG = formats.MAX_JSON
DEFAULT_JOBS = 4


class LayerFailed(Exception):
    """A layer's content was refused (digest, diff_id, tar): one line naming it."""


class NullProgress:
    """What pull and push report; the CLI draws it (cli/registry.py)."""

    def start(self, key: str, total: int, what: str) -> None:
        pass

    def advance(self, key: str, n: int) -> None:
        pass

    def finish(self, key: str, status: str) -> None:
        pass


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RegistryError(f"invalid platform {printable(text, 40)!r} "
                                "(expected OS/ARCH[/VARIANT], e.g. linux/arm64)")
        return cls(*parts)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def choose(index: formats.Index, platform: Platform | None) -> formats.Descriptor:
    """The image manifest of an index for the platform (default: this host's)."""
    descs = index.manifests
    if platform and platform.variant:
        descs = [d for d in descs if (d.platform or {}).get("variant") == platform.variant]
    want = (platform.os, platform.architecture) if platform else None
    try:
        return formats.pick_platform(descs, want)
    except formats.FormatError:
        found = sorted({"/".join(x for x in (p.get("os"), p.get("architecture"),
                                             p.get("variant")) if x)
                        for p in (d.platform or {} for d in index.manifests)})
        raise RegistryError(f"no image for platform {platform or '/'.join(formats.host_platform())}"
                            f" (the index has {', '.join(found) or 'none'})") from None


async def resolve_manifest(client: Client, ref, platform: Platform | None):
    """(manifest bytes, digest, parsed Manifest), following an index once."""
    fetched = await client.get_manifest(ref.repository, ref.digest or ref.tag)
    doc = formats.load_json(fetched.data, f"manifest of {ref}")
    kind = doc.get("mediaType") or fetched.media_type
    if kind in formats.INDEX_TYPES or "manifests" in doc:
        desc = choose(formats.Index.parse(fetched.data), platform)
        if desc.media_type not in formats.MANIFEST_TYPES:
            raise RegistryError(f"{ref}: nested indexes are not supported")
        fetched = await client.get_manifest(ref.repository, desc.digest)
        if len(fetched.data) != desc.size:
            raise RegistryError(f"manifest {desc.digest}: {len(fetched.data)} bytes, "
                                f"the index says {desc.size}")
    manifest = formats.Manifest.parse(fetched.data, fetched.media_type or None)
    return fetched.data, fetched.digest, manifest


def _check_space(store, layers) -> None:
    need = sum(desc.size for desc in layers)
    st = os.statvfs(store.root)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise RegistryError(f"the image's layers are {need / 1e9:.1f} GB compressed, "
                            f"the store has {free / 1e9:.1f} GB free")


async def pull(store, ref, *, tls_verify: bool = True, creds=None,
               platform: Platform | None = None, progress=None, jobs: int = DEFAULT_JOBS,
               timeout: float = 60.0):
    """Pull ref (a reference.Reference) into store; returns the store's Image."""
    import trio

    progress = progress or NullProgress()
    async with Client(ref.registry, tls_verify=tls_verify, creds=creds,
                      timeout=timeout) as client:
        data, digest, manifest = await resolve_manifest(client, ref, platform)
        # From the first blob stored to the image record, prune and image rm must
        # wait: until the record exists nothing refers to what this pull stored.
        async with _writing(trio, store):
            await _fetch(trio, client, store, ref, manifest, progress, jobs)
            manifest_digest = await trio.to_thread.run_sync(
                lambda: store.add_image(data, names=[ref.name]))
    if manifest_digest != digest:
        raise RegistryError(f"the store recorded manifest {manifest_digest}, not {digest}")
    return await trio.to_thread.run_sync(store.resolve, manifest_digest)


@asynccontextmanager
async def _writing(trio, store):
    """store.writing() for an async block: the shared lock is taken in a worker
    thread (it waits for a prune in progress) and held by this process; every
    store call inside, in any thread, nests in it."""
    held = store.writing()
    await trio.to_thread.run_sync(held.__enter__)
    try:
        yield
    finally:
        held.__exit__(None, None, None)


async def _fetch(trio, client, store, ref, manifest, progress, jobs) -> None:
    """The config and every layer the store lacks, in parallel."""
    from .transfer import fetch_layer

    cfg = manifest.config
    if store.has_blob(cfg.digest):
        config_bytes = await trio.to_thread.run_sync(store.read_blob, cfg.digest)
    else:
        config_bytes = await client.get_small_blob(ref.repository, cfg.digest, cfg.size,
                                                   MAX_CONFIG)
        await trio.to_thread.run_sync(store.add_blob_bytes, config_bytes, cfg.digest)
    config = formats.ImageConfig.parse(config_bytes)
    diff_ids = config.diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise RegistryError(f"{ref}: the manifest has {len(manifest.layers)} layers, "
                            f"its config {len(diff_ids)} diff_ids")
    todo, seen = [], set()
    for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
        if desc.media_type not in formats.LAYER_TYPES or "foreign" in desc.media_type:
            raise RegistryError(f"layer {desc.digest}: unsupported media type "
                                f"{printable(desc.media_type, 80)!r}")
        have_blob, have_layer = store.has_blob(desc.digest), store.has_layer(diff_id)
        if have_blob and have_layer:
            progress.start(desc.digest, desc.size, "layer")
            progress.finish(desc.digest, "exists")
        elif (desc.digest, diff_id) not in seen:
            seen.add((desc.digest, diff_id))
            todo.append((desc, diff_id, not have_layer))
    _check_space(store, [t[0] for t in todo if not store.has_blob(t[0].digest)])

    limiter = trio.CapacityLimiter(max(1, jobs))

    async def one(desc, diff_id, unpack):
        async with limiter:
            progress.start(desc.digest, desc.size, "layer")
            try:
                await fetch_layer(client, ref.repository, store, desc.digest, desc.size,
                                  diff_id, unpack=unpack,
                                  on_bytes=lambda n: progress.advance(desc.digest, n))
            except trio.Cancelled:
                progress.finish(desc.digest, "cancelled")
                raise
            except RegistryError:
                progress.finish(desc.digest, "failed")
                raise               # names the blob already
            except Exception as e:  # noqa: BLE001 - the store's errors: say which layer
                progress.finish(desc.digest, "failed")
                raise LayerFailed(f"layer {desc.digest}: {e}") from e
            progress.finish(desc.digest, "done")

    await _all(trio, [(one, t) for t in todo])


async def _all(trio, calls) -> None:
    """Run calls concurrently; the first failure cancels the rest and is raised
    alone (not wrapped in an ExceptionGroup), so the user sees one line."""
    first = []

    async def guarded(fn, args):
        try:
            await fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the nursery
            if not first:
                first.append(e)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for fn, args in calls:
            nursery.start_soon(guarded, fn, args)
    if first:
        raise first[0]
