"""A test image built with umoci (an independent OCI implementation), with
whiteouts and an opaque dir, plus every archive shape `unionfs load` takes,
made by skopeo or (for shapes skopeo does not write) from the same blobs.

The image (top layer last):
  1. busybox, owners 1000:1001, setuid/setgid, sticky /tmp, a hard-link
     pair with a user xattr, a FIFO, a char device, an absolute symlink;
  2. (umoci repack) /etc/drop deleted (a `.wh.drop`), /data/f changed, /new;
  3. (by hand) /etc opaque with only etc/new, a whiteout of /srv/owned.
"""
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile

import pytest

TOOLS = ("umoci", "skopeo")


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install {' '.join(missing)})")


def sh(script, cwd=None):
    r = subprocess.run(["bash", "-euc", script], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"script failed ({r.returncode}): {script}\n{r.stdout}\n{r.stderr}")
    return r.stdout


BUILD = r"""
W={w}
umoci init --layout $W/oci
umoci new --image $W/oci:final
umoci unpack --image $W/oci:final $W/b
R=$W/b/rootfs
mkdir -p $R/bin $R/sbin $R/usr/bin $R/usr/sbin $R/etc $R/proc $R/dev $R/sys $R/data/sub \
  $R/srv $R/var $R/run $R/tmp
cp /bin/busybox $R/bin/
chroot $R /bin/busybox --install -s
echo keep > $R/etc/keep; echo drop > $R/etc/drop; echo f > $R/data/f; echo x > $R/data/sub/x
echo pair > $R/data/a; ln $R/data/a $R/data/b; setfattr -n user.note -v hello $R/data/a
echo owned > $R/srv/owned; chown 1000:1001 $R/srv/owned; chmod 0640 $R/srv/owned
echo su > $R/usr/bin/su; chmod 4755 $R/usr/bin/su
echo sg > $R/var/sg; chgrp 50 $R/var/sg; chmod 2755 $R/var/sg
chmod 1777 $R/tmp
mkfifo $R/run/fifo; mknod $R/dev/mynull c 1 3
ln -s /usr/share/zoneinfo/UTC $R/etc/localtime
umoci repack --image $W/oci:final $W/b
rm $R/etc/drop; echo changed > $R/data/f; echo new > $R/new
umoci repack --image $W/oci:final $W/b
mkdir -p $W/l3/etc $W/l3/srv
touch $W/l3/etc/.wh..wh..opq $W/l3/srv/.wh.owned; echo only > $W/l3/etc/new
tar -C $W/l3 --owner=0 --group=0 --numeric-owner -cf $W/l3.tar .
umoci raw add-layer --image $W/oci:final --tag final $W/l3.tar
umoci config --image $W/oci:final --config.cmd /bin/sh --config.env GREETING=hi \
  --config.workingdir /data --os linux --architecture amd64
umoci unpack --image $W/oci:final $W/check
skopeo copy -q oci:$W/oci:final oci-archive:$W/final-oci.tar:localhost/final:latest
skopeo copy -q oci:$W/oci:final docker-archive:$W/final-docker.tar:localhost/final:latest
"""


class Built:
    def __init__(self, w):
        self.w = w
        self.oci = os.path.join(w, "oci")
        self.rootfs = os.path.join(w, "check", "rootfs")
        self.oci_archive = os.path.join(w, "final-oci.tar")
        self.docker_archive = os.path.join(w, "final-docker.tar")
        index = json.load(open(os.path.join(self.oci, "index.json")))
        desc = next(d for d in index["manifests"]
                    if d.get("annotations", {}).get("org.opencontainers.image.ref.name")
                    == "final")
        self.manifest = json.loads(self.blob(desc["digest"]))
        self.manifest_digest = desc["digest"]
        self.config_bytes = self.blob(self.manifest["config"]["digest"])
        self.config = json.loads(self.config_bytes)

    def blob(self, digest):
        with open(os.path.join(self.oci, "blobs", "sha256", digest.split(":")[1]), "rb") as f:
            return f.read()

    def layer_tars(self):
        """The layers' uncompressed tars, base first."""
        out = []
        for d in self.manifest["layers"]:
            data = self.blob(d["digest"])
            out.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        return out

    def gzip_layers(self):
        return [self.blob(d["digest"]) for d in self.manifest["layers"]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    need(*TOOLS)
    if shutil.which("setfattr") is None:
        pytest.skip("needs setfattr (apt-get install attr)")
    w = str(tmp_path_factory.mktemp("umoci"))
    sh(BUILD.format(w=w))
    return Built(w)


def _add(tf, name, data, kind=tarfile.REGTYPE, link=""):
    import io
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def docker_legacy_archive(b: Built, path, gzip_layers=False, outer_gzip=False):
    """docker save (before 25): <id>/layer.tar files, <id>/VERSION, <id>/json,
    <config>.json, manifest.json, repositories."""
    tars = b.gzip_layers() if gzip_layers else b.layer_tars()
    config_name = hashlib.sha256(b.config_bytes).hexdigest() + ".json"
    opener = gzip.open(path, "wb") if outer_gzip else open(path, "wb")
    with opener as raw, tarfile.open(fileobj=raw, mode="w") as tf:
        layers, parent = [], None
        for data in tars:
            lid = hashlib.sha256((parent or "").encode() + data).hexdigest()
            _add(tf, lid, b"", tarfile.DIRTYPE)
            _add(tf, f"{lid}/VERSION", b"1.0")
            _add(tf, f"{lid}/json", json.dumps({"id": lid, "parent": parent}).encode())
            _add(tf, f"{lid}/layer.tar", data)
            layers.append(f"{lid}/layer.tar")
            parent = lid
        _add(tf, config_name, b.config_bytes)
        _add(tf, "manifest.json", json.dumps([{"Config": config_name,
                                               "RepoTags": ["localhost/final:latest"],
                                               "Layers": layers}]).encode())
        _add(tf, "repositories", json.dumps({"localhost/final": {"latest": parent}}).encode())


def docker25_archive(b: Built, path):
    """docker save (25+): an OCI layout with uncompressed layers plus
    manifest.json whose Layers point into blobs/sha256."""
    tars = b.layer_tars()

    def hexof(data):
        return hashlib.sha256(data).hexdigest()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": "sha256:" + hexof(b.config_bytes),
                           "size": len(b.config_bytes)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": "sha256:" + hexof(t), "size": len(t)} for t in tars]}
    mbytes = json.dumps(manifest).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": manifest["mediaType"], "digest": "sha256:" + hexof(mbytes),
         "size": len(mbytes),
         "annotations": {"io.containerd.image.name": "docker.io/library/final:latest",
                         "org.opencontainers.image.ref.name": "latest"}}]}
    with tarfile.open(path, "w") as tf:
        _add(tf, "blobs", b"", tarfile.DIRTYPE)
        _add(tf, "blobs/sha256", b"", tarfile.DIRTYPE)
        for data in tars + [b.config_bytes, mbytes]:
            _add(tf, "blobs/sha256/" + hexof(data), data)
        _add(tf, "index.json", json.dumps(index).encode())
        _add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tf, "manifest.json", json.dumps([{
            "Config": "blobs/sha256/" + hexof(b.config_bytes),
            "RepoTags": ["localhost/final:latest"],
            "Layers": ["blobs/sha256/" + hexof(t) for t in tars]}]).encode())
        _add(tf, "repositories", b'{"localhost/final": {"latest": "x"}}')
    return "sha256:" + hexof(mbytes)
