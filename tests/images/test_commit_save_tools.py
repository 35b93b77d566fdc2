"""commit and save against real tools: a container's upper, written through a
real unionfs mount (kernel-form markers) plus the other marker forms by hand,
committed; the new layer's digests checked; the image saved and read back by
skopeo + umoci and by podman (load + run)."""
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

import pytest
import treecmp
from toolimages import built, need, sh  # noqa: F401

from mountutil import unionfs_mount
from unionfs.image import archive, containers
from unionfs.image import commit as commit_mod
from unionfs.image.store import Store

NAME = "localhost/committed:1"


def write_upper(c, store, tmp_path):
    mnt = tmp_path / "cmnt"
    mnt.mkdir()
    with unionfs_mount(mnt, c.lowerdirs(store), c.upper, c.work):
        os.unlink(mnt / "etc" / "new")                      # char 0/0 whiteout
        shutil.rmtree(mnt / "data" / "sub")                 # a directory deleted ...
        os.mkdir(mnt / "data" / "sub")                      # ... made again: opaque xattr
        (mnt / "data" / "sub" / "y").write_bytes(b"y\n")
        (mnt / "data" / "f").write_bytes(b"copied up\n")
        os.mkdir(mnt / "app")
        hello = mnt / "app" / "hello"
        hello.write_bytes(b"hello from the commit\n")
        os.chown(hello, 7, 8)
        os.chmod(hello, 0o4750)
        os.setxattr(hello, "user.k", b"v")
        os.link(hello, mnt / "app" / "hello2")
        os.symlink("/etc/keep", mnt / "app" / "link")
        os.mkfifo(mnt / "app" / "fifo")
    up = c.upper
    # the other forms the filesystem reads: OCI whiteout, OCI opaque, xattr whiteout
    open(os.path.join(up, ".wh.new"), "w").close()
    os.mkdir(os.path.join(up, "var"))
    open(os.path.join(up, "var", ".wh..wh..opq"), "w").close()
    with open(os.path.join(up, "var", "z"), "w") as f:
        f.write("z\n")
    os.makedirs(os.path.join(up, "usr", "bin"))
    su = os.path.join(up, "usr", "bin", "su")
    open(su, "w").close()
    os.setxattr(su, "trusted.overlay.whiteout", b"y")
    # as in the kernel, a directory holding xattr whiteouts says so (opaque=x)
    os.setxattr(os.path.join(up, "usr", "bin"), "trusted.overlay.opaque", b"x")
    # what is asserted below must really be in the upper
    assert stat.S_ISCHR(os.lstat(os.path.join(up, "etc", "new")).st_mode)
    assert os.getxattr(os.path.join(up, "data", "sub"), "trusted.overlay.opaque") == b"y"


@pytest.fixture(scope="module")
def committed(built, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("commit")
    store = Store.open(str(tmp / "store"))
    archive.load(store, built.oci_archive)
    image = store.resolve("localhost/final:latest")
    c = containers.create(store, image, "localhost/final:latest", "box")
    write_upper(c, store, tmp)
    # the merged view the commit must reproduce: the upper as the top layer
    mnt = tmp / "view"
    mnt.mkdir()
    lowers = [c.upper] + c.lowerdirs(store)
    with unionfs_mount(mnt, lowers):
        view = treecmp.describe(str(mnt), treecmp.provider(lowers))
    digest = commit_mod.commit(store, "box", [NAME], message="test commit")
    return store, digest, view, tmp


def view_of(store, ref, tmp, tag):
    image = store.resolve(ref)
    mnt = tmp / f"mnt-{tag}"
    mnt.mkdir()
    with unionfs_mount(mnt, image.lowerdirs):
        return treecmp.describe(str(mnt), treecmp.provider(image.lowerdirs))


def test_commit_view_is_the_containers_view(committed):
    store, digest, view, tmp = committed
    got = view_of(store, NAME, tmp, "committed")
    assert treecmp.diff(got, view) == []
    facts, links = got
    assert "etc/new" not in facts and "new" not in facts and "usr/bin/su" not in facts
    assert "data/sub/x" not in facts and facts["data/sub/y"]["size"] == 2
    assert "var/sg" not in facts and facts["var/z"]["size"] == 2
    assert frozenset({"app/hello", "app/hello2"}) in links
    assert facts["app/hello"]["mode"] == 0o4750 and facts["app/hello"]["uid"] == 7
    assert facts["app/hello"]["xattrs"] == {"user.k": b"v"}


def test_commit_digests_and_config(committed, built):  # noqa: F811
    store, digest, _, _ = committed
    image = store.resolve(NAME)
    assert image.manifest_digest == digest
    manifest_bytes = store.read_blob(digest)
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == digest
    top = image.manifest.layers[-1]
    blob = store.read_blob(top.digest)
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == top.digest and len(blob) == top.size
    assert top.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    tar = gzip.decompress(blob)
    assert image.config.diff_ids == built.config["rootfs"]["diff_ids"] + \
        ["sha256:" + hashlib.sha256(tar).hexdigest()]
    assert image.config.raw["history"][-1]["comment"] == "test commit"
    assert image.config.run_config["Cmd"] == ["/bin/sh"]


def test_commit_tar_format(committed):
    store, _, _, tmp = committed
    image = store.resolve(NAME)
    path = tmp / "top.tar"
    path.write_bytes(gzip.decompress(store.read_blob(image.manifest.layers[-1].digest)))
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert len(names) == len(set(names)), "duplicate entries"
    by_name = {m.name: m for m in members}
    assert {".wh.new", "etc/.wh.new", "usr/bin/.wh.su", "data/sub/.wh..wh..opq",
            "var/.wh..wh..opq"} <= set(names)
    assert "etc/new" not in names
    assert names.index("data/sub/.wh..wh..opq") == names.index("data/sub") + 1
    assert names.index("var/.wh..wh..opq") == names.index("var") + 1
    link = [m for m in members if m.name in ("app/hello", "app/hello2")]
    assert [m.islnk() for m in link] == [False, True]
    assert by_name["app/hello"].pax_headers["SCHILY.xattr.user.k"] == "v"
    assert not any("overlay" in k for m in members for k in m.pax_headers)
    for parent in {os.path.dirname(n) for n in names if "/" in n}:
        children = [n for n in names if os.path.dirname(n) == parent]
        assert children == sorted(children, key=os.fsencode), parent


def test_umoci_reads_the_saved_commit(committed):
    need("umoci", "skopeo")
    store, _, view, tmp = committed
    out = tmp / "committed-oci.tar"
    archive.save(store, [NAME], str(out), "oci-archive")
    sh(f"skopeo copy -q oci-archive:{out} oci:{tmp}/back:c && "
       f"umoci unpack --image {tmp}/back:c {tmp}/back-root")
    got = treecmp.describe(str(tmp / "back-root" / "rootfs"))
    assert treecmp.diff(got, view) == []


def test_skopeo_reads_a_docker_archive_save(committed):
    need("skopeo")
    store, digest, _, tmp = committed
    out = tmp / "committed-docker.tar"
    archive.save(store, [NAME], str(out), "docker-archive")
    info = json.loads(sh(f"skopeo inspect --raw docker-archive:{out}"))
    config = json.loads(sh(f"skopeo inspect --config --raw docker-archive:{out}"))
    assert config["rootfs"]["diff_ids"] == store.resolve(NAME).config.diff_ids
    assert len(info["layers"]) == len(config["rootfs"]["diff_ids"])


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_commit_compression_round_trip(committed, compression, tmp_path):
    store, _, view, _ = committed
    ref = f"localhost/committed:{compression}"
    commit_mod.commit(store, "box", [ref], compression=compression)
    out = tmp_path / "c.tar"
    archive.save(store, [ref], str(out), "oci-archive")
    fresh = Store.open(str(tmp_path / "fresh"))
    archive.load(fresh, str(out))
    image = fresh.resolve(ref)
    assert image.manifest.layers[-1].media_type.endswith(
        {"zstd": "+zstd", "none": ".tar"}[compression])
    assert treecmp.diff(view_of(fresh, ref, tmp_path, compression), view) == []


def podman(root, *args, check=True):
    base = ["podman", "--root", f"{root}/root", "--runroot", f"{root}/run",
            "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--runtime", "runc"]
    r = subprocess.run(base + list(args), capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"podman {' '.join(args)}: {r.returncode}\n{r.stderr}")
    return r.stdout


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_podman_loads_and_runs_a_saved_image(committed, fmt, tmp_path):
    need("podman", "runc")
    store, _, _, _ = committed
    out = tmp_path / "img.tar"
    archive.save(store, [NAME], str(out), fmt)
    root = tempfile.mkdtemp(prefix="img-pm-", dir="/tmp")    # podman: runroot < 50 chars
    try:
        assert NAME in podman(root, "load", "-i", str(out))
        got = podman(root, "run", "--rm", "--pull", "never", "--network", "none",
                     "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768", NAME,
                     "sh", "-c", "cat /app/hello; ls /var; ls /data/sub; pwd; echo $GREETING; "
                                 "test -e /etc/new || echo etc/new gone; "
                                 "test -e /usr/bin/su || echo su gone")
        assert got.split("\n") == ["hello from the commit", "z", "y", "/data", "hi",
                                   "etc/new gone", "su gone", ""]
    finally:
        podman(root, "rm", "-a", "-f", check=False)
        podman(root, "system", "reset", "-f", check=False)
        subprocess.run(["umount", "-R", f"{root}/root/overlay"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_podman_runs_a_docker_archive_image_saved_from_its_tar_splits(built, tmp_path):  # noqa: F811
    """Layers loaded from a docker archive are kept as tar-splits; saved, they are
    rebuilt byte for byte and podman takes them."""
    need("podman", "runc")
    store = Store.open(str(tmp_path / "store"))
    archive.load(store, built.docker_archive)
    out = tmp_path / "again.tar"
    archive.save(store, ["localhost/final:latest"], str(out), "docker-archive")
    root = tempfile.mkdtemp(prefix="img-pm-", dir="/tmp")
    try:
        podman(root, "load", "-i", str(out))
        got = podman(root, "run", "--rm", "--pull", "never", "--network", "none",
                     "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
                     "localhost/final:latest", "sh", "-c",
                     "test -e /etc/keep || echo keep gone; cat /etc/new /data/f")
        assert got.split("\n") == ["keep gone", "only", "changed", ""]
    finally:
        podman(root, "system", "reset", "-f", check=False)
        subprocess.run(["umount", "-R", f"{root}/root/overlay"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
