"""Pure rules: digests, references, manifests, indexes, configs, docker's manifest.json."""
import json

import pytest

from unionfs.image import digest as dg
from unionfs.image import formats
from unionfs.image import reference as ref

HEX = "a" * 64


def test_digest_parse_accepts_only_lowercase_sha256():
    assert dg.parse("sha256:" + HEX) == HEX
    for bad in ("sha256:" + "A" * 64, "sha512:" + HEX, "sha256:" + HEX[:-1], "sha256:../x",
                "sha256:" + HEX + "\n", None):
        with pytest.raises(dg.DigestError, match="digest"):
            dg.parse(bad)


def test_digest_check_names_both_digests():
    with pytest.raises(dg.DigestError, match="expected sha256:a+, got sha256:"):
        dg.check(b"x", "sha256:" + HEX)


@pytest.mark.parametrize("text,name", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("user/app", "docker.io/user/app:latest"),
    ("localhost/final", "localhost/final:latest"),
    ("localhost:5000/a/b:v2", "localhost:5000/a/b:v2"),
    ("quay.io/x/y:tag", "quay.io/x/y:tag"),
    ("127.0.0.1:5000/test:1", "127.0.0.1:5000/test:1"),
])
def test_reference_normalisation(text, name):
    assert ref.parse(text).name == name


def test_reference_with_digest():
    r = ref.parse("busybox@sha256:" + HEX)
    assert (r.tag, r.digest, r.name) == (None, "sha256:" + HEX,
                                         "docker.io/library/busybox@sha256:" + HEX)


@pytest.mark.parametrize("bad", ["", "UPPER", "a b", "x:", "x@sha256:zz", "a//b", "-a"])
def test_reference_rejects_malformed(bad):
    with pytest.raises(ref.ReferenceError, match="invalid"):
        ref.parse(bad)


def _desc(media_type=formats.OCI_LAYER_GZIP, size=3):
    return {"mediaType": media_type, "digest": "sha256:" + HEX, "size": size}


def _manifest(**over):
    doc = {"schemaVersion": 2, "mediaType": formats.OCI_MANIFEST,
           "config": _desc(formats.OCI_CONFIG), "layers": [_desc()]}
    doc.update(over)
    return json.dumps(doc).encode()


def test_manifest_parse():
    m = formats.Manifest.parse(_manifest())
    assert m.config.media_type == formats.OCI_CONFIG and len(m.layers) == 1


@pytest.mark.parametrize("over,match", [
    ({"schemaVersion": 1}, "schemaVersion"),
    ({"layers": "x"}, "no layers list"),
    ({"layers": [_desc(size=-1)]}, "non-negative"),
    ({"layers": [_desc("text/plain")]}, "unsupported media type"),
    ({"config": {"mediaType": formats.OCI_CONFIG, "digest": "sha256:../../etc", "size": 1}},
     "not a sha256 digest"),
    ({"manifests": []}, "found an index"),
])
def test_manifest_parse_rejects(over, match):
    with pytest.raises(formats.FormatError, match=match):
        formats.Manifest.parse(_manifest(**over))


def test_manifest_parse_rejects_non_json():
    with pytest.raises(formats.FormatError, match="not valid JSON"):
        formats.Manifest.parse(b"\xff{")


def test_pick_platform_prefers_the_host():
    descs = [formats.Descriptor(formats.OCI_MANIFEST, "sha256:" + c * 64, 1,
                                platform={"os": "linux", "architecture": a})
             for c, a in (("1", "arm64"), ("2", "amd64"))]
    got = formats.pick_platform(descs, ("linux", "amd64"))
    assert got.digest == "sha256:" + "2" * 64
    with pytest.raises(formats.FormatError, match="no image for platform linux/s390x"):
        formats.pick_platform(descs, ("linux", "s390x"))


def test_config_diff_ids_are_checked():
    good = {"rootfs": {"type": "layers", "diff_ids": ["sha256:" + HEX]}, "config": {"Cmd": ["sh"]}}
    cfg = formats.ImageConfig.parse(json.dumps(good).encode())
    assert cfg.diff_ids == ["sha256:" + HEX] and cfg.run_config == {"Cmd": ["sh"]}
    bad = {"rootfs": {"type": "layers", "diff_ids": ["md5:x"]}}
    with pytest.raises(formats.FormatError, match="diff_id"):
        formats.ImageConfig.parse(json.dumps(bad).encode())


def test_docker_manifest_json():
    entries = formats.parse_docker_manifest(json.dumps(
        [{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["l/layer.tar"]}]).encode())
    assert entries[0].layers == ("l/layer.tar",) and entries[0].repo_tags == ("a:1",)
    with pytest.raises(formats.FormatError, match="lacks Config or Layers"):
        formats.parse_docker_manifest(b'[{"Config": "c.json"}]')


def test_sniff_compression():
    assert formats.sniff_compression(b"\x1f\x8b\x08\x00") == "gzip"
    assert formats.sniff_compression(b"\x28\xb5\x2f\xfd") == "zstd"
    assert formats.sniff_compression(b"ustar") == "none"
