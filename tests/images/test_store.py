"""The store on a tmp dir: layers once by diff_id, verification, crash and
concurrency safety, references, containers, garbage collection. No mount."""
import hashlib
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
from imagebuild import compress, sha, store_image
from tarbuild import entry, make_tar

from unionfs.image import containers, gc
from unionfs.image import digest as dg
from unionfs.image.applier import LayerError
from unionfs.image.store import Store, StoreError

BASE = make_tar([entry("bin", "dir"), entry("bin/sh", data=b"#!sh", mode=0o755),
                 entry("etc", "dir"), entry("etc/os", data=b"test")])
TOP = make_tar([entry("etc", "dir"), entry("etc/.wh.os"), entry("app", data=b"app")])


@pytest.fixture
def store(tmp_path):
    return Store.open(str(tmp_path / "store"))


def litter(store):
    return [e for e in os.listdir(store.p("tmp")) if e != "partial"]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_apply_layer_hashes_stores_and_unpacks(store, compression):
    blob = compress(BASE, compression)
    info = store.apply_layer(io.BytesIO(blob), diff_id=sha(BASE), blob_digest=sha(blob))
    assert (info.diff_id, info.blob_digest, info.compression) == (sha(BASE), sha(blob),
                                                                  compression)
    assert info.applied and store.read_blob(sha(blob)) == blob
    root = store.layer(sha(BASE)).lowerdir()
    assert open(os.path.join(root, "etc", "os"), "rb").read() == b"test"
    assert litter(store) == []


def test_a_layer_is_unpacked_once_for_every_compression(store):
    first = store.apply_layer(io.BytesIO(compress(BASE, "gzip")))
    again = store.apply_layer(io.BytesIO(compress(BASE, "zstd")), diff_id=sha(BASE))
    assert first.applied and not again.applied
    assert store.layer_ids() == [sha(BASE)]
    assert store.has_blob(again.blob_digest)        # its own blob is kept all the same


def test_wrong_blob_digest_leaves_nothing(store):
    blob = compress(BASE, "gzip")
    with pytest.raises(dg.DigestError, match="layer blob does not match its digest"):
        store.apply_layer(io.BytesIO(blob), blob_digest=sha(b"other"))
    assert store.layer_ids() == [] and litter(store) == []
    assert os.listdir(store.p("blobs", "sha256")) == []


def test_wrong_diff_id_leaves_nothing(store):
    with pytest.raises(dg.DigestError, match="does not match its diff_id"):
        store.apply_layer(io.BytesIO(compress(BASE, "gzip")), diff_id=sha(TOP))
    assert store.layer_ids() == [] and litter(store) == []


def test_corrupt_gzip_is_one_clear_error(store):
    blob = bytearray(compress(BASE * 50, "gzip"))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(LayerError, match="corrupt gzip layer data|not a valid tar"):
        store.apply_layer(io.BytesIO(bytes(blob)))
    assert store.layer_ids() == [] and litter(store) == []


def test_hostile_layer_leaves_nothing_in_the_store(store):
    bad = make_tar([entry("ok", data=b"x"), entry("../escape", data=b"x")])
    with pytest.raises(LayerError, match=r"'\.\.'"):
        store.apply_layer(io.BytesIO(bad))
    assert store.layer_ids() == [] and litter(store) == []


KILLED_APPLY = """
import io, sys, time
from unionfs.image.store import Store
class Slow(io.RawIOBase):
    def __init__(self, data): self.f = io.BytesIO(data)
    def readable(self): return True
    def readinto(self, b):
        n = self.f.readinto(memoryview(b)[:4096])
        if self.f.tell() > 200000:
            print("ready", flush=True); time.sleep(60)
        return n
data = open(sys.argv[2], "rb").read()
Store.open(sys.argv[1]).apply_layer(io.BufferedReader(Slow(data)))
"""


def test_a_killed_apply_leaves_no_layer(store, tmp_path):
    big = make_tar([entry(f"f{i}", data=os.urandom(2000)) for i in range(300)])
    (tmp_path / "layer.tar").write_bytes(big)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_APPLY, store.root,
                             str(tmp_path / "layer.tar")], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not store.has_layer(sha(big)) and store.layer_ids() == []
    assert litter(store)                    # its temp dir is litter ...
    gc.prune(store)
    assert litter(store) == []              # ... that prune removes
    assert store.apply_layer(io.BytesIO(big)).applied


def _apply_in_child(root, blob, diff_id, q):
    info = Store.open(root).apply_layer(io.BytesIO(blob), diff_id=diff_id)
    q.put(info.applied)


def test_concurrent_applies_of_one_layer_unpack_it_once(store):
    big = make_tar([entry(f"d/f{i}", data=os.urandom(500)) for i in range(400)])
    blob = compress(big, "gzip")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_apply_in_child, args=(store.root, blob, sha(big), q))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(q.get() for _ in procs) == [False, False, True]
    assert store.layer_ids() == [sha(big)] and litter(store) == []
    assert len(os.listdir(os.path.join(store.layer(sha(big)).lowerdir(), "d"))) == 400


def test_blob_writer_resumes_a_partial_blob(store):
    data = os.urandom(100_000)
    with store.blob_writer(sha(data), len(data)) as w:
        assert w.offset == 0
        w.write(data[:30_000])
    with store.blob_writer(sha(data), len(data)) as w:
        assert w.offset == 30_000
        w.write(data[30_000:])
        w.commit()
    assert store.read_blob(sha(data)) == data
    assert not os.path.exists(store.partial_path(sha(data)))


def test_blob_writer_refuses_wrong_content(store):
    data = b"x" * 1000
    with store.blob_writer(sha(data), len(data)) as w:
        w.write(b"y" * 1000)
        with pytest.raises(dg.DigestError, match="does not match its content"):
            w.commit()
    assert not store.has_blob(sha(data))
    assert not os.path.exists(store.partial_path(sha(data)))


def test_add_image_requires_its_blobs_and_layers(store):
    from unionfs.image import formats
    config = b'{"rootfs": {"type": "layers", "diff_ids": ["%s"]}}' % sha(BASE).encode()
    cd = store.add_blob_bytes(config)
    manifest = formats.make_manifest(formats.Descriptor(formats.OCI_CONFIG, cd, len(config)),
                                     [formats.Descriptor(formats.OCI_LAYER, sha(BASE),
                                                         len(BASE))])
    with pytest.raises(StoreError, match="not in the store"):
        store.add_image(manifest)


def test_resolve_by_name_digest_and_id_prefix(store):
    digest = store_image(store, [BASE, TOP], ["localhost/app:1"])
    image = store.resolve("localhost/app:1")
    assert image.manifest_digest == digest
    assert [layer.diff_id for layer in image.layers] == [sha(TOP), sha(BASE)]   # top first
    assert store.resolve(digest).id == image.id
    assert store.resolve(image.id[7:19]).manifest_digest == digest
    assert store.resolve(f"localhost/app@{digest}").manifest_digest == digest
    with pytest.raises(StoreError, match="no image 'localhost/app:2'"):
        store.resolve("localhost/app:2")


def test_image_rm_of_one_of_two_names_only_untags(store):
    store_image(store, [BASE], ["localhost/a:1", "localhost/b:1"])
    removed = gc.remove_image(store, "localhost/a:1")
    assert removed.untagged == ["localhost/a:1"] and removed.images == []
    assert store.resolve("localhost/b:1").names == ("localhost/b:1",)


def test_a_layer_is_deleted_only_when_nothing_uses_it(store):
    store_image(store, [BASE], ["localhost/base:1"])
    store_image(store, [BASE, TOP], ["localhost/app:1"])
    c = containers.create(store, store.resolve("localhost/app:1"), "localhost/app:1", "web")
    with pytest.raises(StoreError, match="used by container web"):
        gc.remove_image(store, "localhost/app:1")
    gc.remove_image(store, "localhost/app:1", force=True)
    gc.remove_image(store, "localhost/base:1")
    assert set(store.layer_ids()) == {sha(BASE), sha(TOP)}      # the container pins both
    assert c.lowerdirs(store) == [store.layer(sha(TOP)).lowerdir(),
                                  store.layer(sha(BASE)).lowerdir()]
    containers.remove(store, "web")
    removed = gc.prune(store)
    assert set(removed.layers) == {sha(BASE), sha(TOP)} and store.layer_ids() == []
    assert os.listdir(store.p("blobs", "sha256")) == []


def test_prune_keeps_named_images_and_drops_unnamed(store):
    keep = store_image(store, [BASE], ["localhost/keep:1"])
    drop = store_image(store, [TOP])
    removed = gc.prune(store)
    assert removed.images == [drop] and removed.layers == [sha(TOP)]
    assert store.resolve("localhost/keep:1").manifest_digest == keep


def test_container_names_are_unique_and_records_update(store):
    store_image(store, [BASE], ["localhost/base:1"])
    image = store.resolve("localhost/base:1")
    c = containers.create(store, image, "localhost/base:1", "one", ["sh"])
    with pytest.raises(StoreError, match="already in use"):
        containers.create(store, image, "localhost/base:1", "one")
    other = containers.create(store, image, "localhost/base:1")
    assert other.name and other.name != "one"
    assert os.path.isdir(c.upper) and os.path.isdir(c.work)
    containers.update(store, c.id, state="exited", exit_code=3, finished=time.time())
    got = containers.get(store, c.id[:8])
    assert (got.state, got.exit_code, got.config) == ("exited", 3, {"Cmd": ["/bin/sh"]})
    containers.remove(store, "one")
    with pytest.raises(StoreError, match="no container 'one'"):
        containers.get(store, "one")


def _read_all(reader) -> bytes:
    with reader as f:
        return f.read()


def test_an_uncompressed_layer_is_kept_as_a_tar_split(store):
    info = store.apply_layer(io.BytesIO(BASE), diff_id=sha(BASE), tar_split=True)
    assert info.blob_stored and info.blob_digest == sha(BASE)
    assert os.listdir(store.p("blobs", "sha256")) == []        # no copy of the blob ...
    assert store.has_blob(sha(BASE)) and store.blob_size(sha(BASE)) == len(BASE)
    assert _read_all(store.open_blob(sha(BASE))) == BASE       # ... it is rebuilt exactly


def test_a_tar_split_that_does_not_hold_asks_for_the_blob_again(store):
    dup = make_tar([entry("f", data=b"first"), entry("f", data=b"second")])
    info = store.apply_layer(io.BytesIO(dup), diff_id=sha(dup), tar_split=True)
    assert not info.blob_stored and not store.has_blob(sha(dup))
    again = store.apply_layer(io.BytesIO(dup), diff_id=sha(dup))
    assert again.blob_stored and _read_all(store.open_blob(sha(dup))) == dup


def test_a_changed_layer_file_is_an_error_when_rebuilding(store):
    from unionfs.image.tarsplit import TarSplitError
    store.apply_layer(io.BytesIO(BASE), diff_id=sha(BASE), tar_split=True)
    path = os.path.join(store.layer(sha(BASE)).lowerdir(), "etc", "os")
    with open(path, "wb") as f:
        f.write(b"TEST")                # same size, other bytes
    with pytest.raises(TarSplitError, match="the layer was changed"):
        _read_all(store.open_blob(sha(BASE)))


def test_tar_split_blobs_are_collected_with_their_layer(store):
    store.apply_layer(io.BytesIO(BASE), diff_id=sha(BASE), tar_split=True)
    gc.prune(store)
    assert not store.has_blob(sha(BASE)) and store.layer_ids() == []


def test_prepare_gives_the_runner_layers_config_and_dirs(store):
    store_image(store, [BASE, TOP], ["localhost/app:1"], run={"Cmd": ["/app"], "Env": ["A=1"]})
    c, image = containers.prepare(store, "localhost/app:1", name="r1", command=["sh"])
    assert image.lowerdirs == c.lowerdirs(store)
    assert os.path.exists(os.path.join(image.lowerdirs[0], "app"))       # top first
    assert image.config.run_config == {"Cmd": ["/app"], "Env": ["A=1"]} == c.config
    assert os.listdir(c.upper) == [] and os.listdir(c.work) == []
    assert containers.get(store, "r1").command == ["sh"]


class _Hashed:
    """The caller's side of apply_layer(blob_hash=...): hashes what is read."""

    def __init__(self, data, lie=None):
        self.raw, self.lie = io.BytesIO(data), lie
        self.hasher, self.size = hashlib.sha256(), 0

    def read(self, n=-1):
        data = self.raw.read(n)
        self.hasher.update(data)
        self.size += len(data)
        return data

    def hashed(self):
        digest, size = "sha256:" + self.hasher.hexdigest(), self.size
        if self.lie == "digest":
            return sha(b"other"), size
        return digest, size + (self.lie == "size")


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_a_blob_hashed_by_the_caller_is_not_hashed_again(store, compression, monkeypatch):
    blob = compress(BASE, compression)
    diff_id, blob_digest = sha(BASE), sha(blob)
    seen = []
    real = hashlib.sha256

    def counting_sha256(*args):
        h = real(*args)
        seen.append(h)
        return h
    stream = _Hashed(blob)
    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    info = store.apply_layer(stream, diff_id=diff_id, blob_digest=blob_digest,
                             blob_size=len(blob), keep_blob=False, blob_hash=stream.hashed)
    monkeypatch.undo()
    assert (info.diff_id, info.blob_digest, info.blob_size) == (diff_id, blob_digest, len(blob))
    assert store.has_layer(diff_id)
    # one hash for the tar (a gzip blob's diff_id), none for the blob itself
    assert len(seen) == (1 if compression == "gzip" else 0)


@pytest.mark.parametrize("lie", ["digest", "size"])
def test_a_caller_hash_that_does_not_match_leaves_nothing(store, lie):
    blob = compress(BASE, "gzip")
    stream = _Hashed(blob, lie)
    with pytest.raises((dg.DigestError, StoreError), match="layer blob"):
        store.apply_layer(stream, diff_id=sha(BASE), blob_digest=sha(blob), blob_size=len(blob),
                          keep_blob=False, blob_hash=stream.hashed)
    assert not store.has_layer(sha(BASE))
    assert litter(store) == []


def test_delete_tree_never_follows_a_symlink(tmp_path):
    from unionfs.image.staging import delete_tree
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    doomed = tmp_path / "doomed"
    (doomed / "a" / "b").mkdir(parents=True)
    (doomed / "a" / "b" / "f").write_text("x")
    (doomed / "a" / "dir-link").symlink_to(outside)
    (doomed / "a" / "file-link").symlink_to(outside / "keep")
    os.mkfifo(doomed / "fifo")
    (doomed / "ro").mkdir()
    (doomed / "ro" / "f").write_text("x")
    os.chmod(doomed / "ro", 0o500)
    delete_tree(str(doomed))
    assert not doomed.exists()
    assert (outside / "keep").read_text() == "keep"


def test_a_container_of_an_image_pruned_meanwhile_is_refused(store):
    store_image(store, [BASE], ["localhost/base:1"])
    image = store.resolve("localhost/base:1")       # resolved, then removed before the run
    gc.remove_image(store, "localhost/base:1")
    with pytest.raises(StoreError, match="was removed from the store meanwhile"):
        containers.start(store, image, "localhost/base:1", "late")
    assert containers.list_all(store) == [] and litter(store) == []


def test_a_started_container_is_running_until_finished(store):
    store_image(store, [BASE], ["localhost/base:1"])
    image = store.resolve("localhost/base:1")
    c, lock = containers.start(store, image, "localhost/base:1", "r", ["sh"])
    got = containers.get(store, "r")
    assert (got.state, got.pid, got.is_running()) == ("running", os.getpid(), True)
    with pytest.raises(StoreError, match="container r is running"):
        containers.remove(store, "r")
    with pytest.raises(StoreError, match="is used by container r"):
        gc.remove_image(store, "localhost/base:1")
    containers.finish(store, c, lock, 7)
    got = containers.get(store, "r")
    assert (got.state, got.exit_code, got.is_running()) == ("exited", 7, False)
    containers.remove(store, "r")
    assert containers.list_all(store) == []
