"""`unionfs pull` against a real docker-registry, with images pushed by skopeo.

What a pull unpacks, mounted with unionfs, must equal umoci's flattening of
the same image in names, types, modes, owners, sizes, content, xattrs, link
targets and hard-link sets; for OCI and Docker v2 manifests, gzip, zstd and
uncompressed layers, indexes, and a pull killed half-way and resumed.
"""
import os
import pty
import select
import shutil
import signal
import subprocess
import time

import pytest
from registry_fixture import (
    Proxy,
    Registry,
    name_in_layout,
    oci_image,
    oci_index,
    sample_layers,
    skopeo,
    skopeo_push,
    tar_entries,
    token_registry,
    umoci_unpack,
)
from treecmp import describe, diff, provider

from mountutil import UNIONFS, unionfs_mount, wait_for

TOOLS = ("docker-registry", "skopeo", "umoci")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)}")


def pull(store, *args, check=True, **kw):
    proc = subprocess.run([UNIONFS, "pull", "--store", str(store), "--tls-verify=false", *args],
                          capture_output=True, text=True, timeout=120, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def stored(store_dir, ref):
    from unionfs.image.store import Store
    return Store.open(str(store_dir)).resolve(ref)


def merged_tree(store_dir, ref, mnt):
    """The image as a container sees it, mounted with unionfs. unionfs gives
    each name of a lower hard-link set its own inode on purpose (docs/format.md,
    "Lower hard links"), so link sets come from the layers the pull unpacked."""
    os.makedirs(mnt, exist_ok=True)
    lowers = stored(store_dir, ref).lowerdirs
    with unionfs_mount(mnt, lowers):
        return describe(str(mnt), inode_of=provider(lowers))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """An OCI layout holding the interop image in several compressions, and
    umoci's flattening of it."""
    root = tmp_path_factory.mktemp("sample")
    layout = str(root / "oci")
    layers = sample_layers()
    for tag, compressions in {"gzip": ["gzip"] * 3, "none": ["none"] * 3,
                              "zstd": ["zstd"] * 3, "mixed": ["gzip", "zstd", "none"]}.items():
        name_in_layout(layout, tag, oci_image(layout, list(zip(layers, compressions, strict=True))))
    rootfs = umoci_unpack(layout, "gzip", str(root / "umoci"))
    return layout, describe(rootfs)


@pytest.fixture
def registry(tmp_path):
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.mark.parametrize("tag,extra", [("gzip", ()), ("none", ()), ("zstd", ()), ("mixed", ()),
                                       ("gzip", ("--format", "v2s2"))],
                         ids=["oci-gzip", "oci-uncompressed", "oci-zstd", "oci-mixed",
                              "docker-v2s2"])
def test_pull_matches_umoci(sample, registry, tmp_path, tag, extra):
    layout, expected = sample
    skopeo_push(layout, tag, f"{registry.host}/sample:{tag}", *extra)
    ref = f"{registry.host}/sample:{tag}"
    image_id = pull(tmp_path / "store", ref).stdout.strip()
    image = stored(tmp_path / "store", ref)
    assert image.id == image_id
    media_type = ("application/vnd.docker.distribution.manifest.v2+json" if extra
                  else "application/vnd.oci.image.manifest.v1+json")
    assert image.manifest.media_type == media_type      # not schema1, not a 404
    assert diff(merged_tree(tmp_path / "store", ref, tmp_path / "mnt"), expected) == []


def test_pull_again_fetches_no_blob(sample, registry, tmp_path):
    layout, _ = sample
    skopeo_push(layout, "gzip", f"{registry.host}/sample:1")
    with Proxy(registry.host) as proxy:
        pull(tmp_path / "store", f"{proxy.host}/sample:1")
        first = [e for e in proxy.log if "/blobs/" in e[1]]
        proxy.log.clear()
        out = pull(tmp_path / "store", f"{proxy.host}/sample:1")
    assert len(first) == 4          # config and three layers
    assert [e for e in proxy.log if "/blobs/" in e[1]] == []
    assert out.stderr.count(": exists") == 3


def _index_layout(root):
    layout = str(root / "multi")
    amd = oci_image(layout, [(t, "gzip") for t in sample_layers(seed=1)], arch="amd64")
    arm = oci_image(layout, [(t, "gzip") for t in sample_layers(seed=2)], arch="arm64")
    name_in_layout(layout, "multi", oci_index(layout, [amd, arm]))
    return layout


def test_pull_index_picks_the_platform(registry, tmp_path):
    layout = _index_layout(tmp_path)
    skopeo_push(layout, "multi", f"{registry.host}/multi:1", "--all")
    ref = f"{registry.host}/multi:1"
    pull(tmp_path / "amd", ref)
    pull(tmp_path / "arm", "--platform", "linux/arm64", ref)
    for store, seed, arch in ((tmp_path / "amd", 1, "amd64"), (tmp_path / "arm", 2, "arm64")):
        image = stored(store, ref)
        assert image.config.raw["architecture"] == arch
        with open(os.path.join(image.lowerdirs[0], "top.txt"), "rb") as f:
            assert f.read() == b"top %d\n" % seed


def test_pull_unknown_platform_is_one_line(registry, tmp_path):
    layout = _index_layout(tmp_path)
    skopeo_push(layout, "multi", f"{registry.host}/multi:1", "--all")
    out = pull(tmp_path / "store", "--platform", "linux/s390x", f"{registry.host}/multi:1",
               check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "unionfs pull: no image for platform linux/s390x (the index has linux/amd64, "
        "linux/arm64)"]


def test_layers_are_fetched_in_parallel(sample, registry, tmp_path):
    layout, _ = sample
    skopeo_push(layout, "none", f"{registry.host}/sample:1")
    with Proxy(registry.host) as proxy:
        proxy.throttle = 2 << 20            # every blob takes a while
        pull(tmp_path / "store", f"{proxy.host}/sample:1")
    layers = [e for e in proxy.log if "/blobs/" in e[1] and e[0] == "GET"][1:]  # after config
    assert len(layers) == 3
    first_end = min(e[5] for e in layers)
    assert all(e[4] < first_end for e in layers)    # all started before any finished


def test_killed_pull_resumes_with_a_range_request(sample, registry, tmp_path):
    layout, expected = sample
    skopeo_push(layout, "none", f"{registry.host}/sample:1")
    store = tmp_path / "store"
    with Proxy(registry.host) as proxy:
        proxy.throttle = 1 << 20
        proc = subprocess.Popen([UNIONFS, "pull", "--store", str(store), "--tls-verify=false",
                                 "-q", f"{proxy.host}/sample:1"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        partial = store / "tmp" / "partial"

        def biggest():
            sizes = [os.path.getsize(partial / n) for n in os.listdir(partial)] \
                if partial.is_dir() else []
            return max(sizes, default=0)
        try:
            wait_for(lambda: biggest() > 1 << 20 or proc.poll() is not None, timeout=30,
                     what="half a layer")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        had = biggest()
        assert 0 < had < 5 << 20
        from unionfs.image.store import Store
        assert Store.open(str(store)).refs() == {}          # nothing named yet
        for layer in os.listdir(store / "layers"):           # only whole layers in place
            assert os.path.exists(store / "layers" / layer / "layer.json")
        proxy.throttle = None
        proxy.log.clear()
        pull(store, f"{proxy.host}/sample:1")
    ranged = [e for e in proxy.log if e[2]]
    assert len(ranged) == 1
    start = int(ranged[0][2].removeprefix("bytes=").removesuffix("-"))
    assert start == had
    assert ranged[0][3] == os.path.getsize(_blob_of(store, ranged[0][1])) - start
    assert os.listdir(partial) == []
    assert diff(merged_tree(store, f"{proxy.host}/sample:1", tmp_path / "mnt"), expected) == []


def _blob_of(store, path):
    return os.path.join(store, "blobs", "sha256", path.rsplit("sha256:", 1)[1])


def test_progress_lines_when_not_a_terminal(sample, registry, tmp_path):
    layout, _ = sample
    skopeo_push(layout, "gzip", f"{registry.host}/sample:1")
    out = pull(tmp_path / "store", f"{registry.host}/sample:1")
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("layer ") and ": done, " in line
                                   for line in lines)


def test_quiet_prints_only_the_image_id(sample, registry, tmp_path):
    layout, _ = sample
    skopeo_push(layout, "gzip", f"{registry.host}/sample:1")
    out = pull(tmp_path / "store", "-q", f"{registry.host}/sample:1")
    assert out.stderr == ""
    assert out.stdout.strip() == stored(tmp_path / "store", f"{registry.host}/sample:1").id


def test_progress_bars_on_a_terminal(sample, registry, tmp_path):
    layout, _ = sample
    skopeo_push(layout, "gzip", f"{registry.host}/sample:1")
    master, slave = pty.openpty()
    proc = subprocess.Popen([UNIONFS, "pull", "--store", str(tmp_path / "store"),
                             "--tls-verify=false", f"{registry.host}/sample:1"],
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ,
                                                                       "COLUMNS": "120"})
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            screen += data
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait() == 0
    text = screen.decode(errors="replace")
    assert "\x1b[" in text                      # drawn, not printed line by line
    assert text.count("layer ") >= 3 and "done" in text and "━" in text


def test_pull_with_basic_auth(sample, tmp_path):
    layout, _ = sample
    with Registry(tmp_path / "registry", auth=("basic", {"alice": "s3cret"})) as reg:
        skopeo_push(layout, "gzip", f"{reg.host}/sample:1", "--dest-creds", "alice:s3cret")
        ref = f"{reg.host}/sample:1"
        anonymous = pull(tmp_path / "s1", ref, check=False)
        wrong = pull(tmp_path / "s2", "--creds", "alice:nope", ref, check=False)
        pull(tmp_path / "s3", "--creds", "alice:s3cret", ref)
    assert (anonymous.returncode, anonymous.stderr.strip()) == (
        1, f"unionfs pull: {reg.host}: authentication required (pass --creds USER:PASS)")
    assert (wrong.returncode, wrong.stderr.strip()) == (
        1, f"unionfs pull: {reg.host}: authentication failed")
    assert stored(tmp_path / "s3", ref).layers


def test_pull_with_a_bearer_token(sample, tmp_path):
    layout, _ = sample
    users = {"alice": "s3cret"}
    grants = {"alice": {"*": "pull,push"}}
    with token_registry(tmp_path, users, grants) as (reg, tokens):
        skopeo_push(layout, "gzip", f"{reg.host}/sample:1", "--dest-creds", "alice:s3cret")
        tokens.requests.clear()
        ref = f"{reg.host}/sample:1"
        pull(tmp_path / "store", "--creds", "alice:s3cret", ref)
        asked = list(tokens.requests)
        anonymous = pull(tmp_path / "anon", ref, check=False)
    assert asked == [("alice", ["repository:sample:pull"])]     # one token for the pull
    assert stored(tmp_path / "store", ref).layers
    assert anonymous.returncode == 1
    assert anonymous.stderr.strip() == (f"unionfs pull: {reg.host}: not authorized for "
                                        "repository:sample:pull")


def test_pull_a_manifest_by_digest(sample, registry, tmp_path):
    layout, expected = sample
    skopeo_push(layout, "gzip", f"{registry.host}/sample:1")
    digest = skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                    f"docker://{registry.host}/sample:1").stdout.strip()
    ref = f"{registry.host}/sample@{digest}"
    pull(tmp_path / "store", ref)
    assert stored(tmp_path / "store", ref).manifest_digest == digest


def test_an_empty_layer_and_a_repeated_blob(registry, tmp_path):
    layout = str(tmp_path / "oci")
    empty = tar_entries([])
    name_in_layout(layout, "e", oci_image(layout, [(empty, "gzip"), (empty, "gzip"),
                                                    (sample_layers()[2], "gzip")]))
    skopeo_push(layout, "e", f"{registry.host}/empty:1")
    pull(tmp_path / "store", f"{registry.host}/empty:1")
    assert len(stored(tmp_path / "store", f"{registry.host}/empty:1").layers) == 3


def test_a_pulled_image_runs(sample, registry, tmp_path):
    layout, _ = sample
    skopeo_push(layout, "mixed", f"{registry.host}/sample:1")
    ref = f"{registry.host}/sample:1"
    pull(tmp_path / "store", ref)
    lowers = [arg for d in stored(tmp_path / "store", ref).lowerdirs for arg in ("--lower", d)]
    proc = subprocess.run([UNIONFS, "run", *lowers, "--", "/bin/sh", "-c",
                           "cat /top.txt; ls /opaque; ls /data"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["top", "0", "new",
                                   "big", "empty", "file", "h1", "h2", "h3", "setgid", "setuid"]


def _waits_for_lock(pid, path):
    """Is process `pid` blocked in flock() on `path`? (/proc/locks lists waiters
    as `N: -> FLOCK ... PID MAJ:MIN:INODE ...`.)"""
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 6 and fields[1] == "->" and fields[5] == str(pid) \
                    and fields[6].rsplit(":", 1)[-1] == str(ino):
                return True
    return False


def test_a_prune_during_a_pull_waits_for_it(sample, registry, tmp_path):
    # A pull stores the config blob, then the layers; only at the end does an
    # image record refer to them. A prune in between would find them unused.
    import json
    import threading
    layout, _ = sample
    ref_path = "sample:1"
    skopeo_push(layout, "gzip", f"{registry.host}/{ref_path}")
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                                 f"docker://{registry.host}/{ref_path}").stdout)
    layer_digests = {d["digest"] for d in manifest["layers"]}
    store = tmp_path / "store"
    reached, release = threading.Event(), threading.Event()

    def hold_layers(method, path, headers):
        if method == "GET" and path.rsplit("/", 1)[-1] in layer_digests:
            reached.set()
            release.wait(60)
        return None
    with Proxy(registry.host) as proxy:
        proxy.rewrite = hold_layers
        puller = subprocess.Popen([UNIONFS, "pull", "--store", str(store), "--tls-verify=false",
                                   "-q", f"{proxy.host}/{ref_path}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pruner = None
        try:
            assert reached.wait(30), "the pull never asked for a layer"
            from unionfs.image.store import Store
            assert Store.open(str(store)).has_blob(manifest["config"]["digest"])
            pruner = subprocess.Popen([UNIONFS, "image", "prune", "--store", str(store)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: pruner.poll() is not None
                     or _waits_for_lock(pruner.pid, store / "locks" / "gc.lock"),
                     timeout=30, what="the prune to run or to wait")
            assert pruner.poll() is None, f"the prune did not wait: {pruner.stdout.read()}"
        finally:
            release.set()
            out, err = puller.communicate(timeout=120)
            if pruner is not None:
                pruned = pruner.communicate(timeout=120)
    assert puller.returncode == 0, err
    assert pruner.returncode == 0, pruned
    image = Store.open(str(store)).resolve(f"{proxy.host}/{ref_path}")
    assert image.id == out.strip()
    s = Store.open(str(store))
    assert all(s.has_blob(d.digest) for d in (image.manifest.config, *image.manifest.layers))
    assert all(s.has_layer(layer.diff_id) for layer in image.layers)
