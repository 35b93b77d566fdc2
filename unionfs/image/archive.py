"""`unionfs load` and `unionfs save`: image archives in and out of the store.

Accepted by load (a file or a directory, told apart by their contents):
- docker-archive (`docker save`), legacy shape: manifest.json + repositories,
  `<id>/layer.tar` files (uncompressed or gzip/zstd), or, as skopeo writes
  them, `<id>/layer.tar` entries that are symlinks to other entries;
- Docker 25+ archives: an OCI layout inside plus manifest.json (the OCI
  index is used, so manifest digests are kept; RepoTags name the images);
- OCI archives (a tar of an OCI layout) and OCI layout directories; an index
  nested in the index is resolved to this host's platform.
The outer archive may itself be gzip-compressed. Every blob is verified
against its digest and size, every layer against its config's diff_id.

save writes oci-archive or docker-archive to a temp file next to the output
and renames it into place.
"""
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass

from . import digest as dg
from . import formats
from . import reference as refs_mod
from .compression import decompressing_reader, sniff
from .store import Store

MAX_LINK_HOPS = 40


class ArchiveError(Exception):
    """The input is not an archive we can load (one line)."""


@dataclass(frozen=True)
class Loaded:
    manifest_digest: str
    image_id: str
    names: tuple


# --- sources: the files of an archive or of a directory ------------------------


class _DirSource:
    """Files of a directory; symlinks are followed only inside it."""

    def __init__(self, path: str):
        self.label = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def open(self, rel: str):
        from ..sys import libc
        try:
            fd = libc.openat2(self.fd, rel.encode(), os.O_RDONLY,
                              resolve=libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            raise ArchiveError(f"{self.label}: cannot open {rel}: {e.strerror}") from None
        return os.fdopen(fd, "rb")

    def exists(self, rel: str) -> bool:
        try:
            self.open(rel).close()
            return True
        except ArchiveError:
            return False

    def close(self) -> None:
        os.close(self.fd)


class _TarSource:
    """Members of a tar archive by normalised name; symlink and hard-link
    members are resolved inside the archive."""

    def __init__(self, path: str):
        self.label = path
        try:
            self.tf = tarfile.open(path, "r:*")
            self.members = {}
            for m in self.tf.getmembers():
                self.members[_norm(m.name)] = m
        except (tarfile.TarError, EOFError):
            raise ArchiveError(f"{path}: not a tar archive (plain, gzip, bzip2 or xz)") \
                from None

    def _member(self, rel: str):
        name = _norm(rel)
        for _ in range(MAX_LINK_HOPS):
            m = self.members.get(name)
            if m is None:
                return None
            if m.issym():
                base = posixpath.dirname(name)
                target = m.linkname
                name = _norm(target if target.startswith("/") else posixpath.join(base, target))
            elif m.islnk():
                name = _norm(m.linkname)
            else:
                return m if m.isreg() else None
        raise ArchiveError(f"{self.label}: too many links at {rel}")

    def open(self, rel: str):
        m = self._member(rel)
        if m is None:
            raise ArchiveError(f"{self.label}: no file {rel} in the archive")
        return self.tf.extractfile(m)

    def exists(self, rel: str) -> bool:
        return self._member(rel) is not None

    def close(self) -> None:
        self.tf.close()


def _norm(name: str) -> str:
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return "/".join(parts)


def _read(src, rel: str, limit: int = formats.MAX_JSON) -> bytes:
    with src.open(rel) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ArchiveError(f"{src.label}: {rel} is too large")
    return data


def _blob_rel(digest: str) -> str:
    return "blobs/sha256/" + dg.parse(digest)


# --- load --------------------------------------------------------------------------


def load(store: Store, path: str, default_name: str | None = None) -> list:
    """Load every image of the archive or layout at `path`; returns Loaded
    records. `default_name` names OCI images whose ref annotation is only a
    tag (default: localhost/<basename of path>)."""
    if os.path.isdir(path):
        src = _DirSource(path)
    elif os.path.exists(path):
        src = _TarSource(path)
    else:
        raise ArchiveError(f"{path}: no such file or directory")
    if default_name is None:
        base = os.path.basename(os.path.normpath(path)).split(".")[0].lower() or "image"
        default_name = "localhost/" + "".join(c if c.isalnum() or c in "._-" else "-"
                                              for c in base).strip("._-")
    try:
        with store.writing():
            if src.exists("index.json") and src.exists("oci-layout"):
                tags = _docker_tags(src) if src.exists("manifest.json") else {}
                return _load_oci(store, src, default_name, tags)
            if src.exists("manifest.json"):
                return _load_docker(store, src)
            raise ArchiveError(f"{path}: not a docker-archive, OCI archive or OCI layout "
                               f"(no manifest.json or index.json)")
    finally:
        src.close()


def _docker_tags(src) -> dict:
    """config digest -> RepoTags, from a Docker 25+ archive's manifest.json."""
    out = {}
    for entry in formats.parse_docker_manifest(_read(src, "manifest.json")):
        config = _read(src, entry.config)
        out.setdefault(dg.of_bytes(config), []).extend(entry.repo_tags)
    return out


def _load_docker(store: Store, src) -> list:
    loaded = []
    for entry in formats.parse_docker_manifest(_read(src, "manifest.json")):
        config_bytes = _read(src, entry.config)
        config = formats.ImageConfig.parse(config_bytes)
        diff_ids = config.diff_ids
        if len(diff_ids) != len(entry.layers):
            raise formats.FormatError(f"{entry.config}: {len(diff_ids)} diff_ids for "
                                      f"{len(entry.layers)} layers")
        descs = []
        for rel, diff_id in zip(entry.layers, diff_ids, strict=True):
            # an uncompressed layer is kept as a tar-split, not copied; if the
            # split does not hold (a file replaced by a later entry), read it again
            with src.open(rel) as stream:
                info = store.apply_layer(stream, diff_id=diff_id, tar_split=True)
            if not info.blob_stored:
                with src.open(rel) as stream:
                    info = store.apply_layer(stream, diff_id=diff_id)
            descs.append(formats.Descriptor(formats.OCI_LAYER_BY_COMPRESSION[info.compression],
                                            info.blob_digest, info.blob_size))
        config_digest = store.add_blob_bytes(config_bytes)
        manifest = formats.make_manifest(
            formats.Descriptor(formats.OCI_CONFIG, config_digest, len(config_bytes)), descs)
        names = [refs_mod.parse(t).name for t in entry.repo_tags]
        digest = store.add_image(manifest, names)
        loaded.append(Loaded(digest, config_digest, tuple(names)))
    return loaded


def _load_oci(store: Store, src, default_name: str, tags: dict) -> list:
    index = formats.Index.parse(_read(src, "index.json"))
    loaded = []
    done = {}
    for desc in index.manifests:
        if desc.media_type in formats.INDEX_TYPES:
            nested = _read_blob(src, desc)
            desc_img = formats.pick_platform(formats.Index.parse(nested).manifests)
        elif desc.media_type in formats.MANIFEST_TYPES:
            desc_img = desc
        else:
            continue        # not an image (an artifact, an attestation)
        names = _oci_names(desc, default_name)
        if desc_img.digest not in done:
            done[desc_img.digest] = _load_oci_image(store, src, desc_img)
        digest, config_digest = done[desc_img.digest]
        names += [refs_mod.parse(t).name for t in tags.get(config_digest, ())]
        for name in names:
            store.tag(name, digest)
        loaded.append(Loaded(digest, config_digest, tuple(dict.fromkeys(names))))
    if not loaded:
        raise ArchiveError(f"{src.label}: the index lists no image")
    return loaded


def _oci_names(desc, default_name: str) -> list:
    ann = desc.annotations
    full = ann.get(formats.CONTAINERD_NAME_ANNOTATION)
    if isinstance(full, str) and full:
        return [refs_mod.parse(full).name]
    ref_name = ann.get(formats.REF_NAME_ANNOTATION)
    if not isinstance(ref_name, str) or not ref_name:
        return []
    if "/" in ref_name or ref_name.count(":") > 0:
        return [refs_mod.parse(ref_name).name]
    return [refs_mod.parse(f"{default_name}:{ref_name}").name]


def _read_blob(src, desc: formats.Descriptor) -> bytes:
    data = _read(src, _blob_rel(desc.digest))
    dg.check(data, desc.digest, f"blob {desc.digest}")
    if len(data) != desc.size:
        raise dg.DigestError(f"blob {desc.digest} has {len(data)} bytes, expected {desc.size}")
    return data


def _load_oci_image(store: Store, src, desc: formats.Descriptor) -> tuple:
    manifest_bytes = _read_blob(src, desc)
    manifest = formats.Manifest.parse(manifest_bytes, desc.media_type)
    config_bytes = _read_blob(src, manifest.config)
    config = formats.ImageConfig.parse(config_bytes)
    if len(config.diff_ids) != len(manifest.layers):
        raise formats.FormatError(f"manifest {desc.digest}: {len(manifest.layers)} layers for "
                                  f"{len(config.diff_ids)} diff_ids")
    for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        if store.has_layer(diff_id) and store.has_blob(layer.digest):
            continue
        with src.open(_blob_rel(layer.digest)) as stream:
            store.apply_layer(stream, diff_id=diff_id, blob_digest=layer.digest,
                              blob_size=layer.size)
    config_digest = store.add_blob_bytes(config_bytes, manifest.config.digest)
    return store.add_image(manifest_bytes), config_digest


# --- save --------------------------------------------------------------------------

SAVE_FORMATS = ("oci-archive", "docker-archive")


def save(store: Store, refs: list, out_path: str, fmt: str = "oci-archive") -> None:
    if fmt not in SAVE_FORMATS:
        raise ArchiveError(f"unknown format {fmt!r} (one of {', '.join(SAVE_FORMATS)})")
    images = [store.resolve(r) for r in refs]
    names = []
    for ref, image in zip(refs, images, strict=True):
        try:
            parsed = refs_mod.parse(ref)
            name = parsed.name if parsed.name in image.names else None
        except refs_mod.ReferenceError:
            name = None
        names.append([name] if name else list(image.names))
    out_dir = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".unionfs-save-")
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
                if fmt == "oci-archive":
                    _save_oci(store, tf, images, names)
                else:
                    _save_docker(store, tf, images, names)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _add_bytes(tf, name: str, data: bytes) -> None:
    import io
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def _add_dir(tf, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tf.addfile(info)


def _add_blob(tf, store: Store, digest: str, seen: set) -> None:
    if digest in seen:
        return
    seen.add(digest)
    info = tarfile.TarInfo(_blob_rel(digest))
    info.size = store.blob_size(digest)
    info.mode = 0o644
    with store.open_blob(digest) as f:
        tf.addfile(info, f)


def _save_oci(store: Store, tf, images, names) -> None:
    _add_bytes(tf, "oci-layout", formats.canonical_json({"imageLayoutVersion":
                                                         formats.OCI_LAYOUT_VERSION}))
    _add_dir(tf, "blobs")
    _add_dir(tf, "blobs/sha256")
    seen = set()
    entries = []
    for image, image_names in zip(images, names, strict=True):
        for d in [image.manifest_digest, image.config_digest] + \
                [layer.digest for layer in image.manifest.layers]:
            _add_blob(tf, store, d, seen)
        desc = {"mediaType": image.manifest.media_type, "digest": image.manifest_digest,
                "size": store.blob_size(image.manifest_digest)}
        for name in image_names or [None]:
            entry = dict(desc)
            if name:
                entry["annotations"] = {formats.REF_NAME_ANNOTATION: name,
                                        formats.CONTAINERD_NAME_ANNOTATION: name}
            entries.append(entry)
    _add_bytes(tf, "index.json", formats.canonical_json(
        {"schemaVersion": 2, "mediaType": formats.OCI_INDEX, "manifests": entries}))


def docker_tag(name: str) -> str:
    """How docker writes a name in RepoTags (docker.io/library/x:t is x:t)."""
    ref = refs_mod.parse(name)
    repo = ref.repo
    if ref.registry == refs_mod.DEFAULT_REGISTRY:
        repo = ref.repository
        if repo.startswith("library/"):
            repo = repo[len("library/"):]
    return f"{repo}:{ref.tag}"


def _save_docker(store: Store, tf, images, names) -> None:
    manifest_json, repositories, seen = [], {}, set()
    for image, image_names in zip(images, names, strict=True):
        config_name = dg.parse(image.config_digest) + ".json"
        if config_name not in seen:
            seen.add(config_name)
            _add_bytes(tf, config_name, store.read_blob(image.config_digest))
        layer_names = []
        for desc, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True):
            rel = dg.parse(diff_id) + "/layer.tar"
            layer_names.append(rel)
            if rel in seen:
                continue
            seen.add(rel)
            _add_dir(tf, dg.parse(diff_id))
            size = store.layer(diff_id).info()["size"]
            info = tarfile.TarInfo(rel)
            info.size = size
            info.mode = 0o644
            with store.open_blob(desc.digest) as raw:
                compression, head = sniff(raw)
                tf.addfile(info, decompressing_reader(head, compression))
        tags = [docker_tag(n) for n in image_names if refs_mod.parse(n).tag]
        manifest_json.append({"Config": config_name, "RepoTags": tags or None,
                              "Layers": layer_names})
        for t in tags:
            repo, tag = t.rsplit(":", 1)
            repositories.setdefault(repo, {})[tag] = dg.parse(image.config.diff_ids[-1])
    _add_bytes(tf, "manifest.json", formats.canonical_json(manifest_json))
    if repositories:
        _add_bytes(tf, "repositories", formats.canonical_json(repositories))

