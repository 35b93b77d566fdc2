"""Provenance: where a path of the merged view comes from, for `unionfs which`.

For a path it says which layer serves the object (the upper, or lower N, with
the layer's directory), what it is, whether an upper object was copied up
(it carries a verified origin record) or made there, the layers a directory
merges and the one that makes it opaque; for a name that is not there, the
layer whose marker hides it (and the marker's form). Read-only: it looks the
path up without counting lookups or creating nodes beyond the parents'.
"""
import errno
import os
import stat

from . import whiteout
from .layers import lstat_at
from .lookup import child, read_origin
from .stack import UPPER, Stack, err

_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "char device",
          stat.S_IFBLK: "block device"}


def layer_label(stack: Stack, li: int) -> dict:
    layer = stack.layers[li]
    return {"layer": "upper" if li == UPPER else f"lower {li}", "layer_dir": layer.path}


def _marker(stack: Stack, parent, name: bytes) -> dict | None:
    """The first layer (top down) that hides name in parent, and how."""
    for li in parent.layers:
        dfd = stack.dirfd(parent, li)
        if dfd is None:
            continue
        st = lstat_at(dfd, name)
        if st is not None:
            if whiteout.is_whiteout(dfd, name, st):
                form = "char 0/0" if stat.S_ISCHR(st.st_mode) else "whiteout xattr"
                return {**layer_label(stack, li), "marker": form}
            return None     # an object, not a marker: the name was never hidden
        if whiteout.has_oci_whiteout(dfd, name):
            return {**layer_label(stack, li), "marker": ".wh." + os.fsdecode(name)}
    return None


def which(stack: Stack, path: str) -> dict:
    """Provenance of `path` (relative to the union's root, / separated)."""
    node = stack.root
    parts = [os.fsencode(p) for p in path.split("/") if p and p != "."]
    shown = "/" + "/".join(os.fsdecode(p) for p in parts)
    for depth, name in enumerate(parts):
        found, child_node = child(stack, node, name)
        if child_node is None:
            answer = {"path": shown, "exists": False}
            if depth == len(parts) - 1:
                hidden = _marker(stack, node, name)
                if hidden is not None:
                    answer["whited_out"] = hidden
            return answer
        if depth < len(parts) - 1 and child_node.kind != stat.S_IFDIR:
            raise err(errno.ENOTDIR, shown)
        node = child_node
    st = os.fstat(stack.top_layer().fd) if node.parent is None else found.st
    answer = {"path": shown, "exists": True, "kind": _KINDS.get(stat.S_IFMT(st.st_mode), "?"),
              **layer_label(stack, node.layer)}
    if node.layer == UPPER and node.parent is not None:
        own = (st.st_dev, st.st_ino)
        origin = read_origin(stack, stack.upper_dirfd(node.parent), node.name, own)
        answer["copied_up"] = origin is not None
        if node.data_layer is not None:
            answer["metacopy_data"] = layer_label(stack, node.data_layer)
    if node.kind == stat.S_IFDIR:
        answer["merged"] = [layer_label(stack, li)["layer"] for li in node.layers]
        last = node.layers[-1]
        if node.parent is not None and last != len(stack.layers) - 1:
            dfd = stack.dirfd(node.parent, last)
            if dfd is not None and whiteout.is_opaque(dfd, node.name):
                answer["opaque"] = layer_label(stack, last)["layer"]
    return answer
