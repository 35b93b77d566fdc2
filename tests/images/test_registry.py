"""The distribution client (unionfs.image.registry): its pure rules, and its
requests against a real docker-registry (TLS, auth, ranges, uploads)."""
import hashlib
import os
import shutil
import subprocess

import pytest
import trio
from registry_fixture import (
    Proxy,
    Registry,
    name_in_layout,
    oci_image,
    sample_layers,
    skopeo_push,
    token_registry,
)

from mountutil import UNIONFS
from unionfs.image.registry import Client, RegistryError, error_line, parse_challenge, printable

needs_registry = pytest.mark.skipif(not shutil.which("docker-registry"),
                                    reason="needs docker-registry")
DATA = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def reader(offset, length):
    async def chunks():
        for i in range(offset, offset + length, 1 << 20):
            yield DATA[i:min(i + (1 << 20), offset + length)]
    return chunks()


def run(registry, fn, **kw):
    async def go():
        async with Client(registry.host, tls_verify=kw.pop("tls_verify", False), **kw) as c:
            return await fn(c)
    return trio.run(go)


async def upload(c, repo="a/b", chunk=None):
    location, _ = await c.start_upload(repo, DIGEST)
    await c.upload(repo, DIGEST, len(DATA), location, reader, chunk)


# -- pure rules ------------------------------------------------------------------

def test_bearer_challenge_is_parsed():
    assert parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                           'scope="repository:a/b:pull,push"') == (
        "bearer", {"realm": "https://auth.example/token", "service": "reg",
                   "scope": "repository:a/b:pull,push"})


def test_basic_challenge_is_parsed():
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_registry_errors_become_one_line():
    body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'
    assert error_line(404, body) == "HTTP 404 (BLOB_UNKNOWN: blob unknown to registry)"
    assert error_line(500, b"<html>oops") == "HTTP 500"


def test_docker_hub_is_asked_at_its_api_host():
    from unionfs.image import reference
    ref = reference.parse("debian:12")
    assert (ref.registry, ref.repository) == ("docker.io", "library/debian")
    assert Client(ref.registry).host == "registry-1.docker.io"
    assert Client("127.0.0.1:5000").host == "127.0.0.1:5000"


def test_server_text_cannot_drive_the_terminal():
    assert printable("evil\x1b[2J\nline") == "evil?[2J?line"
    assert printable("x" * 500, 10) == "x" * 10 + "..."


# -- against docker-registry -----------------------------------------------------

@needs_registry
def test_plain_http_needs_tls_verify_false(tmp_path):
    with Registry(tmp_path) as reg:
        with pytest.raises(RegistryError, match=r"cannot connect: .*\(plain HTTP needs "
                                                r"--tls-verify=false\)"):
            run(reg, lambda c: c.blob_size("a/b", DIGEST), tls_verify=True)
        assert run(reg, lambda c: c.blob_size("a/b", DIGEST)) is None


@needs_registry
def test_https_with_an_untrusted_certificate(tmp_path):
    with Registry(tmp_path, tls=True) as reg:
        with pytest.raises(RegistryError, match="CERTIFICATE_VERIFY_FAILED"):
            run(reg, lambda c: c.blob_size("a/b", DIGEST), tls_verify=True)
        async def base(c):
            return c.base
        assert run(reg, base) == f"https://{reg.host}"     # unverified, still TLS


@needs_registry
def test_pull_over_https_trusting_the_certificate(tmp_path):
    layout = str(tmp_path / "oci")
    name_in_layout(layout, "1", oci_image(layout, [(sample_layers()[2], "gzip")]))
    with Registry(tmp_path / "reg", tls=True) as reg:
        skopeo_push(layout, "1", f"{reg.host}/s:1")
        env = {**os.environ, "SSL_CERT_FILE": reg.cert_path}
        proc = subprocess.run([UNIONFS, "pull", "-q", "--store", str(tmp_path / "store"),
                               f"{reg.host}/s:1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


@needs_registry
def test_monolithic_upload_then_ranged_reads(tmp_path):
    with Registry(tmp_path) as reg:
        async def go(c):
            await upload(c)
            out = []
            for offset in (0, 12345, len(DATA)):
                async with c.open_blob("a/b", DIGEST, len(DATA), offset) as (start, chunks):
                    out.append((start, b"".join([x async for x in chunks])))
            return await c.blob_size("a/b", DIGEST), out
        size, reads = run(reg, go)
    assert size == len(DATA)
    assert reads == [(0, DATA), (12345, DATA[12345:]), (len(DATA), b"")]


@needs_registry
def test_chunked_upload_sends_content_ranges(tmp_path):
    with Registry(tmp_path / "reg") as reg, Proxy(reg.host) as proxy:
        proxy_reg = type("R", (), {"host": proxy.host})
        run(proxy_reg, lambda c: upload(c, chunk=1 << 20))
        assert run(reg, lambda c: c.blob_size("a/b", DIGEST)) == len(DATA)
    patches = [e for e in proxy.log if e[0] == "PATCH"]
    assert len(patches) == 3                # 3 MiB in 1 MiB chunks


@needs_registry
def test_cross_repository_mount(tmp_path):
    with Registry(tmp_path) as reg:
        async def go(c):
            await upload(c, "src/repo")
            mounted = await c.start_upload("dst/repo", DIGEST, mount_from="src/repo")
            missing = await c.start_upload("dst/other", DIGEST, mount_from="no/such")
            return mounted, missing, await c.blob_size("dst/repo", DIGEST)
        mounted, missing, size = run(reg, go)
    assert mounted == (None, None)
    assert missing[0].startswith(f"http://{reg.host}/v2/dst/other/blobs/uploads/")
    assert size == len(DATA)


@needs_registry
def test_a_blob_shorter_than_its_descriptor(tmp_path):
    with Registry(tmp_path) as reg:
        async def go(c):
            await upload(c)
            async with c.open_blob("a/b", DIGEST, len(DATA) + 1) as (_, chunks):
                async for _ in chunks:
                    pass
        with pytest.raises(RegistryError, match=f"blob {DIGEST}: the registry announces "
                                                f"{len(DATA)} bytes from 0, the manifest says "
                                                f"{len(DATA) + 1} in all"):
            run(reg, go)


@needs_registry
def test_a_missing_manifest_is_the_registrys_own_words(tmp_path):
    with Registry(tmp_path) as reg:
        with pytest.raises(RegistryError, match=r"manifest .*/a/b:nope: HTTP 404 "
                                                r"\(MANIFEST_UNKNOWN: manifest unknown\)"):
            run(reg, lambda c: c.get_manifest("a/b", "nope"))


@needs_registry
def test_a_token_is_asked_once_per_scope(tmp_path):
    with token_registry(tmp_path, {"u": "p"}, {"u": {"*": "pull,push"}}) as (reg, tokens):
        async def go(c):
            await upload(c)
            for _ in range(3):
                await c.blob_size("a/b", DIGEST, ("repository:a/b:pull,push",))
            await c.blob_size("a/b", DIGEST)
        run(reg, go, creds=("u", "p"))
    assert [scopes for _, scopes in tokens.requests] == [
        ["repository:a/b:pull,push"], ["repository:a/b:pull"]]


@needs_registry
def test_a_token_server_that_answers_no_token(tmp_path):
    with token_registry(tmp_path, {"u": "p"}, {}) as (reg, tokens):
        tokens.broken = True
        with pytest.raises(RegistryError, match="the token server's answer is not a token"):
            run(reg, lambda c: c.blob_size("a/b", DIGEST), creds=("u", "p"))
