"""The filesystem's façade: every operation of the merged view, by inode number.

`Union` is what the FUSE adapter (and tests, and tools) use, and all they
use: inode numbers and bytes names in; nodes, attributes and handles out;
OSError(errno) on failure. Synchronous: nothing here knows about pyfuse3 or
trio. The work is done by one module per concern over a shared `Stack`:
fs.lookup (names to nodes, stat), fs.create (new names), fs.namespace
(unlink, rmdir, rename), fs.attrs (setattr, xattrs), fs.files (handles),
fs.copyplan (what an operation needs copied up first).

Attributes come back as `Attrs(st, nlink, ino)`: the lstat of the object
the union shows, the link count it reports, and the inode number to report.

Copy-ups: used as it is, an operation copies up what it needs inline. The
adapter calls `defer_copies()` once: operations then raise fs.copyplan.
Deferred instead, naming the nodes to copy (`copy_chain`, `copy_job`,
`commit_copy`) or the copies in flight (`in_flight`) to wait for; the adapter
does that off the event loop and calls the operation again.
"""
import os
from collections import namedtuple

from . import attrs, copyplan, create, files, lookup, namespace, provenance
from .copyplan import Deferred
from .stack import ROOT_CALLER, Caller, Stack

Attrs = namedtuple("Attrs", "st nlink ino")

__all__ = ["Attrs", "Caller", "Deferred", "Union"]


class Union:
    def __init__(self, lowers, upper=None, work=None, *, whiteout_format=None,
                 durable=True, metacopy=False, profile=None, id_options=None,
                 redirect_dir="off"):
        """id_options: fuse-overlayfs's ownership options (fs.idmap.IdOptions);
        redirect_dir: fs.redirect's mode (on, follow, nofollow, off)."""
        self.stack = Stack(lowers, upper, work, whiteout_format=whiteout_format,
                           durable=durable, metacopy=metacopy, profile=profile,
                           id_options=id_options, redirect_dir=redirect_dir)

    # ---- the mount ------------------------------------------------------------

    @property
    def profile(self):
        return self.stack.profile

    @property
    def id_options(self):
        return self.stack.id_options

    @property
    def writable(self) -> bool:
        return self.stack.writable

    def close(self) -> None:
        self.stack.close()

    def stats(self) -> dict:
        """Sizes of the server's tables: all bounded (by the kernel's references,
        the open files and the fd cache), whatever the size of the tree."""
        s = self.stack
        memory = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    memory[key.lower() + "_kib"] = int(value.split()[0])
        return {"pid": os.getpid(), "nodes": len(s.nodes), "handles": len(s.handles),
                "dirfds": len(s.dirs), "listed_names": s.dirs.listed_names,
                "caches": s.dirs.hit_rates(), "memory": memory}

    def statfs(self):
        return attrs.statfs(self.stack)

    def name_layers(self, lowers, upper=None) -> None:
        """The layers' paths as the mount's client named them, for messages
        (a server given descriptors sees only /proc/self/fd/N)."""
        layers = self.stack.layers
        for layer, path in zip(layers[1:], lowers, strict=True):
            layer.path = path
        if upper is not None and layers[0] is not None:
            layers[0].path = upper

    def which(self, path: str) -> dict:
        """Where `path` (from the union's root) comes from (fs.provenance)."""
        return provenance.which(self.stack, path)

    def which_node(self, ino, child: bytes = b"") -> dict:
        """Provenance of node ino (or of its entry `child`)."""
        path = self.stack.node(ino).path()
        if child:
            path = path + b"/" + child if path else child
        return provenance.which(self.stack, path.decode(errors="surrogateescape"))

    # ---- the adapter's side of copy-ups ---------------------------------------

    def defer_copies(self) -> None:
        self.stack.inline_copies = False

    @property
    def in_flight(self) -> set:
        """Nodes whose copy-up the adapter runs now (it adds and removes them)."""
        return self.stack.in_flight

    def copy_chain(self, node, meta_only=False) -> list:
        return copyplan.chain(self.stack, node, meta_only)

    def copy_job(self, node, meta_only=False):
        return copyplan.make_job(self.stack, node, meta_only)

    def commit_copy(self, node, job) -> None:
        copyplan.commit(self.stack, node, job)

    def changed_attrs(self) -> list:
        """Inode numbers whose kernel-cached attributes are stale (taken once)."""
        changed = self.stack.attr_changed
        if changed:
            self.stack.attr_changed = []
        return changed

    def temp_pool_refill(self):
        """A function to run in a worker thread to refill the workdir's ready
        inodes, or None when they need none."""
        pool = self.stack.temp_pool
        return pool.refill if pool is not None and pool.wanted() else None

    # ---- lookup and attributes -------------------------------------------------

    def _attrs(self, node, found=None) -> Attrs:
        st, nlink = lookup.union_stat(self.stack, node, found)
        return Attrs(st, nlink, node.st_ino)

    def _entry(self, node):
        node.lookups += 1
        return node, self._attrs(node)

    def lookup(self, parent_ino, name):
        """Resolve name in a directory; counts one lookup. Returns (node, Attrs)."""
        node, (st, nlink) = lookup.lookup(self.stack, parent_ino, name)
        return node, Attrs(st, nlink, node.st_ino)

    def forget(self, ino, count) -> None:
        lookup.forget(self.stack, ino, count)

    def getattr(self, ino):
        node = self.stack.node(ino)
        return node, self._attrs(node)

    def setattr(self, ino, **changes):
        node = attrs.setattr(self.stack, ino, **changes)
        return node, self._attrs(node)

    def readlink(self, ino) -> bytes:
        return attrs.readlink(self.stack, ino)

    # ---- names -----------------------------------------------------------------

    def mkdir(self, parent_ino, name, mode, caller=ROOT_CALLER):
        return self._entry(create.mkdir(self.stack, parent_ino, name, mode, caller))

    def mknod(self, parent_ino, name, mode, rdev, caller=ROOT_CALLER):
        return self._entry(create.mknod(self.stack, parent_ino, name, mode, rdev, caller))

    def symlink(self, parent_ino, name, target, caller=ROOT_CALLER):
        return self._entry(create.symlink(self.stack, parent_ino, name, target, caller))

    def link(self, ino, new_parent_ino, new_name):
        return self._entry(create.link(self.stack, ino, new_parent_ino, new_name))

    def create(self, parent_ino, name, mode, flags, caller=ROOT_CALLER):
        """O_CREAT of a name the kernel found absent: returns (fh, node, Attrs)."""
        fh, node = create.create(self.stack, parent_ino, name, mode, flags, caller)
        return (fh,) + self._entry(node)

    def unlink(self, parent_ino, name) -> None:
        namespace.unlink(self.stack, parent_ino, name)

    def rmdir(self, parent_ino, name) -> None:
        namespace.rmdir(self.stack, parent_ino, name)

    def rename(self, old_parent_ino, old_name, new_parent_ino, new_name, flags=0) -> None:
        namespace.rename(self.stack, old_parent_ino, old_name, new_parent_ino, new_name, flags)

    # ---- files -----------------------------------------------------------------

    def open(self, ino, flags, caller=ROOT_CALLER) -> int:
        return files.open_node(self.stack, self.stack.node(ino), flags, caller)

    def read(self, fh, off, size) -> bytes:
        return files.read(self.stack, fh, off, size)

    def write(self, fh, off, buf) -> int:
        return files.write(self.stack, fh, off, buf)

    def fsync(self, fh, datasync) -> None:
        files.fsync(self.stack, fh, datasync)

    def release(self, fh) -> None:
        files.release(self.stack, fh)

    # ---- directories -------------------------------------------------------------

    def opendir(self, ino) -> int:
        return files.opendir(self.stack, ino)

    def readdir(self, fh, start: int):
        """Yield (next_offset, name, node, Attrs). The caller says which entries
        reached the kernel (`entry_sent`): only those count as a lookup. An
        entry without a node (None) is to be listed by name, type and inode
        number only (fs.files.readdir says when)."""
        stack = self.stack
        for next_id, name, node, found in files.readdir(stack, fh, start):
            if node is None:
                directory = stack.handles[fh].node
                _, st_ino = lookup.identify(stack, directory, name, found)
                yield next_id, name, None, Attrs(found.st, found.st.st_nlink, st_ino)
            else:
                yield next_id, name, node, self._attrs(node, found)

    def entry_sent(self, node) -> None:
        node.lookups += 1

    def entry_unsent(self, node) -> None:
        lookup.forget(self.stack, node.ino, 0)      # keep no node the kernel never saw

    def releasedir(self, fh) -> None:
        files.releasedir(self.stack, fh)

    # ---- xattrs --------------------------------------------------------------------

    def getxattr(self, ino, name: bytes) -> bytes:
        return attrs.getxattr(self.stack, ino, name)

    def listxattr(self, ino) -> list:
        return attrs.listxattr(self.stack, ino)

    def setxattr(self, ino, name: bytes, value: bytes, flags: int = 0) -> None:
        attrs.setxattr(self.stack, ino, name, value, flags)

    def removexattr(self, ino, name: bytes) -> None:
        attrs.removexattr(self.stack, ino, name)
