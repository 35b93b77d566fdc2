"""Copy-up planned in one place: what an operation needs in the upper.

Every operation that changes something first calls `require` with the nodes
it needs in the upper (each with "metadata only" or not) and the nodes it
touches, before it changes anything. Used directly (tests, tools), the copies
run inline. Behind the FUSE adapter (`Stack.inline_copies` is False) nothing
is copied here: `require` raises `Deferred` with what is missing, or with the
touched nodes whose copy is in flight; the adapter's copier runs those copies
in worker threads under per-node locks, then calls the operation again, which
now finds its nodes up. So no copy ever runs on the event loop unasked, a
rename or unlink never races a copy of the same node, and the adapter needs
no knowledge of which operation needs what.
"""
import errno
import os
import stat

from . import copyup, whiteout
from .inodes import Node, layer_tuple
from .layers import lstat_at
from .lookup import read_origin
from .stack import OPEN_PASS, UPPER, Stack, err


class Deferred(Exception):
    """The operation cannot go on yet: copy `needs` ((node, meta_only), top
    of each chain first) and wait for the copies of `busy` nodes; then retry."""

    def __init__(self, needs=(), busy=()):
        super().__init__(needs, busy)
        self.needs = needs
        self.busy = busy


def chain(stack: Stack, node: Node, meta_only: bool = False) -> list:
    """The nodes that must be copied up for node to live in upper, top-down.

    meta_only: the caller changes metadata only (chmod, chown, utimes,
    xattrs), so a metacopy of node itself is enough when enabled."""
    stack.require_upper()
    nodes = []
    if node.layer == UPPER and node.data_layer is not None and not meta_only:
        nodes.append(node)          # a metacopy whose data must now follow
        node = node.parent
    while node is not None and node.layer != UPPER:
        nodes.append(node)
        node = node.parent
    nodes.reverse()
    return nodes


def require(stack: Stack, needs=(), touches=()) -> None:
    """Make sure every (node, meta_only) of needs is in the upper, and no
    copy of a needed or touched node is in flight (see the module doc)."""
    in_flight = stack.in_flight
    if in_flight:
        busy = [n for n in touches if n in in_flight]
        busy += [n for n, _ in needs if n in in_flight]
        if busy:
            raise Deferred((), busy)
    missing = [(n, meta_only) for n, meta_only in needs if chain(stack, n, meta_only)]
    if not missing:
        return
    if not stack.inline_copies:
        raise Deferred(missing, ())
    for node, meta_only in missing:
        copy_inline(stack, node, meta_only)


def copy_inline(stack: Stack, node: Node, meta_only: bool = False) -> None:
    for n in chain(stack, node, meta_only):
        job = make_job(stack, n, meta_only)
        try:
            copyup.run(job)
        except copyup.NotCloned:
            job.clone_only = False
            copyup.run(job)
        commit(stack, n, job)


def make_job(stack: Stack, node: Node, meta_only: bool = False) -> copyup.CopyJob:
    """Everything copyup.run needs, with fds of its own (safe off the loop)."""
    if node.layer == UPPER:      # completing a metacopy: data from below
        kind, src_layer = copyup.DATA, node.data_layer
    else:
        kind, src_layer = copyup.FULL, node.layer
        if meta_only and stack.metacopy and node.kind == stat.S_IFREG:
            kind = copyup.META
    src_dir = stack.dirfd(node.parent, src_layer)
    dst_dir = stack.upper_dirfd(node.parent)
    meta_dir = dst_dir if kind == copyup.DATA else src_dir
    st = lstat_at(meta_dir, node.name) if src_dir is not None else None
    if st is None:
        raise err(errno.ENOENT, node.path())
    if kind == copyup.DATA:     # the metacopy file's record names the origin
        origin = read_origin(stack, dst_dir, node.name, stack.nodes.dev_ino(node.key))
    elif node.kind != stat.S_IFDIR and st.st_nlink > 1:
        # as the kernel: one name of a lower hard link, copied up alone, is a
        # file of its own, with its own inode number (no origin to show)
        origin = None
    else:
        origin = stack.nodes.dev_ino(node.key)
    devs = (stack.layers[src_layer].dev, stack.layers[UPPER].dev)
    clone_only = kind != copyup.META and stat.S_ISREG(st.st_mode) and st.st_size > 0 \
        and stack.reflinks.expected(devs)
    extra = {}
    owners = stack.owners
    if owners is not None:      # read before any fd is dup'ed: it may fail (EINVAL)
        meta_layer = UPPER if kind == copyup.DATA else src_layer
        path = whiteout.entry_path(meta_dir, node.name)
        extra = {"owner": owners.stored(st, meta_layer, lambda: path),
                 "override": owners.upper_override,
                 "xattr_layers": (owners.overrides[meta_layer], owners.upper_override),
                 "ignore_chown": owners.squashed}
    return copyup.CopyJob(os.dup(src_dir), node.name, os.dup(dst_dir), os.dup(stack.work_fd),
                          st, origin, stack.durable, kind, devs, clone_only,
                          stack.temp_pool, stack.reflinks, stack.profile.xattr_ns,
                          dac_override=stack.profile.dac_override, **extra)


def commit(stack: Stack, node: Node, job: copyup.CopyJob) -> None:
    """After a copy: the node lives in upper; reopen read-only handles there."""
    stack.attr_changed.append(node.ino)
    stack.nodes.rekey(node, stack.nodes.key(*job.result))
    if job.origin is None:
        node.st_ino = stack.nodes.st_ino_of(*job.result)
    if job.kind == copyup.META:
        node.data_layer = node.layer
    elif job.kind == copyup.DATA:
        node.data_layer = None
    if node.kind == stat.S_IFDIR:
        node.layers = layer_tuple((UPPER,) + node.layers)
    else:
        node.layers = layer_tuple((UPPER,))
    node.layer = UPPER
    if node.data_layer is not None:
        return      # the data has not moved: readers stay where they are
    for h in node.handles:
        if not h.writable:
            fd = stack.open_upper(node, (h.flags & OPEN_PASS & ~os.O_TRUNC) | os.O_CLOEXEC)
            os.close(h.fd)
            h.fd = fd
