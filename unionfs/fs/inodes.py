"""The node table: union inode numbers <-> nodes, lookup counts and forget.

A node is one object of the merged view. It is named by (parent, name) and
remembers where it lives: the layer of its top object and, for a directory,
every layer that merges into it. Its identity key is the (st_dev, st_ino) of
its origin (the lower object it was copied up from, else its own), so the
union's inode number is stable across copy-up and remount: the origin's real
st_ino when every layer shares one filesystem (as the kernel reports), else a
64-bit xxhash of the key, with collisions among live nodes detected.

A lower file with several hard links gets one node per name (its key adds
the path): copy-up breaks such links, as the kernel's does without an index,
and pyfuse3 ties the FUSE node id to st_ino, so names that are about to stop
sharing data must not share a node.
"""
import struct

import xxhash

ROOT_INO = 1


def pack_key(key) -> bytes:
    """Bytes of an identity key: (st_dev, st_ino) or (st_dev, st_ino, path)."""
    return struct.pack("<QQ", key[0], key[1]) + (key[2] if len(key) > 2 else b"")


def unpack_key(raw: bytes):
    if len(raw) < 16:
        return None
    dev, ino = struct.unpack_from("<QQ", raw)
    return (dev, ino) if len(raw) == 16 else (dev, ino, raw[16:])


class Node:
    __slots__ = ("ino", "key", "parent", "name", "kind", "layer", "layers", "lookups",
                 "unlinked", "handles", "orphan_st", "aliases", "data_layer", "probes",
                 "__weakref__")

    def __init__(self, ino, key, parent, name, kind, layer, layers):
        self.ino = ino
        self.key = key
        self.parent = parent
        self.name = name
        self.kind = kind            # stat.S_IFMT of the object
        self.layer = layer          # layer index of the top object (0 = upper)
        self.layers = layers        # directories: merged layers, top first
        self.lookups = 0
        self.unlinked = False
        self.handles = []           # its open file handles (they keep it alive)
        self.orphan_st = None        # last stat of a removed special file
        self.aliases = None          # other (parent, name)s of a hard-linked file
        self.data_layer = None       # metacopy: the lower layer still holding the data
        self.probes = 0              # names probed in this directory (see core._names)

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

    def ino_for(self, key) -> int:
        """The union inode number for an identity key, without collisions."""
        if len(key) == 2 and key[0] == self.common_dev and key[1] > ROOT_INO:
            candidate = key[1]
            node = self.by_ino.get(candidate)
            if node is None or node.key == key:
                return candidate
        raw = pack_key(key)
        seed = 0
        while True:
            candidate = xxhash.xxh64_intdigest(raw, seed=seed)
            if candidate > ROOT_INO:
                node = self.by_ino.get(candidate)
                if node is None or node.key == key:
                    return candidate
            seed += 1

    def get(self, ino: int) -> Node | None:
        return self.by_ino.get(ino)

    def add(self, node: Node) -> Node:
        self.by_ino[node.ino] = node
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= count
        if node.lookups <= 0 and not node.handles:
            del self.by_ino[ino]

    def release_handle(self, node: Node, handle) -> None:
        node.handles.remove(handle)
        if node.lookups <= 0 and not node.handles and self.by_ino.get(node.ino) is node:
            del self.by_ino[node.ino]

    def __len__(self):
        return len(self.by_ino)
