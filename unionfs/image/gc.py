"""Housekeeping: removing images and collecting what nothing uses.

A layer directory or blob is deleted only when no image record and no
container record refers to it. Collection holds the store's gc lock
exclusively, so it waits for every writer (`Store.writing()`, which each
load/pull/commit holds shared) and no writer starts while it runs; that is
also why everything under tmp/ (but resumable partial blobs younger than a
day) is litter by then. Never call these while holding `store.writing()`.
"""
import os
import shutil
import time
from dataclasses import dataclass, field

from . import containers as containers_mod
from . import digest as dg
from . import formats
from . import reference as refs_mod
from .store import Store, StoreError, remove_tree

PARTIAL_MAX_AGE = 24 * 3600


@dataclass
class Removed:
    untagged: list = field(default_factory=list)
    images: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    blobs: list = field(default_factory=list)
    tmp: int = 0


def _users(store: Store, manifest_digest: str) -> list:
    return [c for c in containers_mod.list_all(store) if c.manifest_digest == manifest_digest]


def remove_image(store: Store, ref: str, force: bool = False) -> Removed:
    """`image rm`: a name of an image with other names is only untagged;
    otherwise the image and its names go, then its unused layers and blobs.
    An image a container uses is refused unless force (the container keeps
    its layers all the same)."""
    image = store.resolve(ref)
    removed = Removed()
    try:
        by_name = refs_mod.parse(ref).name in image.names
    except refs_mod.ReferenceError:
        by_name = False
    if by_name and len(image.names) > 1:
        name = refs_mod.parse(ref).name
        store.untag(name)
        removed.untagged.append(name)
        return removed
    users = _users(store, image.manifest_digest)
    if users and not force:
        raise StoreError(f"image {ref} is used by container {users[0].name}")
    lock = store.lock("gc.lock")
    try:
        for name in image.names:
            store.untag(name)
            removed.untagged.append(name)
        try:
            os.unlink(store.p("images", dg.parse(image.manifest_digest) + ".json"))
        except FileNotFoundError:
            pass
        removed.images.append(image.manifest_digest)
        _collect(store, removed)
    finally:
        lock.release()
    return removed


def prune(store: Store, all_images: bool = False) -> Removed:
    """Remove images without a name (all images with `all_images`) that no
    container uses, then every unused layer and blob, and tmp litter."""
    removed = Removed()
    lock = store.lock("gc.lock")
    try:
        used = {c.manifest_digest for c in containers_mod.list_all(store)}
        table = store.refs()
        named = set(table.values())
        for digest in store.image_records():
            if digest in used or (digest in named and not all_images):
                continue
            for name, d in table.items():
                if d == digest:
                    store.untag(name)
                    removed.untagged.append(name)
            os.unlink(store.p("images", dg.parse(digest) + ".json"))
            removed.images.append(digest)
        _collect(store, removed)
    finally:
        lock.release()
    return removed


def _collect(store: Store, removed: Removed) -> None:
    """With the gc lock held exclusively: delete unreferenced layers, blobs, litter."""
    live_layers, live_blobs = set(), set()
    for digest, record in store.image_records().items():
        live_blobs.add(digest)
        live_layers.update(record.get("diff_ids", ()))
        try:
            manifest = formats.Manifest.parse(store.read_blob(digest))
        except (StoreError, formats.FormatError):
            continue
        live_blobs.add(manifest.config.digest)
        live_blobs.update(d.digest for d in manifest.layers)
    for c in containers_mod.list_all(store):
        live_layers.update(c.diff_ids)
    for entry in os.listdir(store.p("tmp")):
        path = store.p("tmp", entry)
        if entry == "partial":
            for name in os.listdir(path):
                p = os.path.join(path, name)
                try:
                    if time.time() - os.stat(p).st_mtime > PARTIAL_MAX_AGE:
                        os.unlink(p)
                        removed.tmp += 1
                except FileNotFoundError:
                    pass
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        removed.tmp += 1
    for diff_id in store.layer_ids():
        if diff_id not in live_layers:
            remove_tree(store.layer_path(diff_id), store.p("tmp"))
            removed.layers.append(diff_id)
    for name in os.listdir(store.p("blobs", "sha256")):
        digest = "sha256:" + name
        if dg.is_digest(digest) and digest not in live_blobs:
            os.unlink(store.p("blobs", "sha256", name))
            removed.blobs.append(digest)
