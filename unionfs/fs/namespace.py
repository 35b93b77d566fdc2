"""Removing and moving names: unlink, rmdir, rename (with its flags).

A name that a lower layer shows is hidden by a whiteout when it goes: made
in the same step as the removal where the kernel's format allows it
(renameat2 RENAME_WHITEOUT), else written right after. A directory arriving
where lower layers hold its name becomes opaque. A directory that exists in a
lower layer cannot be renamed (EXDEV, the kernel's default without
redirect_dir) unless redirect_dir=on: then it is copied up alone and its
upper copy records its old place (fs.redirect; docs/redirect.md).
Everything an operation needs copied up is asked for (and
in flight copies of what it touches waited for) before it changes anything.
"""
import errno
import os
import stat

from ..sys import libc
from . import redirect, whiteout, workdir
from .copyplan import require
from .create import check_name
from .inodes import Node, layer_tuple
from .layers import lstat_at
from .lookup import (
    child,
    is_lower_positive,
    merged_names,
    name_node,
    read_redirect,
    redirect_mode,
    unname,
)
from .stack import NAME_MAX, UPPER, Stack, err


def whiteout_format(stack: Stack, name: bytes) -> str:
    """The marker format for a whiteout of name, decided before anything
    changes. An OCI marker cannot hold a name longer than NAME_MAX - 4
    bytes: such a name gets the kernel's char 0/0 form (unionfs reads both
    forms in any upper) where the server may make one, else the operation
    fails with ENAMETOOLONG and nothing is changed."""
    if stack.fmt == whiteout.FORMAT_OCI and len(whiteout.WH_PREFIX + name) > NAME_MAX:
        if stack.profile.mknod_whiteouts:
            return whiteout.FORMAT_KERNEL
        raise err(errno.ENAMETOOLONG, name)
    return stack.fmt


def remove_upper_entry(stack: Stack, parent: Node, name: bytes, needs_whiteout: bool,
                       is_dir: bool) -> None:
    """Remove parent/name from the upper, leaving a whiteout if needed. A
    marker that cannot be written fails the operation with nothing changed:
    a device whiteout replaces the object in one step (RENAME_WHITEOUT) or
    takes a free name; an OCI one is made beside the object before it goes
    (it hides only the layers below), and taken back if the removal fails."""
    fmt = whiteout_format(stack, name) if needs_whiteout else stack.fmt
    udfd = stack.upper_dirfd(parent)
    present = lstat_at(udfd, name) is not None
    device = whiteout.device_whiteouts(fmt)
    if present and needs_whiteout and device:
        # move it out and leave a whiteout in one step
        tmp = workdir.temp_name()
        whiteout.rename_leaving_whiteout(udfd, name, stack.work_fd, tmp, stack.work_fd,
                                         workdir.temp_name())
        workdir.remove_tree(stack.work_fd, tmp)
        return
    if not present:
        if needs_whiteout:
            whiteout.make_whiteout(udfd, name, fmt)
        return
    made = needs_whiteout and whiteout.make_whiteout(udfd, name, fmt)
    try:
        if is_dir:
            tmp = workdir.temp_name()
            libc.renameat2(udfd, name, stack.work_fd, tmp, libc.RENAME_NOREPLACE)
        else:
            os.unlink(name, dir_fd=udfd)
    except BaseException:
        if made:
            whiteout.remove_oci_whiteout(udfd, name)
        raise
    if is_dir:
        workdir.remove_tree(stack.work_fd, tmp)


def unlink(stack: Stack, parent_ino, name) -> None:
    parent = stack.node(parent_ino)
    found, node = child(stack, parent, name)
    if node is None:
        raise err(errno.ENOENT, name)
    if node.kind == stat.S_IFDIR:
        raise err(errno.EISDIR, name)
    stack.require_upper()
    require(stack, needs=((parent, False),), touches=(node,))
    if node.kind != stat.S_IFREG:
        node.orphan_st = found.st     # FIFOs, devices: the kernel opens them, not us
    needs_whiteout = found.layer != UPPER or is_lower_positive(stack, parent, name)
    remove_upper_entry(stack, parent, name, needs_whiteout, is_dir=False)
    unname(stack, node, parent, name)


def rmdir(stack: Stack, parent_ino, name) -> None:
    parent = stack.node(parent_ino)
    found, node = child(stack, parent, name)
    if node is None:
        raise err(errno.ENOENT, name)
    if node.kind != stat.S_IFDIR:
        raise err(errno.ENOTDIR, name)
    if merged_names(stack, node):
        raise err(errno.ENOTEMPTY, name)
    stack.require_upper()
    require(stack, needs=((parent, False),), touches=(node,))
    needs_whiteout = found.layer != UPPER or is_lower_positive(stack, parent, name)
    remove_upper_entry(stack, parent, name, needs_whiteout, is_dir=True)
    unname(stack, node, parent, name)


def _dir_in_lower(node: Node) -> bool:
    """Is node a directory with lower layers (its node's layers: a
    redirect followed)?"""
    return node.kind == stat.S_IFDIR and (node.layer != UPPER or len(node.layers) > 1)


def _is_ancestor(node: Node, other: Node) -> bool:
    while other is not None:
        if other is node:
            return True
        other = other.parent
    return False


def _make_opaque(stack: Stack, dirfd: int, name: bytes) -> None:
    fd = libc.openat2(dirfd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        whiteout.make_opaque(fd, stack.fmt)
    finally:
        os.close(fd)


def can_redirect(stack: Stack) -> bool:
    """May a rename of a lower or merged directory write a redirect?"""
    return redirect.creates(redirect_mode(stack)) and \
        redirect.xattr_name(stack.fmt) is not None


def _write_redirect(stack: Stack, node: Node, same_dir: bool) -> None:
    """Before node (a directory, now in the upper) is renamed: record its
    old place, as the kernel's ovl_set_redirect does (EXDEV where the value
    would be too long: the caller falls back on copying)."""
    def upper_redirect(n: Node):
        dfd = stack.dirfd(n.parent, UPPER)
        return read_redirect(stack, dfd, n.name) if dfd is not None else None
    existing = upper_redirect(node)
    ancestry = []
    n = node
    while n.parent is not None:
        ancestry.append((n.name, upper_redirect(n)))
        n = n.parent
    try:
        value = redirect.value_for_rename(existing, same_dir, node.name, ancestry)
    except redirect.InvalidRedirect:
        raise err(errno.EXDEV) from None
    if value is None:
        return
    # the lower fds of the directory (opened at its old place) stay right
    # after the move; make sure they are open before it
    for li in node.layers[1:]:
        stack.dirfd(node, li)
    path = whiteout.entry_path(stack.upper_dirfd(node.parent), node.name)
    os.setxattr(path, redirect.xattr_name(stack.fmt), value, follow_symlinks=False)


def rename(stack: Stack, old_parent_ino, old_name, new_parent_ino, new_name, flags=0) -> None:
    if flags & ~(libc.RENAME_NOREPLACE | libc.RENAME_EXCHANGE) or \
            flags == libc.RENAME_NOREPLACE | libc.RENAME_EXCHANGE:
        raise err(errno.EINVAL)
    old_parent = stack.node(old_parent_ino)
    new_parent = stack.node(new_parent_ino)
    check_name(new_name)
    _, src = child(stack, old_parent, old_name)
    if src is None:
        raise err(errno.ENOENT, old_name)
    _, dst = child(stack, new_parent, new_name)
    exchange = bool(flags & libc.RENAME_EXCHANGE)
    if exchange and dst is None:
        raise err(errno.ENOENT, new_name)
    if dst is not None and flags & libc.RENAME_NOREPLACE:
        raise err(errno.EEXIST, new_name)
    if dst is src and not exchange:
        return      # the same file under both names: nothing to do
    stack.require_upper()
    redirecting = not exchange and _dir_in_lower(src) and can_redirect(stack)
    if (_dir_in_lower(src) and not redirecting) or (exchange and _dir_in_lower(dst)):
        raise err(errno.EXDEV)
    src_is_dir = src.kind == stat.S_IFDIR
    if dst is not None and not exchange:
        dst_is_dir = dst.kind == stat.S_IFDIR
        if src_is_dir and not dst_is_dir:
            raise err(errno.ENOTDIR, new_name)
        if dst_is_dir and not src_is_dir:
            raise err(errno.EISDIR, new_name)
        if dst_is_dir and merged_names(stack, dst):
            raise err(errno.ENOTEMPTY, new_name)
    if src_is_dir and _is_ancestor(src, new_parent):
        raise err(errno.EINVAL)
    needs = [(old_parent, False), (new_parent, False), (src, False)]
    if exchange:
        needs.append((dst, False))
    require(stack, needs=needs, touches=(src,) if dst is None else (src, dst))
    old_dfd = stack.upper_dirfd(old_parent)
    new_dfd = stack.upper_dirfd(new_parent)
    if redirecting:
        _write_redirect(stack, src, old_parent is new_parent)
    src_needs_whiteout = not exchange and is_lower_positive(stack, old_parent, old_name)
    wh_fmt = whiteout_format(stack, old_name) if src_needs_whiteout else stack.fmt
    # a directory arriving where lower layers hold the name must hide them
    # (marked in place first: an upper-only directory marked opaque where it
    # is shows the same, should the rename then fail)
    # (a redirected directory merges from its old place only: no mark needed)
    src_opaque = src_is_dir and not redirecting and \
        is_lower_positive(stack, new_parent, new_name)
    if src_opaque:
        _make_opaque(stack, old_dfd, old_name)
    if exchange:
        dst_opaque = dst.kind == stat.S_IFDIR and is_lower_positive(stack, old_parent, old_name)
        if dst_opaque:
            _make_opaque(stack, new_dfd, new_name)
        libc.renameat2(old_dfd, old_name, new_dfd, new_name, libc.RENAME_EXCHANGE)
        if src_opaque:
            src.layers = layer_tuple((UPPER,))
        if dst_opaque:
            dst.layers = layer_tuple((UPPER,))
        unname(stack, src, old_parent, old_name)
        unname(stack, dst, new_parent, new_name)
        name_node(src, new_parent, new_name)
        name_node(dst, old_parent, old_name)
        return
    device = src_needs_whiteout and whiteout.device_whiteouts(wh_fmt)
    # an OCI whiteout sits beside the name it hides: made before the rename,
    # so that a marker that cannot be written leaves everything as it was
    made = src_needs_whiteout and not device and whiteout.make_whiteout(old_dfd, old_name,
                                                                         wh_fmt)
    moved = None
    try:
        dst_ust = lstat_at(new_dfd, new_name)
        if dst_ust is not None and (stat.S_ISDIR(dst_ust.st_mode) or src_is_dir):
            # an upper target directory may hold whiteouts of its (empty) merged
            # view, and a directory cannot replace a whiteout: move it out of
            # the way, to be removed once the rename is done (or put back)
            tmp = workdir.temp_name()
            libc.renameat2(new_dfd, new_name, stack.work_fd, tmp, libc.RENAME_NOREPLACE)
            moved = tmp
        if device:
            whiteout.rename_leaving_whiteout(old_dfd, old_name, new_dfd, new_name,
                                             stack.work_fd, workdir.temp_name())
        else:
            libc.renameat2(old_dfd, old_name, new_dfd, new_name, 0)
    except BaseException:
        if moved is not None:
            libc.renameat2(stack.work_fd, moved, new_dfd, new_name, libc.RENAME_NOREPLACE)
        if made:
            whiteout.remove_oci_whiteout(old_dfd, old_name)
        raise
    if moved is not None:
        workdir.remove_tree(stack.work_fd, moved)
    if src_opaque:
        src.layers = layer_tuple((UPPER,))
    if stack.fmt == whiteout.FORMAT_OCI and not src_is_dir:
        whiteout.remove_oci_whiteout(new_dfd, new_name)
    if dst is not None:
        unname(stack, dst, new_parent, new_name)
    unname(stack, src, old_parent, old_name)
    name_node(src, new_parent, new_name)
    if redirecting:
        # unname dropped its fds; open them again at the redirected places
        child(stack, new_parent, new_name)
