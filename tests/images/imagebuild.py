"""Making small images for tests: layer tars, configs, manifests, OCI layouts."""
import hashlib
import io
import json
import os

from unionfs.image import formats
from unionfs.image.compression import compressing_writer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str) -> bytes:
    buf = io.BytesIO()
    w = compressing_writer(buf, compression)
    w.write(data)
    w.close()
    return buf.getvalue()


def config_for(tars, run=None) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": run or {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(tars))],
    }).encode()


def store_image(store, tars, names=(), compression="gzip", run=None) -> str:
    """Put an image made of `tars` (base first) into the store; its manifest digest."""
    descs = []
    for tar in tars:
        blob = compress(tar, compression)
        info = store.apply_layer(io.BytesIO(blob), diff_id=sha(tar), blob_digest=sha(blob))
        descs.append(formats.Descriptor(formats.OCI_LAYER_BY_COMPRESSION[compression],
                                        info.blob_digest, info.blob_size))
    config = config_for(tars, run)
    cdigest = store.add_blob_bytes(config)
    manifest = formats.make_manifest(formats.Descriptor(formats.OCI_CONFIG, cdigest,
                                                        len(config)), descs)
    return store.add_image(manifest, list(names))


def write_oci_layout(path, tars, ref_name="latest", compression="gzip", run=None,
                     annotations=None):
    """An OCI layout directory holding one image; returns its manifest digest."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def put(data):
        d = sha(data)
        with open(os.path.join(path, "blobs", "sha256", d[7:]), "wb") as f:
            f.write(data)
        return d

    descs = []
    for tar in tars:
        blob = compress(tar, compression)
        descs.append(formats.Descriptor(formats.OCI_LAYER_BY_COMPRESSION[compression],
                                        put(blob), len(blob)))
    config = config_for(tars, run)
    manifest = formats.make_manifest(formats.Descriptor(formats.OCI_CONFIG, put(config),
                                                        len(config)), descs)
    mdigest = put(manifest)
    ann = dict(annotations or {})
    if ref_name:
        ann[formats.REF_NAME_ANNOTATION] = ref_name
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": formats.OCI_MANIFEST, "digest": mdigest, "size": len(manifest),
         **({"annotations": ann} if ann else {})}]}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return mdigest
