"""Image references: `[registry/]repository[:tag][@digest]`, normalised as
docker and podman do (`busybox` is `docker.io/library/busybox:latest`).

The store keys its references by `Reference.name` (`registry/repo:tag`); the
registry client uses `registry`, `repository`, `tag` and `digest`.
"""
import re
from dataclasses import dataclass

from . import digest as dg

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?\Z")


class ReferenceError(ValueError):
    pass


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repo(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def name(self) -> str:
        """`registry/repository:tag` (or `@digest` when there is no tag)."""
        if self.tag is not None:
            return f"{self.repo}:{self.tag}"
        return f"{self.repo}@{self.digest}"

    def __str__(self) -> str:
        text = self.repo
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse(text: str, default_tag: bool = True) -> Reference:
    """Parse and normalise; `default_tag` adds `:latest` when neither a tag
    nor a digest is given."""
    if not text or len(text) > 512 or any(c.isspace() for c in text):
        raise ReferenceError(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not dg.is_digest(digest):
            raise ReferenceError(f"invalid digest in image reference {text!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise ReferenceError(f"invalid tag in image reference {text!r}")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        if not _HOST_RE.match(first):
            raise ReferenceError(f"invalid registry in image reference {text!r}")
        registry, repository = first, remainder
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = "library/" + repository
    if not _REPO_RE.match(repository):
        raise ReferenceError(f"invalid repository name in image reference {text!r}")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)

