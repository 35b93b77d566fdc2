"""The content-addressed image store: layout, locks, atomic renames, blobs,
unpacked layers, image records and references. Layout: docs/images.md.

Public API (stable; the registry client, the runner and the CLI use only this):

    store = Store.open(path=None)       # --store, else $UNIONFS_STORE, else the default
    with store.writing():               # a shared lock that keeps prune/rm out; every
        ...                             # method below takes it too, nesting is fine
    # blobs (verified on the way in; never trusted)
    store.has_blob(digest) -> bool                       # a file, or a layer's tar-split
    store.blob_path(digest) -> str                       # the file (absent for tar-splits)
    store.read_blob(digest) -> bytes                     # small blobs (manifests, configs)
    store.open_blob(digest) -> reader; store.blob_size(digest) -> int   # any blob
    store.add_blob_bytes(data, expected=None) -> digest
    store.blob_writer(digest, size=None) -> BlobWriter   # resumable partial blob:
        w.offset; w.write(chunk); w.commit()             # partial kept until commit
    # layers: unpacked once, keyed by diff_id, shared read-only
    store.has_layer(diff_id) -> bool
    store.layer(diff_id) -> StoredLayer                  # .diff_id, .lowerdir()
    store.apply_layer(stream, *, diff_id=None, blob_digest=None, blob_size=None,
                      keep_blob=True, tar_split=False) -> LayerInfo   # stream: the blob
    store.apply_layer_from_blob(blob_digest, diff_id=None) -> LayerInfo
    store.pending_layer(diff_id) -> PendingLayer  # for a pipeline that hashes itself:
        p.exists; p.unpack(tar_reader); p.commit(diff_id, size, blob_digest, compression)
    store.partial_path(digest) -> str; store.adopt_blob(path, digest, verified=False)
    # images and references
    store.add_image(manifest_bytes, names=()) -> manifest digest
    store.tag(name, manifest_digest); store.untag(name); store.refs() -> {name: digest}
    store.resolve(ref) -> Image       # .layers top-first (LayerSource), .config, ...
    store.images() -> [Image]
Containers (records, upper/work dirs; `containers.prepare(store, ref)` for the
runner) are in containers.py, housekeeping in gc.py, what is built in tmp/
(locks, BlobWriter, PendingLayer) in staging.py. A whole pull or load should
run inside one `store.writing()`, so that prune cannot take a blob or layer
it stored before its image is recorded.

A layer is seen by the filesystem and the runner only through LayerSource:
`diff_id` and `lowerdir()` (a directory to pass as a lower layer). A later
lazily fetched layer implements the same two members.
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import digest as dg
from . import formats, tarsplit
from . import reference as refs_mod
from .staging import (  # noqa: F401 - part of this module's API
    BlobWriter,
    Lock,
    PendingLayer,
    StoreError,
    make_temp_dir,
    may_chown_and_mknod,
    remove_tree,
    write_atomic,
)

if TYPE_CHECKING:
    from .applier import ApplyResult
# The applier (tarfile) and the decompressors are imported where a layer is
# applied: `unionfs run IMAGE` opens the store and resolves an image only.

STORE_ENV = "UNIONFS_STORE"
LAYOUT_VERSION = 1
CHUNK = 1 << 20


class LayerSource(Protocol):
    diff_id: str

    def lowerdir(self) -> str:
        """A directory holding the layer in the filesystem's marker format."""


@dataclass(frozen=True)
class StoredLayer:
    diff_id: str
    path: str           # layers/<hex>: diff/ and layer.json

    def lowerdir(self) -> str:
        return os.path.join(self.path, "diff")

    def info(self) -> dict:
        with open(os.path.join(self.path, "layer.json"), "rb") as f:
            return json.load(f)


@dataclass(frozen=True)
class LayerInfo:
    diff_id: str
    size: int                   # uncompressed tar size
    blob_digest: str | None     # the blob it was read from
    blob_size: int | None
    compression: str
    applied: bool               # False: the layer was already in the store
    result: ApplyResult | None = None
    blob_stored: bool = True    # False: a tar-split did not hold; offer the blob again


@dataclass(frozen=True)
class Image:
    manifest_digest: str
    manifest: formats.Manifest
    config_digest: str
    config: formats.ImageConfig
    names: tuple
    layers: tuple               # LayerSources, TOP FIRST (the order of --lower)
    loaded: float

    @property
    def id(self) -> str:
        """The image id, as docker and podman show it: the config's digest."""
        return self.config_digest

    @property
    def lowerdirs(self) -> list:
        return [layer.lowerdir() for layer in self.layers]


def default_path() -> str:
    env = os.environ.get(STORE_ENV)
    if env:
        return env
    from ..sys.capabilities import is_privileged
    if is_privileged():
        return "/var/lib/unionfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return os.path.join(data, "unionfs")


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._writing_depth = 0
        self._writing_lock = None
        self._writing_mutex = threading.Lock()  # writers may be worker threads

    @classmethod
    def open(cls, path: str | None = None) -> "Store":
        store = cls(path or default_path())
        store.init()
        return store

    # --- layout ----------------------------------------------------------------

    def p(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def init(self) -> None:
        try:
            for d in ("blobs/sha256", "layers", "images", "containers", "locks",
                      "tmp/partial"):
                os.makedirs(self.p(d), 0o700 if d == "tmp/partial" else 0o755, exist_ok=True)
            version = self.p("store.json")
            if not os.path.exists(version):
                write_atomic(version, json.dumps({"version": LAYOUT_VERSION}).encode())
        except OSError as e:
            raise StoreError(f"cannot use the store {self.root}: {e.strerror}") from None
        with open(self.p("store.json"), "rb") as f:
            try:
                found = json.load(f).get("version")
            except ValueError:
                found = None
        if found != LAYOUT_VERSION:
            raise StoreError(f"{self.root} is not a unionfs store of layout {LAYOUT_VERSION}")

    def lock(self, name: str, exclusive: bool = True, blocking: bool = True) -> Lock:
        return Lock(self.p("locks", name), exclusive, blocking)

    @contextmanager
    def writing(self):
        """Hold the store's shared lock: prune and image removal (exclusive)
        wait until no writer is inside. Re-entrant within this object and
        safe from several threads (one shared lock for all of them). Never
        call gc's functions while holding it (they would wait for it)."""
        with self._writing_mutex:
            if self._writing_depth == 0:
                self._writing_lock = self.lock("gc.lock", exclusive=False)
            self._writing_depth += 1
        try:
            yield self
        finally:
            with self._writing_mutex:
                self._writing_depth -= 1
                if self._writing_depth == 0:
                    self._writing_lock.release()
                    self._writing_lock = None

    def tmpdir(self, prefix: str) -> str:
        return make_temp_dir(self.p("tmp"), prefix)

    # --- blobs -----------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return self.p("blobs", "sha256", dg.parse(digest))

    def has_blob(self, digest: str) -> bool:
        """A blob file, or an uncompressed layer blob kept as a tar-split."""
        return os.path.exists(self.blob_path(digest)) or self._split_layer(digest) is not None

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is not in the store") from None

    def add_blob_bytes(self, data: bytes, expected: str | None = None) -> str:
        digest = dg.of_bytes(data)
        if expected is not None and digest != expected:
            raise dg.DigestError(f"blob does not match its digest: expected {expected}, "
                                 f"got {digest}")
        path = self.blob_path(digest)
        if not os.path.exists(path):
            with self.writing():
                write_atomic(path, data)
        return digest

    def blob_writer(self, digest: str, size: int | None = None) -> BlobWriter:
        return BlobWriter(self, digest, size)

    # --- layers ----------------------------------------------------------------

    def layer_path(self, diff_id: str) -> str:
        return self.p("layers", dg.parse(diff_id))

    def has_layer(self, diff_id: str) -> bool:
        return os.path.exists(os.path.join(self.layer_path(diff_id), "layer.json"))

    def layer(self, diff_id: str) -> StoredLayer:
        if not self.has_layer(diff_id):
            raise StoreError(f"layer {diff_id} is not in the store")
        return StoredLayer(diff_id, self.layer_path(diff_id))

    def layer_ids(self) -> list:
        return ["sha256:" + h for h in os.listdir(self.p("layers")) if dg.is_digest("sha256:" + h)]

    def pending_layer(self, diff_id: str | None = None) -> "PendingLayer":
        """A layer being unpacked into a temp dir (see PendingLayer)."""
        return PendingLayer(self, diff_id)

    def partial_path(self, digest: str) -> str:
        """Where a resumable partial blob is kept (tmp/partial/<hex>)."""
        return self.p("tmp", "partial", dg.parse(digest))

    def adopt_blob(self, path: str, digest: str, *, verified: bool = False) -> str:
        """Move a complete blob file (on the store's filesystem, e.g. a
        partial_path) into blobs/. Unless `verified` (the caller hashed every
        byte as it arrived), it is hashed here first."""
        if not verified:
            with open(path, "rb") as f:
                reader = dg.HashingReader(f)
                reader.drain()
            if reader.digest != digest:
                os.unlink(path)
                raise dg.DigestError(f"blob does not match its digest: expected {digest}, "
                                     f"got {reader.digest}")
        with self.writing():
            if self.has_blob(digest):
                os.unlink(path)
            else:
                os.rename(path, self.blob_path(digest))
        return digest

    def apply_layer(self, stream, *, diff_id: str | None = None, blob_digest: str | None = None,
                    blob_size: int | None = None, keep_blob: bool = True,
                    tar_split: bool = False, blob_hash=None) -> LayerInfo:
        """Read one layer blob from `stream` once: hash it (and store it as a
        blob if keep_blob), decompress (gzip/zstd/none, from its magic),
        hash the tar (its diff_id) and unpack it, all in one pass. The
        expected digests are checked; on any failure nothing is left behind.
        If the layer is in the store already, only the blob is stored (still
        verified: the tar is hashed, not unpacked).

        tar_split: an uncompressed blob is kept as a tar-split next to the
        unpacked files instead of a copy (tarsplit.py). Should the split
        not hold, the result has blob_stored=False and the caller must offer
        the blob again (apply_layer with the same stream content).

        blob_hash: for a caller that hashes the blob's bytes itself as they
        pass into `stream` (a pull's BlobWriter), a function returning
        (digest, size) of all the bytes `stream` gave; they are then not
        hashed a second time here. It is called once the stream is drained,
        and its answer is checked as a hash of our own would be, before the
        layer is moved into place."""
        from .compression import decompressing_reader, sniff
        with self.writing():
            need_blob = keep_blob and (blob_digest is None or not self.has_blob(blob_digest))
            if diff_id is not None and self.has_layer(diff_id) and not need_blob:
                info = self.layer(diff_id).info()
                compression = "unknown"
                if blob_digest is not None and self.has_blob(blob_digest):
                    with self.open_blob(blob_digest) as f:
                        compression = formats.sniff_compression(f.read(4))
                    blob_size = self.blob_size(blob_digest)
                return LayerInfo(diff_id, info["size"], blob_digest, blob_size, compression,
                                 applied=False)
            with self.pending_layer(diff_id) as pending:
                blob_path = os.path.join(pending.work, "blob")
                blob_file = None
                recorder = None
                try:
                    src = dg.HashingReader(stream, hashing=blob_hash is None)
                    compression, head = sniff(src)
                    if need_blob and tar_split and compression == "none" and not pending.exists:
                        os.makedirs(pending.root, 0o755)
                        recorder = tarsplit.Recorder(head, os.path.join(pending.work, "layer",
                                                                        tarsplit.RAW))
                    elif need_blob:
                        blob_file = open(blob_path, "wb")
                        blob_file.write(head.head)      # what sniff() read already
                        src.sink = blob_file
                    if compression == "none":
                        tar_stream, tar_hash = recorder or head, src   # the blob is the tar
                    else:
                        tar_hash = dg.HashingReader(decompressing_reader(head, compression))
                        tar_stream = tar_hash
                    result = None if pending.exists else pending.unpack(tar_stream, recorder)
                    _drain(tar_stream)
                    src.drain()
                finally:
                    if blob_file is not None:
                        blob_file.close()
                got, got_size = (src.digest, src.size) if blob_hash is None else blob_hash()
                if got_size != src.size:
                    raise StoreError(f"layer blob: {got_size} bytes hashed by the caller, "
                                     f"{src.size} read")
                if blob_digest is not None and got != blob_digest:
                    raise dg.DigestError(f"layer blob does not match its digest: expected "
                                         f"{blob_digest}, got {got}")
                if blob_size is not None and got_size != blob_size:
                    raise dg.DigestError(f"layer blob {got} has {got_size} bytes, "
                                         f"expected {blob_size}")
                # an uncompressed blob is its tar: its digest is the diff_id
                tar_digest, tar_size = ((got, got_size) if tar_hash is src
                                        else (tar_hash.digest, tar_hash.size))
                split = False
                if recorder is not None:
                    split = recorder.finish(os.path.join(pending.work, "layer"))
                    if not split:
                        os.unlink(os.path.join(pending.work, "layer", tarsplit.RAW))
                applied = pending.commit(tar_digest, tar_size, got, compression,
                                         tar_split=split)
                stored = not need_blob or blob_file is not None or (split and applied)
                if blob_file is not None:
                    self.adopt_blob(blob_path, got, verified=True)
            return LayerInfo(tar_digest, tar_size, got, got_size, compression,
                             applied, result, blob_stored=stored or self.has_blob(got))

    # blobs kept as a layer's tar-split (uncompressed layers of docker archives)

    def _split_layer(self, digest: str) -> str | None:
        path = os.path.join(self.layer_path(digest), tarsplit.INDEX)
        return self.layer_path(digest) if os.path.exists(path) else None

    def open_blob(self, digest: str):
        """A reader of the blob: its file, or rebuilt from a layer's tar-split
        (checked against the digest as it ends)."""
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            pass
        layer_dir = self._split_layer(digest)
        if layer_dir is None:
            raise StoreError(f"blob {digest} is not in the store")
        return tarsplit.Reader(layer_dir, digest)

    def blob_size(self, digest: str) -> int:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            pass
        if self._split_layer(digest) is None:
            raise StoreError(f"blob {digest} is not in the store")
        return self.layer(digest).info()["size"]

    def apply_layer_from_blob(self, blob_digest: str, diff_id: str | None = None) -> LayerInfo:
        with self.open_blob(blob_digest) as f:
            return self.apply_layer(f, diff_id=diff_id, blob_digest=blob_digest,
                                    keep_blob=False)

    # --- images and references ---------------------------------------------------

    def add_image(self, manifest_bytes: bytes, names=()) -> str:
        """Record an image whose config blob, layer blobs and unpacked layers
        are in the store (checked), and point `names` at it."""
        manifest = formats.Manifest.parse(manifest_bytes)
        with self.writing():
            config = formats.ImageConfig.parse(self.read_blob(manifest.config.digest))
            diff_ids = config.diff_ids
            if len(diff_ids) != len(manifest.layers):
                raise formats.FormatError(f"the manifest has {len(manifest.layers)} layers, "
                                          f"its config {len(diff_ids)} diff_ids")
            for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
                if not self.has_blob(desc.digest):
                    raise StoreError(f"layer blob {desc.digest} is not in the store")
                if not self.has_layer(diff_id):
                    raise StoreError(f"layer {diff_id} is not unpacked in the store")
            digest = self.add_blob_bytes(manifest_bytes)
            record = self.p("images", dg.parse(digest) + ".json")
            if not os.path.exists(record):
                write_atomic(record, json.dumps({
                    "manifest": digest, "config": manifest.config.digest,
                    "diff_ids": diff_ids, "loaded": time.time()}).encode())
            for name in names:
                self.tag(name, digest)
        return digest

    def image_records(self) -> dict:
        out = {}
        for entry in os.listdir(self.p("images")):
            if entry.endswith(".json") and dg.is_digest("sha256:" + entry[:-5]):
                try:
                    with open(self.p("images", entry), "rb") as f:
                        out["sha256:" + entry[:-5]] = json.load(f)
                except FileNotFoundError:
                    continue
        return out

    def refs(self) -> dict:
        try:
            with open(self.p("refs.json"), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _write_refs(self, table: dict) -> None:
        write_atomic(self.p("refs.json"), json.dumps(table, indent=1, sort_keys=True).encode())

    def tag(self, name: str, manifest_digest: str) -> str:
        name = refs_mod.parse(name).name
        if not os.path.exists(self.p("images", dg.parse(manifest_digest) + ".json")):
            raise StoreError(f"no image {manifest_digest} in the store")
        lock = self.lock("meta.lock")
        try:
            table = self.refs()
            table[name] = manifest_digest
            self._write_refs(table)
        finally:
            lock.release()
        return name

    def untag(self, name: str) -> None:
        name = refs_mod.parse(name).name
        lock = self.lock("meta.lock")
        try:
            table = self.refs()
            if table.pop(name, None) is None:
                raise StoreError(f"no image named {name}")
            self._write_refs(table)
        finally:
            lock.release()

    def _image(self, manifest_digest: str, record: dict, table: dict) -> Image:
        manifest = formats.Manifest.parse(self.read_blob(manifest_digest))
        config = formats.ImageConfig.parse(self.read_blob(manifest.config.digest))
        names = tuple(sorted(n for n, d in table.items() if d == manifest_digest))
        layers = tuple(self.layer(d) for d in reversed(config.diff_ids))
        return Image(manifest_digest, manifest, manifest.config.digest, config, names,
                     layers, record.get("loaded", 0.0))

    def images(self) -> list:
        table = self.refs()
        out = []
        for digest, record in self.image_records().items():
            try:
                out.append(self._image(digest, record, table))
            except StoreError:
                continue        # being removed right now
        return sorted(out, key=lambda i: (-i.loaded, i.manifest_digest))

    def resolve(self, ref: str) -> Image:
        """An image by name (`busybox`, `localhost/x:1`, `name@sha256:..`), by
        manifest or config digest, or by a unique prefix (4+ hex digits) of
        its id. Its layers are top first."""
        records = self.image_records()
        table = self.refs()
        digest = None
        if dg.is_digest(ref):
            digest = ref if ref in records else next(
                (m for m, r in records.items() if r.get("config") == ref), None)
        else:
            hexpart = ref[7:] if ref.startswith("sha256:") else ref
            try:
                parsed = refs_mod.parse(ref)
            except refs_mod.ReferenceError:
                parsed = None
            if parsed is not None and parsed.digest is not None:
                digest = parsed.digest if parsed.digest in records else None
            elif parsed is not None and parsed.name in table:
                digest = table[parsed.name]
            elif len(hexpart) >= 4 and all(c in "0123456789abcdef" for c in hexpart):
                found = {m for m, r in records.items()
                         if dg.parse(r.get("config", m)).startswith(hexpart)
                         or dg.parse(m).startswith(hexpart)}
                if len(found) > 1:
                    raise StoreError(f"image id prefix {ref!r} is ambiguous")
                digest = found.pop() if found else None
        if digest is None or digest not in records:
            raise StoreError(f"no image {ref!r} in the store")
        return self._image(digest, records[digest], table)


def _drain(reader) -> None:
    while reader.read(CHUNK):
        pass

