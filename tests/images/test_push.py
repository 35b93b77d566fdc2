"""`unionfs push` to a real docker-registry, checked by skopeo and umoci.

What unionfs pushes, copied back out by skopeo and unpacked by umoci, equals
the image it came from; a push asks (HEAD) before it sends, mounts blobs
from another repository of the same registry, uploads in one PUT or in
chunks, and sends nothing at all for an image the registry already has.
"""
import json
import os
import shutil
import subprocess

import pytest
from registry_fixture import (
    Proxy,
    Registry,
    name_in_layout,
    oci_image,
    sample_layers,
    skopeo,
    skopeo_push,
    token_registry,
    umoci_unpack,
)
from treecmp import describe, diff

from mountutil import UNIONFS

TOOLS = ("docker-registry", "skopeo", "umoci")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)}")


def cli(cmd, store, *args, check=True):
    proc = subprocess.run([UNIONFS, cmd, "--store", str(store), "--tls-verify=false", *args],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("push-sample")
    layout = str(root / "oci")
    layers = sample_layers()
    name_in_layout(layout, "1", oci_image(layout, [(layers[0], "gzip"), (layers[1], "zstd"),
                                                   (layers[2], "none")]))
    name_in_layout(layout, "g", oci_image(layout, [(t, "gzip") for t in layers]))
    return layout, describe(umoci_unpack(layout, "g", str(root / "umoci")))


@pytest.fixture
def registry(tmp_path):
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def pulled(sample, registry, tmp_path):
    """A store holding the sample, pulled from registry as sample:1."""
    layout, _ = sample
    skopeo_push(layout, "1", f"{registry.host}/sample:1")
    cli("pull", tmp_path / "store", f"{registry.host}/sample:1")
    return tmp_path / "store", f"{registry.host}/sample:1"


def uploads(log):
    """The requests of a push that send or create something."""
    return [(e[0], e[1].split("?")[0]) for e in log if e[0] in ("POST", "PUT", "PATCH")]


def test_push_to_another_registry_round_trips(pulled, tmp_path):
    store, ref = pulled
    with Registry(tmp_path / "other") as other:
        dest = f"{other.host}/copied/image:2"
        out = cli("push", store, ref, dest)
        skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{dest}",
               f"oci:{tmp_path}/back:2")
    from unionfs.image.store import Store
    assert out.stdout.strip() == Store.open(str(store)).resolve(ref).manifest_digest
    assert out.stderr.count(": uploaded") == 4       # config and three layers
    # the very blobs (gzip, zstd, uncompressed) came back out
    with open(os.path.join(tmp_path, "back", "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(tmp_path, "back", "blobs", "sha256", manifest_digest[7:])) as f:
        assert [d["digest"] for d in json.load(f)["layers"]] == \
            [d.digest for d in Store.open(str(store)).resolve(ref).manifest.layers]


def test_pushed_image_unpacks_like_the_original(sample, registry, tmp_path):
    layout, expected = sample
    skopeo_push(layout, "g", f"{registry.host}/sample:g")
    cli("pull", tmp_path / "store", f"{registry.host}/sample:g")
    with Registry(tmp_path / "other") as other:
        cli("push", tmp_path / "store", f"{registry.host}/sample:g", f"{other.host}/x:1")
        skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{other.host}/x:1",
               f"oci:{tmp_path}/back:1")
    back = describe(umoci_unpack(f"{tmp_path}/back", "1", str(tmp_path / "unpacked")))
    assert diff(back, expected) == []


def test_push_again_sends_nothing(pulled, registry):
    store, ref = pulled
    with Proxy(registry.host) as proxy:
        dest = f"{proxy.host}/again:1"
        cli("push", store, ref, dest)
        assert len(uploads(proxy.log)) == 9     # 4 blobs (POST, PUT) and the manifest
        proxy.log.clear()
        out = cli("push", store, ref, dest)
    assert uploads(proxy.log) == []
    assert [e[0] for e in proxy.log] == ["GET", "HEAD"]         # ping, the tag's manifest
    assert out.stderr == ""


def test_push_heads_each_blob_before_sending_it(sample, pulled, registry):
    layout, _ = sample
    store, ref = pulled
    with Proxy(registry.host) as proxy:
        # the registry holds some blobs in the target repository already
        skopeo_push(layout, "g", f"{registry.host}/target:old")
        out = cli("push", store, ref, f"{proxy.host}/target:new")
    heads = [e[1] for e in proxy.log if e[0] == "HEAD" and "/blobs/" in e[1]]
    assert len(heads) == 4
    # What target:old holds is what skopeo pushed: the base layer and the config
    # are the same as ours, and skopeo's blob-info cache (shared by every run on
    # this host) may have swapped more layers for variants it saw in the registry.
    old = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                            f"docker://{registry.host}/target:old").stdout)
    from unionfs.image.store import Store
    ours = Store.open(str(store)).resolve(ref).manifest
    there = {old["config"]["digest"], *(d["digest"] for d in old["layers"])}
    shared = {d.digest for d in (ours.config, *ours.layers)} & there
    assert len(shared) >= 2
    assert out.stderr.count(": exists") == len(shared)
    sent = [e for e in proxy.log if e[0] == "PUT" and "/blobs/uploads/" in e[1]]
    for e in sent:
        digest = e[1].split("digest=")[1].replace("%3A", ":")
        first_head = next(i for i, x in enumerate(proxy.log)
                          if x[0] == "HEAD" and x[1].endswith(digest))
        assert first_head < proxy.log.index(e)


def test_push_mounts_blobs_from_another_repository(pulled, registry):
    store, ref = pulled
    out = cli("push", store, ref, f"{registry.host}/elsewhere/copy:1")
    assert out.stderr.count(": mounted") == 4
    listing = skopeo("inspect", "--tls-verify=false",
                     f"docker://{registry.host}/elsewhere/copy:1").stdout
    assert json.loads(listing)["Layers"]


def test_mount_requests_carry_the_source_repository(pulled, registry, tmp_path):
    store, ref = pulled
    # pull the same image through the proxy so that the store knows it there too
    with Proxy(registry.host) as proxy:
        cli("pull", store, f"{proxy.host}/sample:1")
        proxy.log.clear()
        cli("push", store, ref, f"{proxy.host}/mounted:1")
    posts = [e[1] for e in proxy.log if e[0] == "POST"]
    assert len(posts) == 4 and all("mount=sha256" in p and "from=sample" in p for p in posts)
    assert [e for e in proxy.log if e[0] in ("PATCH",)] == []
    assert len([e for e in proxy.log if e[0] == "PUT"]) == 1       # the manifest


def test_chunked_upload(pulled, tmp_path):
    store, ref = pulled
    with Registry(tmp_path / "other") as other, Proxy(other.host) as proxy:
        cli("push", store, "--chunk-size", "65536", ref, f"{proxy.host}/chunked:1")
        patches = [e for e in proxy.log if e[0] == "PATCH"]
        out = skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{proxy.host}/chunked:1",
                     f"oci:{tmp_path}/back:1")
    assert out.returncode == 0
    from unionfs.image.store import Store
    big = max(d.size for d in Store.open(str(store)).resolve(ref).manifest.layers)
    assert len(patches) >= big // 65536


def test_push_with_basic_auth(pulled, tmp_path):
    store, ref = pulled
    with Registry(tmp_path / "auth", auth=("basic", {"bob": "pw"})) as reg:
        refused = cli("push", store, ref, f"{reg.host}/x:1", check=False)
        cli("push", store, "--creds", "bob:pw", ref, f"{reg.host}/x:1")
        skopeo("inspect", "--tls-verify=false", "--creds", "bob:pw", f"docker://{reg.host}/x:1")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"unionfs push: {reg.host}: authentication required "
                                      "(pass --creds USER:PASS)")


def test_push_with_a_bearer_token(pulled, tmp_path):
    store, ref = pulled
    grants = {"bob": {"*": "pull,push"}, "eve": {"*": "pull"}}
    with token_registry(tmp_path / "tok", {"bob": "pw", "eve": "pw"}, grants) as (reg, tokens):
        denied = cli("push", store, "--creds", "eve:pw", ref, f"{reg.host}/x:1", check=False)
        tokens.requests.clear()
        cli("push", store, "--creds", "bob:pw", ref, f"{reg.host}/x:1")
        asked = [scopes for _, scopes in tokens.requests]
        skopeo("inspect", "--tls-verify=false", "--creds", "bob:pw", f"docker://{reg.host}/x:1")
    assert denied.returncode == 1
    assert denied.stderr.strip() == (f"unionfs push: {reg.host}: not authorized for "
                                     "repository:x:pull,push")
    assert asked == [["repository:x:pull,push"]]    # one token, reused for every request


def test_push_of_an_unknown_image_is_one_line(registry, tmp_path):
    out = cli("push", tmp_path / "store", "nosuch:1", f"{registry.host}/x:1", check=False)
    assert (out.returncode, out.stderr.strip()) == (
        1, "unionfs push: no image 'nosuch:1' in the store")


def test_a_refused_single_put_falls_back_to_chunks(pulled, tmp_path):
    store, ref = pulled
    refused = []
    with Registry(tmp_path / "other") as other, Proxy(other.host) as proxy:
        def too_large(method, path, headers):
            if method == "PUT" and "/blobs/uploads/" in path and \
                    int(headers.get("Content-Length") or 0) > 1 << 20:
                refused.append(path)
                return 413, {}, b'{"errors":[{"code":"SIZE_INVALID","message":"too large"}]}'
            return None
        proxy.rewrite = too_large
        cli("push", store, ref, f"{proxy.host}/limited:1")
        patches = [e for e in proxy.log if e[0] == "PATCH"]
        proxy.rewrite = None
        skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{proxy.host}/limited:1",
               f"oci:{tmp_path}/back:1")
    assert refused and patches         # the big layer went again, in 16 MiB chunks


@pytest.fixture
def loaded_from_docker_archive(sample, tmp_path):
    """A store holding the sample loaded from a docker-archive: its layers are
    uncompressed tars kept as tar-splits, so no layer has a blob file."""
    layout, _ = sample
    archive = tmp_path / "sample-docker.tar"
    skopeo("copy", "-q", f"oci:{layout}:g", f"docker-archive:{archive}:localhost/sample:g")
    store = tmp_path / "store"
    subprocess.run([UNIONFS, "load", "--store", str(store), "-i", str(archive)], check=True,
                   capture_output=True, timeout=120)
    from unionfs.image.store import Store
    s = Store.open(str(store))
    image = s.resolve("localhost/sample:g")
    kept_as_files = [d.digest for d in image.manifest.layers
                     if os.path.exists(s.blob_path(d.digest))]
    assert kept_as_files == []      # what this fixture is for: every layer a tar-split
    return store, image


def test_push_of_an_image_loaded_from_a_docker_archive(sample, loaded_from_docker_archive,
                                                       tmp_path):
    _, expected = sample
    store, image = loaded_from_docker_archive
    with Registry(tmp_path / "other") as other:
        out = cli("push", store, "localhost/sample:g", f"{other.host}/from-archive:1")
        skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{other.host}/from-archive:1",
               f"oci:{tmp_path}/back:1")
    assert out.stdout.strip() == image.manifest_digest
    back = describe(umoci_unpack(f"{tmp_path}/back", "1", str(tmp_path / "unpacked")))
    assert diff(back, expected) == []


def test_chunked_push_of_tar_split_layers(loaded_from_docker_archive, tmp_path):
    store, image = loaded_from_docker_archive
    with Registry(tmp_path / "other") as other, Proxy(other.host) as proxy:
        cli("push", store, "--chunk-size", "65536", "localhost/sample:g",
            f"{proxy.host}/chunked:1")
        patches = [e for e in proxy.log if e[0] == "PATCH"]
        skopeo("copy", "-q", "--src-tls-verify=false", f"docker://{proxy.host}/chunked:1",
               f"oci:{tmp_path}/back:1")
    big = max(d.size for d in image.manifest.layers)
    assert len(patches) >= big // 65536


def test_push_refuses_a_tar_split_layer_whose_files_changed(loaded_from_docker_archive,
                                                           tmp_path):
    store, image = loaded_from_docker_archive
    from unionfs.image.store import Store
    s = Store.open(str(store))
    top = image.layers[0]
    with open(os.path.join(top.lowerdir(), "top.txt"), "r+b") as f:
        f.write(b"TOP")         # same size, other bytes: only the hash can tell
    with Registry(tmp_path / "other") as other:
        out = cli("push", store, "-q", "localhost/sample:g", f"{other.host}/bad:1", check=False)
        status = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                                 f"docker://{other.host}/bad:1"], capture_output=True)
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and top.diff_id in out.stderr, out.stderr
    assert status.returncode != 0       # no manifest was pushed
    assert s.has_blob(top.diff_id)
