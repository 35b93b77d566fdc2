"""Making names: mkdir, mknod, symlink, create (O_CREAT) and link.

A new object goes straight into its upper parent, or, when its name holds a
whiteout (replaced atomically) or it is a directory that must be opaque
(lower layers hold the name), it is built in the workdir and renamed into
place. Owners and modes follow the caller, with setgid directories passing
on their group (and, to subdirectories, their setgid bit), as the kernel does.
"""
import errno
import os
import stat

from ..sys import libc
from . import acl, files, whiteout, workdir
from .copyplan import require
from .idmap import backing_mode
from .inodes import Node
from .layers import lstat_at
from .lookup import is_lower_positive, layers_below, name_node, probe, raw_stat, stored_meta
from .lookup import node_for as node_of
from .stack import NAME_MAX, OPEN_PASS, ROOT_CALLER, UPPER, Caller, Stack, err


def check_name(name: bytes) -> None:
    if whiteout.is_marker_name(name):
        # the on-disk markers' namespace is reserved (OCI format)
        raise err(errno.EINVAL, name)
    if len(name) > NAME_MAX:
        raise err(errno.ENAMETOOLONG, name)


def ensure_absent(stack: Stack, parent: Node, name: bytes) -> None:
    if probe(stack, parent, name) is not None:
        raise err(errno.EEXIST, name)


def owner_for(stack: Stack, parent: Node, caller: Caller, mode: int):
    """Owner (as stored) and mode of a new object, with setgid directory
    inheritance: a setgid parent's stored gid is kept as it is."""
    owners = stack.owners
    if owners is None:
        pst = raw_stat(stack, parent)
        parent_gid, parent_mode = pst.st_gid, pst.st_mode
        uid, gid = caller.uid, caller.gid
    else:
        _, parent_gid, parent_mode, _ = stored_meta(stack, parent)
        uid, gid = owners.stored_ids(caller.uid, caller.gid)
    if parent_mode & stat.S_ISGID:
        gid = parent_gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    elif (mode & stat.S_ISGID and stat.S_ISREG(mode) and caller.uid != 0
          and gid != caller.gid):
        mode &= ~stat.S_ISGID
    return uid, gid, mode


def new_entry(stack: Stack, parent: Node, name: bytes, kind: int, perm: int, caller: Caller,
              *, target: bytes = b"", rdev: int = 0, open_flags: int | None = None):
    """Create a new object in upper where the union has none.

    Returns (node, fd-or-None); fd only for a regular file with open_flags.
    """
    stack.require_upper()
    check_name(name)
    require(stack, needs=((parent, False),))
    udfd = stack.upper_dirfd(parent)
    ust = lstat_at(udfd, name)
    over_whiteout = ust is not None
    if ust is not None and not whiteout.is_whiteout(udfd, name, ust):
        raise err(errno.EEXIST, name)
    uid, gid, mode = owner_for(stack, parent, caller, kind | perm)
    opaque = kind == stat.S_IFDIR and (over_whiteout or is_lower_positive(stack, parent, name))
    via_work = over_whiteout or opaque
    where, wname = (stack.work_fd, workdir.temp_name()) if via_work else (udfd, name)
    fd = None
    try:
        if stack.owners is None:
            fd = _make(where, wname, kind, mode, uid, gid, target, rdev, open_flags)
        else:
            fd = _make_owned(stack.owners, where, wname, kind, mode, uid, gid, target, rdev,
                             open_flags)
        if kind != stat.S_IFLNK and not stack.id_options.noacl and not (
                stack.owners is not None and stack.owners.uses_override(kind)):
            # the parent's default ACL: built in the workdir, the object is out
            # of its reach; made in place, it got it for its first mode only
            acl.inherit(whiteout.fd_path(udfd), whiteout.entry_path(where, wname), mode)
        if opaque:
            ofd = libc.openat2(where, wname, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                whiteout.make_opaque(ofd, stack.fmt)
            finally:
                os.close(ofd)
        if via_work:
            if over_whiteout:
                libc.renameat2(where, wname, udfd, name, libc.RENAME_EXCHANGE)
                os.unlink(wname, dir_fd=where)      # the old whiteout
            else:
                libc.renameat2(where, wname, udfd, name, libc.RENAME_NOREPLACE)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if via_work:
            workdir.remove_tree(where, wname)
        raise
    if stack.fmt == whiteout.FORMAT_OCI and kind != stat.S_IFDIR:
        whiteout.remove_oci_whiteout(udfd, name)
    st = os.stat(name, dir_fd=udfd, follow_symlinks=False)
    found_layers = (UPPER,)
    if kind == stat.S_IFDIR and not opaque:
        found_layers = (UPPER,) + layers_below(stack, parent, name)
    node = stack.nodes.new(stack.nodes.key(st.st_dev, st.st_ino),
                           stack.nodes.st_ino_of(st.st_dev, st.st_ino), parent, name, kind,
                           UPPER, found_layers)
    stack.dirs.drop(node)
    return node, fd


def _make(dirfd, name, kind, mode, uid, gid, target, rdev, open_flags):
    perm = stat.S_IMODE(mode)
    fd = None
    if kind == stat.S_IFREG:
        flags = os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= (open_flags & OPEN_PASS & ~os.O_TRUNC) if open_flags is not None \
            else os.O_WRONLY
        fd = os.open(name, flags, 0o600, dir_fd=dirfd)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, perm)
        if open_flags is None:
            os.close(fd)
            fd = None
        return fd
    if kind == stat.S_IFDIR:
        os.mkdir(name, 0o700, dir_fd=dirfd)
    elif kind == stat.S_IFLNK:
        os.symlink(target, name, dir_fd=dirfd)
    else:
        os.mknod(name, kind | 0o600, rdev, dir_fd=dirfd)
    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    if kind != stat.S_IFLNK:
        os.chmod(name, perm, dir_fd=dirfd)
    return fd


def _make_owned(owners, dirfd, name, kind, mode, uid, gid, target, rdev, open_flags):
    """_make under id options (fs.owners): chown errors ignored when owners
    are squashed; in an upper with an override, a directory or regular file
    is not chowned but gets the override xattr (written while its real
    mode is still 0600/0700: a crash never leaves it open to all) and then
    its backing mode (idmap.backing_mode)."""
    perm = stat.S_IMODE(mode)
    override = owners.uses_override(kind)
    fd = None
    if kind == stat.S_IFREG:
        flags = os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        flags |= (open_flags & OPEN_PASS & ~os.O_TRUNC) if open_flags is not None \
            else os.O_WRONLY
        fd = os.open(name, flags, 0o600, dir_fd=dirfd)
        try:
            if override:
                owners.write_override(fd, uid, gid, perm)
                os.fchmod(fd, stat.S_IMODE(backing_mode(kind | perm)))
            else:
                owners.chown(os.fchown, fd, uid, gid)
                os.fchmod(fd, perm)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=dirfd)
            raise
        if open_flags is None:
            os.close(fd)
            fd = None
        return fd
    if kind == stat.S_IFDIR:
        os.mkdir(name, 0o700, dir_fd=dirfd)
    elif kind == stat.S_IFLNK:
        os.symlink(target, name, dir_fd=dirfd)
    else:
        os.mknod(name, kind | 0o600, rdev, dir_fd=dirfd)
    try:
        if override:
            owners.write_override(whiteout.entry_path(dirfd, name), uid, gid, perm)
            os.chmod(name, stat.S_IMODE(backing_mode(kind | perm)), dir_fd=dirfd)
            return fd
        owners.chown(os.chown, name, uid, gid, dir_fd=dirfd, follow_symlinks=False,
                     special=kind != stat.S_IFDIR)
        if kind != stat.S_IFLNK:
            os.chmod(name, perm, dir_fd=dirfd)
    except BaseException:
        workdir.remove_tree(dirfd, name)
        raise
    return fd


def mkdir(stack: Stack, parent_ino, name, mode, caller=ROOT_CALLER) -> Node:
    parent = stack.node(parent_ino)
    ensure_absent(stack, parent, name)
    node, _ = new_entry(stack, parent, name, stat.S_IFDIR,
                        stat.S_IMODE(mode) & ~caller.umask, caller)
    return node


def mknod(stack: Stack, parent_ino, name, mode, rdev, caller=ROOT_CALLER) -> Node:
    parent = stack.node(parent_ino)
    ensure_absent(stack, parent, name)
    kind = stat.S_IFMT(mode) or stat.S_IFREG
    node, _ = new_entry(stack, parent, name, kind, stat.S_IMODE(mode) & ~caller.umask,
                        caller, rdev=rdev)
    return node


def symlink(stack: Stack, parent_ino, name, target, caller=ROOT_CALLER) -> Node:
    parent = stack.node(parent_ino)
    ensure_absent(stack, parent, name)
    node, _ = new_entry(stack, parent, name, stat.S_IFLNK, 0o777, caller, target=target)
    return node


def create(stack: Stack, parent_ino, name, mode, flags, caller=ROOT_CALLER):
    """O_CREAT of a name the kernel found absent: returns (fh, node)."""
    parent = stack.node(parent_ino)
    found = probe(stack, parent, name)
    if found is not None:
        if flags & os.O_EXCL:
            raise err(errno.EEXIST, name)
        node = node_of(stack, parent, name, found)
        return files.open_node(stack, node, flags & ~os.O_CREAT, caller), node
    node, fd = new_entry(stack, parent, name, stat.S_IFREG,
                         stat.S_IMODE(mode) & ~caller.umask, caller, open_flags=flags)
    return files.add_handle(stack, files.Handle(node, fd, flags)), node


def link(stack: Stack, ino, new_parent_ino, new_name) -> Node:
    node = stack.node(ino)
    parent = stack.node(new_parent_ino)
    if node.kind == stat.S_IFDIR:
        raise err(errno.EPERM)
    check_name(new_name)
    ensure_absent(stack, parent, new_name)
    require(stack, needs=((node, False), (parent, False)), touches=(node,))
    udfd = stack.upper_dirfd(parent)
    src_dir = stack.upper_dirfd(node.parent)
    ust = lstat_at(udfd, new_name)
    if ust is not None:       # a whiteout: replace it atomically
        tmp = workdir.temp_name()
        os.link(node.name, tmp, src_dir_fd=src_dir, dst_dir_fd=stack.work_fd,
                follow_symlinks=False)
        libc.renameat2(stack.work_fd, tmp, udfd, new_name, libc.RENAME_EXCHANGE)
        os.unlink(tmp, dir_fd=stack.work_fd)
    else:
        os.link(node.name, new_name, src_dir_fd=src_dir, dst_dir_fd=udfd,
                follow_symlinks=False)
        if stack.fmt == whiteout.FORMAT_OCI:
            whiteout.remove_oci_whiteout(udfd, new_name)
    name_node(node, parent, new_name)
    return node

