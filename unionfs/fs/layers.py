"""Layers and the stack: opening layer roots, fd-relative probing, merge rules.

Layer 0 is the upper (when there is one), 1.. the lowers, top first. A path
inside a layer is always resolved with openat2(RESOLVE_BENEATH|NO_SYMLINKS)
from the layer's root fd, so a hostile layer (``etc -> /etc``, ``x -> ../..``)
can neither reveal nor change a host file: such a path simply does not exist.
"""
import errno
import os
import stat
from dataclasses import dataclass

from ..sys import libc
from . import whiteout

# errors that mean "not in this layer" when probing a path
ABSENT_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.ENAMETOOLONG)


@dataclass
class Layer:
    index: int
    path: str
    fd: int                      # O_PATH|O_DIRECTORY fd of the root
    dev: int
    writable: bool = False

    @classmethod
    def open(cls, index: int, path: str, writable: bool = False) -> "Layer":
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(index, path, fd, os.fstat(fd).st_dev, writable)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_dir(self, relpath: bytes) -> int:
        """An O_PATH fd of directory relpath inside this layer; OSError if none."""
        return libc.openat2(self.fd, relpath or b".",
                            os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)


def lstat_at(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError as e:
        if e.errno in ABSENT_ERRNOS:
            return None
        raise


@dataclass
class Found:
    """Where a name resolves in the union: its top object and the merged dirs."""
    layer: int                        # layer of the top (visible) object
    st: os.stat_result                # its lstat
    layers: tuple = ()                # for directories: layers that merge, top first
    # a redirected directory's places in the layers where it is not at its
    # name, {layer: (path from the root or None: in the parent, name)}
    # (fs.lookup.probe_redirected), for the directory cache to open
    places: dict | None = None


def probe(parent_layers, dirfd_of, name: bytes, names_of=None, marked_of=None) -> Found | None:
    """Resolve NAME in a merged directory.

    parent_layers: indices of the layers in which the parent is a directory,
    top first (already cut at an opaque layer). dirfd_of(layer) gives the
    parent's fd in that layer; names_of(layer), if given, the set of every
    name in it (or None): a name not in it needs no lstat. Applies the
    whiteout rules of both formats; returns None when the name is absent or
    whited out. marked_of(layer), if given, says whether the parent holds
    xattr whiteouts there (whiteout.has_xattr_whiteouts); else it may.
    Markers that could only hide layers below matter only when there are
    such layers, so the common single-layer case costs one lstat.
    """
    found = None
    merged = []
    last = len(parent_layers) - 1
    for pos, li in enumerate(parent_layers):
        dfd = dirfd_of(li)
        if dfd is None:
            continue
        more_below = pos < last
        names = names_of(li) if names_of is not None else None
        st = lstat_at(dfd, name) if names is None or name in names else None
        if st is not None:
            if whiteout.is_whiteout(dfd, name, st, marked_of is None or marked_of(li)):
                break
            if found is None:
                found = Found(li, st)
            if not stat.S_ISDIR(st.st_mode):
                break
            merged.append(li)
            if more_below and whiteout.is_opaque(dfd, name):
                break
        # an OCI whiteout hides NAME in the layers below this one
        if more_below and (whiteout.WH_PREFIX + name in names if names is not None
                           else whiteout.has_oci_whiteout(dfd, name)):
            break
    if found is not None and merged:
        found.layers = tuple(merged)
    return found


def lower_positive(parent_layers, dirfd_of, name: bytes, below: int) -> bool:
    """Does any layer below index `below` show NAME (so removing it needs a whiteout)?"""
    for li in parent_layers:
        if li <= below:
            continue
        dfd = dirfd_of(li)
        if dfd is None:
            continue
        st = lstat_at(dfd, name)
        if st is not None:
            return not whiteout.is_whiteout(dfd, name, st)
        if whiteout.has_oci_whiteout(dfd, name):
            return False
    return False


def layer_names(dirfd: int) -> frozenset:
    """Every name in one layer's directory, markers included."""
    rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        return frozenset(map(os.fsencode, os.listdir(rfd)))
    finally:
        os.close(rfd)


def list_names(dirfd_of, parent_layers, names_sink=None):
    """Merged names of a directory, in first-seen order, markers hidden.

    Whiteouts found while listing prune lower layers; the caller still
    confirms each name with probe() (xattr whiteouts need more than d_type).
    names_sink(layer, frozenset) receives each layer's full listing.
    """
    seen = {}
    hidden = set()
    for li in parent_layers:
        dfd = dirfd_of(li)
        if dfd is None:
            continue
        rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        layer_hidden = []
        everything = []
        try:
            with os.scandir(rfd) as it:
                for entry in it:
                    name = os.fsencode(entry.name)
                    everything.append(name)
                    if name.startswith(whiteout.WH_PREFIX):
                        target = whiteout.whited_out_name(name)
                        if target is not None:
                            layer_hidden.append(target)
                        continue
                    if name in seen or name in hidden:
                        continue
                    if _may_be_device(entry):
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                            hidden.add(name)
                            continue
                    seen[name] = li
        finally:
            os.close(rfd)
        hidden.update(layer_hidden)
        if names_sink is not None:
            names_sink(li, frozenset(everything))
    return list(seen)


def _may_be_device(entry: os.DirEntry) -> bool:
    return not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)
                or entry.is_symlink())
