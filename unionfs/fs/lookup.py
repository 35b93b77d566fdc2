"""Names to nodes: probing the layers, identity keys, the union's stat, names.

`probe` resolves a name in a merged directory (layers.probe with the
directory caches); `node_for` turns what it found into the node of the
table (one per identity key: the origin's (st_dev, st_ino)); `stat` is an
object's attributes as the union shows them. A node remembers one name
(parent, name) to reach it by, plus, for a hard-linked file, the others
(aliases), so that removing the name in use falls back on another one.
"""
import errno
import functools
import os
import stat

from ..sys import libc
from . import redirect, whiteout
from .inodes import Node, layer_tuple, unpack_origin
from .layers import ABSENT_ERRNOS, Found, list_names, lower_positive, lstat_at
from .layers import probe as probe_layers
from .stack import NAME_MAX, UPPER, Stack, err

# A metacopy file is a hole; its blocks (512-byte units) hold xattrs at most.
METACOPY_MAX_BLOCKS = 16


def probe(stack: Stack, parent: Node, name: bytes):
    """Where name resolves in parent (a layers.Found), or None."""
    if len(name) > NAME_MAX:
        raise err(errno.ENAMETOOLONG, name)     # not "absent": no layer can hold it
    if whiteout.is_marker_name(name):
        return None
    parent.probes += 1
    dirs = stack.dirs
    # a lookup looks for xattr whiteouts in every directory (the kernel's does;
    # its readdir only in marked ones: fs.files.readdir)
    # (a redirect changes only which lower directories merge, never what
    # the name is: node_for follows it)
    return probe_layers(parent.layers, functools.partial(dirs.dirfd, parent), name,
                        functools.partial(dirs.names, parent))


def follow_redirect(stack: Stack, parent: Node, name: bytes, found):
    """`found` (a probe result for parent/name), with its merged layers
    taken from the redirected places if the directory holds a redirect and
    the mount follows them (fs.redirect). A mount that does not follow them
    refuses the lookup (EPERM), as the kernel's ("refusing to follow
    redirect"): the directory is not shown without its lower contents."""
    if not found.layers or found.places is not None or redirect.xattr_name(stack.fmt) is None:
        return found
    if redirect_mode(stack) not in FOLLOWING:
        # only where the parent has layers below the redirect's: the kernel
        # reads no redirect in the last layer of the parent's stack
        below = [li for li in found.layers if any(pl > li for pl in parent.layers)]
        if below and _has_redirect(stack, parent, name, below):
            raise err(errno.EPERM, name)
        return found
    if _has_redirect(stack, parent, name, found.layers):
        return probe_redirected(stack, parent, name) or found
    return found


FOLLOWING = tuple(m for m in redirect.MODES if redirect.follows(m))


def redirect_mode(stack: Stack) -> str:
    """The mount's redirect_dir mode (fs.redirect), "off" resolved as the
    kernel resolves it (fs.redirect.effective)."""
    return redirect.effective(stack.redirect_dir, stack.fmt)


def read_redirect(stack: Stack, dirfd: int, name: bytes) -> bytes | None:
    """The redirect of directory dirfd/name (its valid value), or None."""
    xname = redirect.xattr_name(stack.fmt)
    if xname is None or dirfd is None:
        return None
    try:
        value = os.getxattr(whiteout.entry_path(dirfd, name), xname, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES) \
                or e.errno in ABSENT_ERRNOS:
            return None
        raise
    try:
        redirect.parse(value)
    except redirect.InvalidRedirect:
        raise err(errno.EIO, name) from None    # the kernel too refuses a bad one
    return value


def _has_redirect(stack: Stack, parent: Node, name: bytes, merged: tuple) -> bool:
    """Does the directory parent/name hold a redirect in one of its merged
    layers that has layers below it (only there can it matter)?"""
    bottom = len(stack.layers) - 1      # an absolute redirect reaches every layer below
    return any(li != bottom and read_redirect(stack, stack.dirfd(parent, li), name)
               is not None for li in merged)


def _lower_parent(stack: Stack, parent: Node, li: int, path):
    """The fd of the directory in layer li where the lookup goes on: the
    parent's (a relative lookup: path is None) or, for an absolute path
    (components from the root), its parent's, opened from the layer root."""
    if path is None:
        return stack.dirfd(parent, li)
    try:
        return stack.layers[li].open_dir(b"/".join(path[:-1]))
    except OSError as e:
        if e.errno in ABSENT_ERRNOS:
            return None
        raise


def probe_redirected(stack: Stack, parent: Node, name: bytes) -> Found | None:
    """probe() for a name whose directory holds a redirect: each layer
    below one that holds a redirect is looked up at the redirected place
    (the kernel's ovl_lookup). The found directory's places in the layers
    not reached by name come with it (Found.places), for the directory cache."""
    found = None
    merged = []
    places = {}
    layers = list(parent.layers)
    bottom = len(stack.layers) - 1
    lookup_name = name
    path = None     # components from the layer root, once a redirect is absolute
    pos = -1
    while pos + 1 < len(layers):
        pos += 1
        li = layers[pos]
        opened = path is not None
        base = _lower_parent(stack, parent, li, path)
        if base is None:
            continue
        here = path[-1] if path is not None else lookup_name
        try:
            st = lstat_at(base, here)
            more_below = pos < len(layers) - 1
            if st is not None:
                if whiteout.is_whiteout(base, here, st):
                    break
                if found is None:
                    found = Found(li, st)
                if not stat.S_ISDIR(st.st_mode):
                    break
                merged.append(li)
                if path is not None or lookup_name != name:
                    places[li] = (path, here)
                if more_below and whiteout.is_opaque(base, here):
                    break
                value = read_redirect(stack, base, here) if li != bottom else None
                if value is not None:
                    if redirect.is_absolute(value):
                        # from the root of every layer below, whatever the
                        # parent's layers (the kernel's ovl_lookup does the same)
                        path = redirect.parse(value)
                        layers[pos + 1:] = [i for i in stack.root.layers if i > li]
                    elif path is not None:
                        path = redirect.redirected_path(path, value)
                    else:
                        lookup_name = value
            if more_below and whiteout.has_oci_whiteout(base, here):
                break
        finally:
            if opened:
                os.close(base)
    if found is None or not stat.S_ISDIR(found.st.st_mode):
        return found
    found.layers = tuple(merged)
    found.places = places or None
    return found


def _pin_dirfds(stack: Stack, parent: Node, node: Node, places: dict) -> None:
    """Open a redirected directory in the layers where its name is not its
    place (Found.places) and give the fds to the directory cache, which
    would otherwise open them by name. (DirCache has no public way in:
    its _fds/_keep are used here; see docs/redirect.md.)"""
    cache = stack.dirs
    for li, (path, here) in places.items():
        base = _lower_parent(stack, parent, li, path)
        if base is None:
            continue
        try:
            fd = libc.openat2(base, here, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno in ABSENT_ERRNOS:
                continue
            raise
        finally:
            if path is not None:
                os.close(base)
        old = cache._fds.pop((node, li), None)
        if old is not None:
            os.close(old)
        cache._keep(node, li, fd)


def read_origin(stack: Stack, dirfd: int, name: bytes, own: tuple):
    """The verified origin (st_dev, st_ino) of the upper object dirfd/name
    whose own identity is `own`, or None (fs.inodes.unpack_origin)."""
    try:
        raw = os.getxattr(whiteout.entry_path(dirfd, name), stack.origin_xattr,
                          follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise
    return unpack_origin(raw, own)


def identify(stack: Stack, parent: Node, name: bytes, found) -> tuple:
    """(identity key, inode number to report) of the object found at parent/name."""
    st = found.st
    nodes = stack.nodes
    if found.layer == UPPER:
        own = (st.st_dev, st.st_ino)
        origin = read_origin(stack, stack.dirfd(parent, UPPER), name, own)
        return nodes.key(*own), nodes.st_ino_of(*(origin or own))
    st_ino = nodes.st_ino_of(st.st_dev, st.st_ino)
    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
        path = parent.path()
        return nodes.key(st.st_dev, st.st_ino, (path + b"/" if path else b"") + name), st_ino
    return nodes.key(st.st_dev, st.st_ino), st_ino


def node_for(stack: Stack, parent: Node, name: bytes, found) -> Node:
    """The node of the object found at parent/name (made if new)."""
    key, st_ino = identify(stack, parent, name, found)
    nodes = stack.nodes
    node = nodes.find(key)
    kind = stat.S_IFMT(found.st.st_mode)
    if kind == stat.S_IFDIR:
        found = follow_redirect(stack, parent, name, found)
    if node is None or node.kind != kind:
        node = nodes.new(key, st_ino, parent, name, kind, found.layer,
                         found.layers or (found.layer,))
        if found.places:
            _pin_dirfds(stack, parent, node, found.places)
        if found.layer == UPPER and kind == stat.S_IFREG:
            node.data_layer = metacopy_data_layer(stack, parent, name, found.st)
        return node
    name_node(node, parent, name)
    if kind == stat.S_IFDIR:
        new_layers = found.layers or (found.layer,)
        if new_layers != node.layers:
            stack.dirs.drop(node)
            node.layers = layer_tuple(new_layers)
        node.layer = found.layer
        if found.places:
            _pin_dirfds(stack, parent, node, found.places)
    elif found.layer < node.layer:
        node.layer, node.layers = found.layer, layer_tuple((found.layer,))
    return node


def metacopy_data_layer(stack: Stack, parent: Node, name: bytes, st) -> int | None:
    """For an upper metacopy file, the lower layer holding its data."""
    if not st.st_size or st.st_blocks > METACOPY_MAX_BLOCKS:
        return None     # holds data: no metacopy (most big files are ruled out here)
    dfd = stack.dirfd(parent, UPPER)
    try:
        os.getxattr(whiteout.entry_path(dfd, name), stack.metacopy_xattr,
                    follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
    data = probe_layers(parent.layers[1:], lambda li: stack.dirfd(parent, li), name)
    if data is None or not stat.S_ISREG(data.st.st_mode):
        raise err(errno.EIO, name)      # the kernel too refuses a metacopy without data
    return data.layer


def child(stack: Stack, parent: Node, name: bytes):
    """(found, node-or-None) for an existing child, without counting a lookup."""
    found = probe(stack, parent, name)
    if found is None:
        return None, None
    return found, node_for(stack, parent, name, found)


def lookup(stack: Stack, parent_ino: int, name: bytes):
    """Resolve name in a directory; counts one lookup. Returns (node, stat)."""
    parent = stack.node(parent_ino)
    if name == b".":
        node = parent
    elif name == b"..":
        node = parent.parent or parent
    else:
        found = probe(stack, parent, name)
        if found is None:
            raise err(errno.ENOENT, name)
        node = node_for(stack, parent, name, found)
        node.lookups += 1
        return node, union_stat(stack, node, found)
    node.lookups += 1
    return node, union_stat(stack, node)


def forget(stack: Stack, ino: int, count: int) -> None:
    node = stack.nodes.get(ino)
    stack.nodes.forget(ino, count)
    if node is not None and stack.nodes.get(ino) is not node:
        stack.dirs.drop(node)


def raw_stat(stack: Stack, node: Node) -> os.stat_result:
    """The lstat of node's top object."""
    if node.parent is None:
        return os.fstat(stack.layers[node.layer].fd)
    if not node.unlinked:
        dfd = stack.dirfd(node.parent, node.layer)
        if dfd is not None:
            st = lstat_at(dfd, node.name)
            if st is not None:
                return st
    if node.handles:
        return os.fstat(node.handles[0].fd)
    if node.orphan_st is not None:
        return node.orphan_st
    raise err(errno.ENOENT, node.path())


def object_path(stack: Stack, node: Node):
    """What names node's top object itself for the xattr calls (which take
    no dirfd; whiteout.xattr_get and friends): a path never to follow, or
    the fd of an open file whose names are gone."""
    if node.parent is None:     # the root: its layer's root, by name from that fd
        return whiteout.entry_path(stack.layers[node.layer].fd, b".")
    if node.unlinked and node.handles:
        return node.handles[0].fd
    return whiteout.entry_path(stack.dirfd(node.parent, node.layer), node.name)


def stored_meta(stack: Stack, node: Node, st=None) -> tuple:
    """(uid, gid, mode, rdev) of node's top object as the layers store it:
    its lstat, with its layer's override xattr applied (fs.owners)."""
    if st is None:
        st = raw_stat(stack, node)
    owners = stack.owners
    if owners is None:
        return st.st_uid, st.st_gid, st.st_mode, st.st_rdev
    return owners.stored(st, node.layer, lambda: object_path(stack, node))


def union_stat(stack: Stack, node: Node, found=None):
    """(stat_result, nlink) of a node as the union shows it; `found`, a
    fresh probe result for the node, saves a second lstat. With id options
    or override layers the stat is a fs.owners.ShownStat."""
    if found is not None and found.layer == node.layer and not node.unlinked:
        st = found.st
    else:
        st = raw_stat(stack, node)
    if node.unlinked:
        # an upper file may keep names we never looked up; a lower one (or a
        # metacopy, whose open files are on the lower data) has none left
        keeps_names = (node.layer == UPPER and node.data_layer is None
                       and node.kind == stat.S_IFREG)
        nlink = st.st_nlink if keeps_names else 0
    elif node.kind == stat.S_IFDIR and len(node.layers) > 1:
        nlink = 1       # a merged directory, as overlayfs reports it
    else:
        nlink = st.st_nlink
    if stack.owners is not None:
        return stack.owners.show(st, nlink, node.layer, lambda: object_path(stack, node))
    return st, nlink


def is_lower_positive(stack: Stack, parent: Node, name: bytes) -> bool:
    """Does a lower layer show parent/name (so removing it needs a whiteout)?"""
    return lower_positive(parent.layers, lambda li: stack.dirfd(parent, li), name, UPPER)


def layers_below(stack: Stack, parent: Node, name: bytes) -> tuple:
    """The lower layers in which parent/name is a directory that merges."""
    found = probe_layers(parent.layers[1:], lambda li: stack.dirfd(parent, li), name)
    return found.layers if found is not None and found.layers else ()


def merged_names(stack: Stack, node: Node) -> list:
    """The names a directory shows (for emptiness checks)."""
    names = list_names(lambda li: stack.dirfd(node, li), node.layers)
    return [n for n in names if _exists(stack, node, n)]


def _exists(stack: Stack, parent: Node, name: bytes) -> bool:
    return probe(stack, parent, name) is not None



def name_node(node: Node, parent: Node, name: bytes) -> None:
    """parent/name names node, and becomes the name we use for it."""
    if node.parent is None:
        return
    if node.kind != stat.S_IFDIR and (node.parent is not parent or node.name != name) \
            and not node.unlinked:
        if node.aliases is None:
            node.aliases = set()
        node.aliases.add((node.parent, node.name))
    node.parent, node.name, node.unlinked = parent, name, False
    if node.aliases:
        node.aliases.discard((parent, name))


def unname(stack: Stack, node: Node, parent: Node, name: bytes) -> None:
    """parent/name no longer names node: fall back on another of its names."""
    if node.aliases:
        node.aliases.discard((parent, name))
    if node.parent is not parent or node.name != name:
        return
    while node.aliases:
        other_parent, other_name = node.aliases.pop()
        found = probe(stack, other_parent, other_name)
        if found is not None and \
                identify(stack, other_parent, other_name, found)[0] == node.key:
            node.parent, node.name = other_parent, other_name
            return
    node.unlinked = True
    if node.kind == stat.S_IFDIR:
        stack.dirs.drop(node)
