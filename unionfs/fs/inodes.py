"""The node table: FUSE node ids <-> nodes, identity keys, inode numbers, forget.

A node is one object of the merged view, named by (parent, name), knowing
where it lives: the layer of its top object and, for a directory, every layer
that merges into it. Three numbers belong to it, kept apart on purpose:

- `ino`, its FUSE node id: handed out from a counter and never reused, so a
  node id never names two objects while the kernel may still hold the old
  one (filesystems reuse inode numbers at once; a FORGET for the old object
  may still be on its way).
- `key`, the identity of the object it stands for, to find its node again
  on the next lookup: the (st_dev, st_ino) of its top object (plus the path
  for a lower file with several links: copy-up breaks such links, as the
  kernel's does without an index, so each name gets its own node). On the
  filesystem all layers share, the key is the inode number alone (one int
  instead of a tuple: a node table can hold hundreds of thousands). A
  copy-up re-keys the node to its upper object.
- `st_ino`, the inode number the union reports: the origin's (the lower
  object it was copied up from, else its own), as the origin's real st_ino
  when every layer shares one filesystem (as the kernel reports), else a
  64-bit xxhash of (st_dev, st_ino). Stable across copy-up and remount.
"""
import stat
import struct

import xxhash

ROOT_INO = 1


def pack_origin(origin, own) -> bytes:
    """The origin record of a copied-up object: the origin's (st_dev, st_ino)
    and the copy's own, which says whom the record was written for."""
    return struct.pack("<QQQQ", origin[0], origin[1], own[0], own[1])


def unpack_origin(raw: bytes, own):
    """The origin's (st_dev, st_ino), if the record was written for `own`:
    a copy made outside the union (`cp -a` keeps xattrs) is not the object
    the record names, and keeps its own identity."""
    if len(raw) != 32:
        return None
    dev, ino, own_dev, own_ino = struct.unpack("<QQQQ", raw)
    return (dev, ino) if (own_dev, own_ino) == own else None


_LAYER_TUPLES: dict = {}
_KINDS = {k: k for k in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                         stat.S_IFIFO, stat.S_IFSOCK)}


def layer_tuple(layers: tuple) -> tuple:
    """One shared tuple per combination of layers (nodes hold many copies)."""
    return _LAYER_TUPLES.setdefault(layers, layers)


class Node:
    __slots__ = ("ino", "key", "st_ino", "parent", "name", "kind", "layer", "layers",
                 "lookups", "unlinked", "handles", "orphan_st", "aliases", "data_layer",
                 "probes")

    def __init__(self, ino, key, st_ino, parent, name, kind, layer, layers):
        self.ino = ino
        self.key = key
        self.st_ino = st_ino
        self.parent = parent
        self.name = name
        self.kind = _KINDS.get(kind, kind)  # stat.S_IFMT of the object (one shared int)
        self.layer = layer          # layer index of the top object (0 = upper)
        self.layers = layer_tuple(layers)   # directories: merged layers, top first
        self.lookups = 0
        self.unlinked = False
        self.handles = ()           # its open file handles (they keep it alive), a list once any
        self.orphan_st = None        # last stat of a removed special file
        self.aliases = None          # other (parent, name)s of a hard-linked file
        self.data_layer = None       # metacopy: the lower layer still holding the data
        self.probes = 0              # names probed in this directory (see dircache)

    def path(self) -> bytes:
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def __repr__(self):
        return f"<Node {self.ino} {self.path()!r} layer={self.layer} layers={self.layers}>"


class NodeTable:
    def __init__(self, common_dev: int | None):
        self.common_dev = common_dev
        self.by_ino: dict[int, Node] = {}
        self.by_key: dict = {}
        self._next_ino = ROOT_INO + 1

    def key(self, dev: int, ino: int, path: bytes | None = None):
        """The identity key of object (dev, ino) (with the path of a lower hard link)."""
        if path is not None:
            return (dev, ino, path)
        return ino if dev == self.common_dev else (dev, ino)

    def dev_ino(self, key) -> tuple:
        """The (st_dev, st_ino) a key stands for."""
        return (self.common_dev, key) if isinstance(key, int) else key[:2]

    def st_ino_of(self, dev: int, ino: int) -> int:
        """The inode number the union reports for an object (dev, ino)."""
        if dev == self.common_dev:
            return ino
        return xxhash.xxh64_intdigest(struct.pack("<QQ", dev, ino)) or 1

    def get(self, ino: int) -> Node | None:
        return self.by_ino.get(ino)

    def find(self, key) -> Node | None:
        """The live node of the object `key`, if it has one (a removed object's
        node does not count: its inode number may already name another)."""
        node = self.by_key.get(key)
        return None if node is None or node.unlinked else node

    def new(self, key, st_ino, parent, name, kind, layer, layers, ino=None) -> Node:
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
        node = Node(ino, key, st_ino, parent, name, kind, layer, layers)
        self.by_ino[ino] = node
        self.by_key[key] = node
        return node

    def rekey(self, node: Node, key) -> None:
        """node now stands for the object `key` (it was copied up)."""
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        node.key = key
        self.by_key[key] = node

    def _drop(self, node: Node) -> None:
        del self.by_ino[node.ino]
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]

    def forget(self, ino: int, count: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= count
        if node.lookups <= 0 and not node.handles:
            self._drop(node)

    def release_handle(self, node: Node, handle) -> None:
        node.handles.remove(handle)
        if not node.handles:
            node.handles = ()
        if node.lookups <= 0 and not node.handles and self.by_ino.get(node.ino) is node:
            self._drop(node)

    def __len__(self):
        return len(self.by_ino)
