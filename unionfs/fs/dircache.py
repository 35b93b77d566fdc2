"""Directory caches: O_PATH fds of directories per layer, and lower listings.

Every name is resolved relative to its parent's fd in a layer, and a
directory's own fd is opened from its parent's, one component at a time, so
that paths of any depth work (a path from the layer root would stop at
PATH_MAX). The fds of busy directories are kept (an LRU, bounded). After LISTING_AFTER_PROBES
lookups in one directory, its lower layers' listings are read once and kept:
each further name then costs a set lookup instead of an lstat per layer
(lower layers do not change while mounted). Bounded by the total number of
names kept. The upper is never listed ahead: it changes under us.
"""
import os
from collections import OrderedDict

from ..sys import libc
from . import whiteout
from .layers import ABSENT_ERRNOS, layer_names

UPPER = 0
DIRFD_CACHE_SIZE = 4096
LISTING_AFTER_PROBES = 8
LISTING_CACHE_NAMES = 200_000


class DirCache:
    def __init__(self, layers):
        self.layers = layers
        self._fds: OrderedDict = OrderedDict()        # (node, layer) -> fd
        self._listings: OrderedDict = OrderedDict()   # (node, layer) -> frozenset
        self._marked: dict = {}       # (node, layer) -> holds xattr whiteouts
        self.listed_names = 0
        self.hits = [0, 0, 0, 0]      # dirfd hits, misses; listing hits, misses

    def dirfd(self, node, li: int) -> int | None:
        """An O_PATH fd of directory node in layer li, None if absent there."""
        fds = self._fds
        fd = fds.get((node, li))
        if fd is not None:
            fds.move_to_end((node, li))
            self.hits[0] += 1
            return fd
        self.hits[1] += 1
        # open from the nearest ancestor whose fd is known, down to node
        chain = [node]
        parent = node.parent
        while parent is not None and (parent, li) not in fds:
            chain.append(parent)
            parent = parent.parent
        fd = None if parent is None else fds[(parent, li)]
        for n in reversed(chain):
            try:
                if fd is None:      # n is the root
                    fd = self.layers[li].open_dir(b"")
                else:
                    fd = libc.openat2(fd, n.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError as e:
                if e.errno in ABSENT_ERRNOS:
                    return None
                raise
            self._keep(n, li, fd)
        return fd

    def _keep(self, node, li: int, fd: int) -> None:
        self._fds[(node, li)] = fd
        if len(self._fds) > DIRFD_CACHE_SIZE:
            _, old = self._fds.popitem(last=False)
            os.close(old)

    def marked(self, node, li: int) -> bool:
        """Does node's directory in layer li hold xattr whiteouts (kernel's mark)?"""
        key = (node, li)
        mark = self._marked.get(key)
        if mark is None:
            fd = self.dirfd(node, li)
            mark = fd is not None and whiteout.has_xattr_whiteouts(fd)
            if len(self._marked) > DIRFD_CACHE_SIZE:
                self._marked.clear()
            self._marked[key] = mark
        return mark

    def drop(self, node) -> None:
        """Forget node's fds and listings in every layer (it moved, or is gone)."""
        for li in range(len(self.layers)):
            self._marked.pop((node, li), None)
            fd = self._fds.pop((node, li), None)
            if fd is not None:
                os.close(fd)
            names = self._listings.pop((node, li), None)
            if names is not None:
                self.listed_names -= len(names)

    def keep_listing(self, node, li: int, names: frozenset) -> None:
        if li == UPPER:
            return
        old = self._listings.pop((node, li), None)
        if old is not None:
            self.listed_names -= len(old)
        self._listings[(node, li)] = names
        self.listed_names += len(names)
        while self.listed_names > LISTING_CACHE_NAMES and len(self._listings) > 1:
            _, dropped = self._listings.popitem(last=False)
            self.listed_names -= len(dropped)

    def names(self, node, li: int):
        """The names in node's directory in lower layer li, once node is busy
        (None: not known, probe the disk)."""
        if li == UPPER:
            return None
        names = self._listings.get((node, li))
        if names is not None:
            self._listings.move_to_end((node, li))
            self.hits[2] += 1
            return names
        if node.probes < LISTING_AFTER_PROBES:
            return None
        self.hits[3] += 1
        dfd = self.dirfd(node, li)
        if dfd is None:
            return None
        names = layer_names(dfd)
        self.keep_listing(node, li, names)
        return names

    def hit_rates(self) -> dict:
        def rate(hit, miss):
            return round(hit / (hit + miss), 4) if hit + miss else None
        h = self.hits
        return {"dirfd_hit_rate": rate(h[0], h[1]), "listing_hit_rate": rate(h[2], h[3]),
                "dirfd_lookups": h[0] + h[1], "listing_lookups": h[2] + h[3]}

    def __len__(self):
        return len(self._fds)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._listings.clear()
        self._marked.clear()
        self.listed_names = 0
        self.hits = [0, 0, 0, 0]      # dirfd hits, misses; listing hits, misses
