"""Hostile registry answers: a real docker-registry behind a proxy that lies.

Each bad answer gives one line and exit status 1, and leaves no name, no
image record, no unpacked layer of the bad blob and no temporary directory
in the store (a partial blob is kept only when the network, not the content,
failed: a later pull resumes it).
"""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading

import pytest
from registry_fixture import (
    Proxy,
    Registry,
    name_in_layout,
    oci_image,
    sample_layers,
    skopeo_push,
)

from mountutil import UNIONFS

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("docker-registry", "skopeo")),
                                reason="needs docker-registry and skopeo")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile") / "oci")
    layers = sample_layers()
    name_in_layout(root, "1", oci_image(root, [(layers[0], "gzip"), (layers[2], "gzip")]))
    return root


@pytest.fixture
def served(layout, tmp_path):
    """(registry, proxy, manifest) with the image pushed as sample:1."""
    with Registry(tmp_path / "registry") as reg:
        skopeo_push(layout, "1", f"{reg.host}/sample:1")
        with Proxy(reg.host) as proxy:
            with open(os.path.join(layout, "index.json")) as f:
                digest = json.load(f)["manifests"][0]["digest"]
            with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "rb") as f:
                manifest = json.load(f)
            yield reg, proxy, manifest


def pull(store, ref):
    return subprocess.run([UNIONFS, "pull", "-q", "--store", str(store), "--tls-verify=false",
                           ref], capture_output=True, text=True, timeout=120)


def one_line(proc) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def assert_nothing_named(store, bad_diff_ids=()):
    from unionfs.image.store import Store
    s = Store.open(str(store))
    assert s.refs() == {}
    assert s.image_records() == {}
    for diff_id in bad_diff_ids:
        assert not s.has_layer(diff_id)
    leftovers = [n for n in os.listdir(os.path.join(store, "tmp")) if n != "partial"]
    assert leftovers == []


def diff_ids(layout):
    """The bottom layer's diff_id: the layer the tests spoil."""
    return ["sha256:" + hashlib.sha256(sample_layers()[0]).hexdigest()]


def test_a_rotten_blob(served, tmp_path, layout):
    reg, proxy, manifest = served
    layer = manifest["layers"][0]["digest"]
    with open(reg.blob_file(layer), "r+b") as f:         # the registry's own copy rots
        f.seek(100)
        f.write(b"\0garbage\0")
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert line.startswith(f"unionfs pull: layer {layer}: ") and "corrupt" in line
    assert_nothing_named(tmp_path / "store", diff_ids(layout))
    assert os.listdir(tmp_path / "store" / "tmp" / "partial") == []    # wrong: not resumable


def test_a_blob_with_another_blobs_content(served, tmp_path, layout):
    reg, proxy, manifest = served
    bottom, top = (d["digest"] for d in manifest["layers"])
    shutil.copyfile(reg.blob_file(top), reg.blob_file(bottom))     # a valid layer, the wrong one
    size = os.path.getsize(reg.blob_file(top))
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert line == (f"unionfs pull: blob {bottom}: the registry announces {size} bytes from 0, "
                    f"the manifest says {manifest['layers'][0]['size']} in all")
    assert_nothing_named(tmp_path / "store", diff_ids(layout))
    assert bottom[7:] not in os.listdir(tmp_path / "store" / "tmp" / "partial")


def test_a_blob_with_another_blobs_content_and_size(served, tmp_path, layout):
    reg, proxy, manifest = served
    bottom, top = (d["digest"] for d in manifest["layers"])
    size = manifest["layers"][0]["size"]
    with open(reg.blob_file(top), "rb") as f:
        other = f.read()
    fake = (other + b"\0" * size)[:size]      # a valid gzip member, then padding

    def swap(method, path, headers):
        if method == "GET" and path.endswith(bottom):
            return 200, {}, fake
        return None
    proxy.rewrite = swap
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert line.startswith(f"unionfs pull: layer {bottom}: ") and "digest" in line
    assert_nothing_named(tmp_path / "store", diff_ids(layout))
    assert bottom[7:] not in os.listdir(tmp_path / "store" / "tmp" / "partial")


def test_a_truncated_blob_is_resumed_later(served, tmp_path, layout):
    reg, proxy, manifest = served
    layer = manifest["layers"][0]
    with open(reg.blob_file(layer["digest"]), "rb") as f:
        data = f.read()

    def cut(method, path, headers):
        if method == "GET" and path.endswith(layer["digest"]):
            return 200, {"Content-Length": str(len(data)), "Connection": "close"}, \
                data[:len(data) // 2]
        return None
    proxy.rewrite = cut
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert line.startswith(f"unionfs pull: blob {layer['digest']}: ")
    assert "incomplete" in line or "truncated" in line or "closed" in line
    assert_nothing_named(tmp_path / "store", diff_ids(layout))
    partial = tmp_path / "store" / "tmp" / "partial" / layer["digest"][7:]
    kept = os.path.getsize(partial)
    assert 0 < kept <= len(data) // 2
    proxy.rewrite = None
    proxy.log.clear()
    assert pull(tmp_path / "store", f"{proxy.host}/sample:1").returncode == 0
    assert [e[2] for e in proxy.log if e[1].endswith(layer["digest"])] == [f"bytes={kept}-"]
    assert not partial.exists()


def _answer_manifest(body: bytes, content_type=OCI_MANIFEST, status=200, extra=None):
    def rewrite(method, path, headers):
        if "/manifests/" in path:
            return status, {"Content-Type": content_type, **(extra or {})}, body
        return None
    return rewrite


def test_a_manifest_that_is_not_json(served, tmp_path):
    _, proxy, _ = served
    proxy.rewrite = _answer_manifest(b"<html>surprise</html>")
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert line.startswith("unionfs pull: manifest of ") and "not valid JSON" in line
    assert_nothing_named(tmp_path / "store")


def test_a_manifest_of_a_huge_announced_size(served, tmp_path):
    _, proxy, _ = served
    proxy.rewrite = _answer_manifest(b"{}", extra={"Content-Length": str(10 << 30)})
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert "too big" in line and str(10 << 30) in line


def test_a_layer_of_a_huge_size(served, tmp_path):
    _, proxy, manifest = served
    doc = json.loads(json.dumps(manifest))
    doc["layers"][0]["size"] = 1 << 60
    proxy.rewrite = _answer_manifest(json.dumps(doc).encode())
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert "GB compressed, the store has" in line
    assert_nothing_named(tmp_path / "store")
    assert os.listdir(tmp_path / "store" / "tmp" / "partial") == []


def test_a_blob_answer_longer_than_its_descriptor(served, tmp_path, layout):
    _, proxy, manifest = served
    layer = manifest["layers"][0]["digest"]

    def longer(method, path, headers):
        if method == "GET" and path.endswith(layer):
            return 200, {"Content-Length": str(1 << 40)}, b""
        return None
    proxy.rewrite = longer
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert f"blob {layer}: the registry announces {1 << 40} bytes" in line
    assert_nothing_named(tmp_path / "store", diff_ids(layout))


def test_a_manifest_that_does_not_match_its_digest(served, tmp_path):
    _, proxy, manifest = served
    body = json.dumps(manifest).encode() + b" "
    proxy.rewrite = _answer_manifest(body, extra={
        "Docker-Content-Digest": "sha256:" + hashlib.sha256(b"other").hexdigest()})
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert "does not match the registry's Docker-Content-Digest" in line


def test_a_redirect_loop(served, tmp_path):
    _, proxy, manifest = served
    layer = manifest["layers"][0]["digest"]

    def loop(method, path, headers):
        if method == "GET" and path.endswith(layer):
            return 307, {"Location": path}, b""
        return None
    proxy.rewrite = loop
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert line == f"unionfs pull: blob {layer}: too many redirects"
    assert_nothing_named(tmp_path / "store")


def test_a_redirect_to_a_file_url(served, tmp_path):
    _, proxy, manifest = served
    layer = manifest["layers"][0]["digest"]

    def to_file(method, path, headers):
        if method == "GET" and path.endswith(layer):
            return 302, {"Location": "file:///etc/shadow"}, b""
        return None
    proxy.rewrite = to_file
    line = one_line(pull(tmp_path / "store", f"{proxy.host}/sample:1"))
    assert line.startswith(f"unionfs pull: blob {layer}: redirected to an unsupported URL")


class _BlobHost:
    """Another origin that serves blob bytes (like a registry's storage
    backend) and remembers the Authorization headers it was sent."""

    def __init__(self, files):
        self.files, self.auth = files, []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                host.auth.append(self.headers.get("Authorization"))
                data = host.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_redirect_to_another_origin_gets_no_credentials(layout, tmp_path):
    with Registry(tmp_path / "registry", auth=("basic", {"u": "p"})) as reg:
        skopeo_push(layout, "1", f"{reg.host}/sample:1", "--dest-creds", "u:p")
        blobs = {}
        for name in os.listdir(os.path.join(layout, "blobs", "sha256")):
            with open(os.path.join(layout, "blobs", "sha256", name), "rb") as f:
                blobs[f"/b/{name}"] = f.read()
        storage = _BlobHost(blobs)
        try:
            with Proxy(reg.host) as proxy:
                def redirect(method, path, headers):
                    if method == "GET" and "/blobs/sha256:" in path:
                        return 307, {"Location": f"{storage.url}/b/{path.rsplit(':', 1)[1]}"}, b""
                    return None
                proxy.rewrite = redirect
                proc = subprocess.run([UNIONFS, "pull", "-q", "--store", str(tmp_path / "store"),
                                       "--tls-verify=false", "--creds", "u:p",
                                       f"{proxy.host}/sample:1"],
                                      capture_output=True, text=True, timeout=120)
                sent_to_registry = [e for e in proxy.log if "/blobs/" in e[1]]
        finally:
            storage.close()
    assert proc.returncode == 0, proc.stderr
    assert len(storage.auth) == 3 and storage.auth == [None] * 3   # config and two layers
    assert len(sent_to_registry) == 3
