"""OCI and Docker image formats: media types, descriptors, manifests,
indexes, configs, and docker-save's manifest.json, parsed strictly.

Everything read from an image is untrusted: each parser checks types and
digests and raises FormatError with one line naming the problem.
"""
import json
from dataclasses import dataclass, field

from . import digest as dg

OCI_LAYOUT_VERSION = "1.0.0"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LAYER_TYPES = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_LAYER_NONDIST,
               OCI_LAYER_NONDIST + "+gzip", OCI_LAYER_NONDIST + "+zstd",
               DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN)

# compression of a layer blob, by media type and by its first bytes
COMPRESSIONS = ("gzip", "zstd", "none")
OCI_LAYER_BY_COMPRESSION = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"

MAX_JSON = 4 << 20      # manifests and configs are small; a huge one is hostile


class FormatError(ValueError):
    """An image document that is malformed or not what it claims to be."""


def sniff_compression(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def load_json(data: bytes, what: str) -> dict:
    if len(data) > MAX_JSON:
        raise FormatError(f"{what} is too large ({len(data)} bytes)")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    return doc


def canonical_json(doc) -> bytes:
    """The bytes we write for documents we make (stable, compact, sorted)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict, hash=False, compare=False)
    platform: dict | None = field(default=None, hash=False, compare=False)

    @classmethod
    def parse(cls, doc, what: str) -> "Descriptor":
        if not isinstance(doc, dict):
            raise FormatError(f"{what}: descriptor is not an object")
        media_type = doc.get("mediaType")
        digest = doc.get("digest")
        size = doc.get("size")
        if not isinstance(media_type, str):
            raise FormatError(f"{what}: descriptor without a mediaType")
        try:
            dg.parse(digest)
        except dg.DigestError as e:
            raise FormatError(f"{what}: {e}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{what}: descriptor size {size!r} is not a non-negative integer")
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise FormatError(f"{what}: annotations are not an object")
        plat = doc.get("platform")
        if plat is not None and not isinstance(plat, dict):
            raise FormatError(f"{what}: platform is not an object")
        return cls(media_type, digest, size, annotations, plat)

    def to_json(self) -> dict:
        doc = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform:
            doc["platform"] = dict(self.platform)
        return doc


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple           # Descriptors, base layer first (as in the document)
    raw: dict

    @classmethod
    def parse(cls, data: bytes, media_type_hint: str | None = None) -> "Manifest":
        doc = load_json(data, "manifest")
        if doc.get("schemaVersion") != 2:
            raise FormatError(f"manifest schemaVersion {doc.get('schemaVersion')!r} "
                              f"is not supported (only 2)")
        media_type = doc.get("mediaType") or media_type_hint or OCI_MANIFEST
        if media_type in INDEX_TYPES or "manifests" in doc:
            raise FormatError("expected an image manifest, found an index")
        if media_type not in MANIFEST_TYPES:
            raise FormatError(f"unsupported manifest media type {media_type!r}")
        config = Descriptor.parse(doc.get("config"), "manifest config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise FormatError("manifest has no layers list")
        descs = tuple(Descriptor.parse(d, f"manifest layer {i}") for i, d in enumerate(layers))
        for i, d in enumerate(descs):
            if d.media_type not in LAYER_TYPES:
                raise FormatError(f"manifest layer {i}: unsupported media type {d.media_type!r}")
        return cls(media_type, config, descs, doc)


def layer_compression(media_type: str) -> str:
    if media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


def to_oci_layer_type(media_type: str) -> str:
    if media_type.startswith("application/vnd.oci."):
        return media_type
    return OCI_LAYER_BY_COMPRESSION[layer_compression(media_type)]


@dataclass(frozen=True)
class Index:
    manifests: tuple        # Descriptors
    raw: dict

    @classmethod
    def parse(cls, data: bytes) -> "Index":
        doc = load_json(data, "index")
        if doc.get("schemaVersion") != 2:
            raise FormatError(f"index schemaVersion {doc.get('schemaVersion')!r} is not 2")
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise FormatError("index has no manifests list")
        return cls(tuple(Descriptor.parse(d, f"index entry {i}")
                         for i, d in enumerate(manifests)), doc)


def host_platform() -> tuple[str, str]:
    import platform
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
            "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
    return "linux", arch


def pick_platform(descs, want: tuple[str, str] | None = None) -> Descriptor:
    """From an index's image manifests, the one for this host's platform (or
    the only one without a platform)."""
    want = want or host_platform()
    images = [d for d in descs if d.media_type in MANIFEST_TYPES + INDEX_TYPES]
    for d in images:
        p = d.platform or {}
        if (p.get("os"), p.get("architecture")) == want:
            return d
    unplatformed = [d for d in images if not d.platform]
    if len(unplatformed) == 1:
        return unplatformed[0]
    raise FormatError(f"no image for platform {want[0]}/{want[1]} in the index")


@dataclass(frozen=True)
class ImageConfig:
    raw: dict

    @classmethod
    def parse(cls, data: bytes) -> "ImageConfig":
        doc = load_json(data, "image config")
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
            raise FormatError("image config has no rootfs of type 'layers'")
        ids = rootfs.get("diff_ids")
        if not isinstance(ids, list):
            raise FormatError("image config has no rootfs.diff_ids list")
        for i in ids:
            try:
                dg.parse(i)
            except dg.DigestError as e:
                raise FormatError(f"image config diff_id: {e}") from None
        cfg = doc.get("config")
        if cfg is not None and not isinstance(cfg, dict):
            raise FormatError("image config's config is not an object")
        return cls(doc)

    @property
    def diff_ids(self) -> list:
        return list(self.raw["rootfs"]["diff_ids"])

    @property
    def run_config(self) -> dict:
        """Entrypoint, Cmd, Env, WorkingDir, User, ... (may be empty)."""
        return dict(self.raw.get("config") or {})


@dataclass(frozen=True)
class DockerArchiveEntry:
    """One image of a docker-save manifest.json."""
    config: str             # path inside the archive
    layers: tuple           # paths inside the archive, base layer first
    repo_tags: tuple


def parse_docker_manifest(data: bytes) -> list:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"manifest.json is not valid JSON: {e}") from None
    if not isinstance(doc, list) or not doc:
        raise FormatError("manifest.json is not a non-empty list")
    out = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise FormatError(f"manifest.json entry {i} is not an object")
        config = item.get("Config")
        layers = item.get("Layers")
        tags = item.get("RepoTags") or []
        if not isinstance(config, str) or not isinstance(layers, list) \
                or not all(isinstance(x, str) for x in layers):
            raise FormatError(f"manifest.json entry {i} lacks Config or Layers")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise FormatError(f"manifest.json entry {i}: RepoTags is not a list of strings")
        out.append(DockerArchiveEntry(config, tuple(layers), tuple(tags)))
    return out


def make_manifest(config: Descriptor, layers, annotations=None) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": config.to_json(), "layers": [d.to_json() for d in layers]}
    if annotations:
        doc["annotations"] = dict(annotations)
    return canonical_json(doc)
