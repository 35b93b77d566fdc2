"""`unionfs load` of every archive shape against umoci: the image's layers,
applied by unionfs and mounted with unionfs, must equal `umoci unpack`'s
rootfs in names, types, modes, owners, sizes, content, xattrs, link targets
and hard-link sets. Real tools: umoci, skopeo; a real FUSE mount."""
import os

import pytest
import treecmp
from toolimages import built, docker25_archive, docker_legacy_archive  # noqa: F401

from mountutil import unionfs_mount
from unionfs.image import archive
from unionfs.image.store import Store

SHAPES = ["oci-layout-dir", "oci-archive", "docker-archive-skopeo", "docker-archive-legacy",
          "docker-archive-gzip-layers", "docker-archive-gzip-outer", "docker-25"]


def make_input(b, shape, tmp_path):
    if shape == "oci-layout-dir":
        return b.oci, "localhost/oci:final"
    if shape == "oci-archive":
        return b.oci_archive, "localhost/final:latest"
    if shape == "docker-archive-skopeo":
        return b.docker_archive, "localhost/final:latest"
    path = str(tmp_path / f"{shape}.tar")
    if shape == "docker-archive-legacy":
        docker_legacy_archive(b, path)
    elif shape == "docker-archive-gzip-layers":
        docker_legacy_archive(b, path, gzip_layers=True)
    elif shape == "docker-archive-gzip-outer":
        docker_legacy_archive(b, path, outer_gzip=True)
    elif shape == "docker-25":
        docker25_archive(b, path)
        return path, "docker.io/library/final:latest"
    return path, "localhost/final:latest"


def compare_with_umoci(b, image, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lowers = image.lowerdirs
    with unionfs_mount(mnt, lowers):
        got = treecmp.describe(str(mnt), treecmp.provider(lowers))
    want = treecmp.describe(b.rootfs)
    assert treecmp.diff(got, want) == []
    return got


@pytest.mark.parametrize("shape", SHAPES)
def test_load_equals_umoci_unpack(built, shape, tmp_path):  # noqa: F811
    path, name = make_input(built, shape, tmp_path)
    store = Store.open(str(tmp_path / "store"))
    loaded = archive.load(store, path)
    assert name in [n for item in loaded for n in item.names]
    image = store.resolve(name)
    assert image.config.diff_ids == built.config["rootfs"]["diff_ids"]
    assert image.config.run_config["Env"][-1] == "GREETING=hi"
    facts, links = compare_with_umoci(built, image, tmp_path)
    # the image really has what the comparison is about
    assert "etc/drop" not in facts and "srv/owned" not in facts and "etc/keep" not in facts
    assert facts["etc/new"]["size"] == 5 and facts["usr/bin/su"]["mode"] == 0o4755
    assert facts["data/a"]["xattrs"] == {"user.note": b"hello"}
    assert frozenset({"data/a", "data/b"}) in links


def test_oci_layout_keeps_manifest_digests(built, tmp_path):  # noqa: F811
    store = Store.open(str(tmp_path / "store"))
    archive.load(store, built.oci)
    assert store.resolve("localhost/oci:final").manifest_digest == built.manifest_digest


def test_docker25_keeps_its_manifest_and_takes_repo_tags(built, tmp_path):  # noqa: F811
    path = str(tmp_path / "d25.tar")
    digest = docker25_archive(built, path)
    store = Store.open(str(tmp_path / "store"))
    (item,) = archive.load(store, path)
    assert item.manifest_digest == digest
    assert set(item.names) == {"docker.io/library/final:latest", "localhost/final:latest"}


def test_loading_twice_shares_layers(built, tmp_path):  # noqa: F811
    store = Store.open(str(tmp_path / "store"))
    archive.load(store, built.oci_archive)
    layers = sorted(os.listdir(store.p("layers")))
    archive.load(store, built.docker_archive)
    assert sorted(os.listdir(store.p("layers"))) == layers
    assert len(layers) == len(built.manifest["layers"])


def test_docker_archive_layers_saved_again_keep_their_digests(built, tmp_path):  # noqa: F811
    """A docker-archive's layers are kept as tar-splits (no blob copy); saving
    rebuilds them byte for byte."""
    store = Store.open(str(tmp_path / "store"))
    (item,) = archive.load(store, built.docker_archive)
    diff_hexes = {d[7:] for d in built.config["rootfs"]["diff_ids"]}
    assert diff_hexes.isdisjoint(os.listdir(store.p("blobs", "sha256")))
    out = str(tmp_path / "again.tar")
    archive.save(store, ["localhost/final:latest"], out, "oci-archive")
    fresh = Store.open(str(tmp_path / "fresh"))
    (again,) = archive.load(fresh, out)
    assert again.manifest_digest == item.manifest_digest
    image = fresh.resolve("localhost/final:latest")
    assert [d.digest for d in image.manifest.layers] == built.config["rootfs"]["diff_ids"]
