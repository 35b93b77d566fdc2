"""`unionfs commit`: a container's upper dir as a new image layer.

The upper is walked fd-relative (never following a symlink), names sorted
bytewise, each directory before its children, and written as a PAX tar:
- whiteouts in every form the filesystem writes or reads (char 0/0; a
  zero-size file with `trusted.`/`user.overlay.whiteout`; a `.wh.NAME` file)
  become `.wh.NAME`;
- opaque directories (`trusted.`/`user.overlay.opaque=y`, or a
  `.wh..wh..opq` file) get a `.wh..wh..opq` entry right after the directory;
- hard links within the upper stay links (later names point at the first);
- xattrs go into `SCHILY.xattr.*` PAX records, the union's bookkeeping
  ones (`*.overlay.*`, `*.unionfs.*`) left out; times keep nanoseconds;
- a metacopy file (metadata copied up, data still below) gets its data
  from the first lower layer holding the same path.
Sockets cannot be stored in a tar and are left out.

The tar is compressed (gzip by default through isal, zstd, or none) while
both hashes are computed, stored as a blob, unpacked into the store like any
layer, and appended to the image: config (diff_ids, history, created) and
an OCI manifest are written anew.
"""
import copy
import os
import shutil
import stat
import tarfile
from datetime import datetime, timezone

from ..fs import whiteout
from ..sys import libc
from . import containers as containers_mod
from . import digest as dg
from . import formats
from .compression import compressing_writer
from .store import Store, StoreError

METACOPY_XATTRS = (b"trusted.overlay.metacopy", b"user.overlay.metacopy")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _listxattrs(path: bytes) -> dict:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        raw = name.encode("utf-8", "surrogateescape")
        if whiteout.is_private_xattr(raw):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def _has_any_xattr(path: bytes, names) -> bool:
    for n in names:
        try:
            os.getxattr(path, n, follow_symlinks=False)
            return True
        except OSError:
            continue
    return False


class _UpperTar:
    def __init__(self, tf: tarfile.TarFile, lowers: list):
        self.tf = tf
        self.lowers = lowers            # lower dirs, top first (for metacopy data)
        self.links = {}                 # (dev, ino) -> first arcname
        self.entries = 0

    def info(self, arcname: str, st) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(arcname)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = st.st_mtime_ns // 1_000_000_000
        frac = st.st_mtime_ns % 1_000_000_000
        if frac:
            ti.pax_headers["mtime"] = f"{ti.mtime}.{frac:09d}"
        return ti

    def marker(self, arcname: str, st) -> None:
        ti = self.info(arcname, st)
        ti.type = tarfile.REGTYPE
        ti.size = 0
        ti.mode = 0o644 if not stat.S_ISREG(st.st_mode) else ti.mode
        ti.pax_headers.pop("mtime", None)
        self.add(ti)

    def add(self, ti, fileobj=None) -> None:
        self.tf.addfile(ti, fileobj)
        self.entries += 1

    def walk(self, dir_fd: int, prefix: str, opaque_written: bool = False) -> None:
        names = sorted(os.listdir(dir_fd), key=os.fsencode)
        done = {prefix + os.fsdecode(whiteout.OPAQUE_MARKER)} if opaque_written else set()
        for name in names:
            bname = os.fsencode(name)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            arc = prefix + name
            path = whiteout.entry_path(dir_fd, bname)
            if whiteout.is_marker_name(bname):
                if arc not in done:
                    done.add(arc)
                    self.marker(arc, st)
                continue
            if whiteout.is_whiteout(dir_fd, bname, st):
                wh = prefix + ".wh." + name
                if wh not in done:
                    done.add(wh)
                    self.marker(wh, st)
                continue
            ti = self.info(arc, st)
            for k, v in _listxattrs(path).items():
                ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                ti.type = tarfile.DIRTYPE
                self.add(ti)
                child = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
                try:
                    # the marker right after its directory, whatever its form
                    opaque = whiteout.is_opaque(dir_fd, bname)
                    if opaque:
                        self.marker(arc + "/" + os.fsdecode(whiteout.OPAQUE_MARKER), st)
                    self.walk(child, arc + "/", opaque)
                finally:
                    os.close(child)
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = self.links.get(key)
                if first is not None:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = first
                    ti.pax_headers = {}
                    self.add(ti)
                    continue
                self.links[key] = arc
            if stat.S_ISREG(mode):
                ti.size = st.st_size
                self.regular(dir_fd, name, arc, ti, path)
            elif stat.S_ISLNK(mode):
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(name, dir_fd=dir_fd)
                self.add(ti)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                self.add(ti)
            elif stat.S_ISFIFO(mode):
                ti.type = tarfile.FIFOTYPE
                self.add(ti)
            # sockets: a tar cannot hold them

    def regular(self, dir_fd, name, arc, ti, path) -> None:
        if _has_any_xattr(path, METACOPY_XATTRS):
            fd = self.lower_data(arc)
        else:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            self.add(ti, f)

    def lower_data(self, arc: str) -> int:
        for lower in self.lowers:
            root = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = libc.openat2(root, arc.encode("utf-8", "surrogateescape"),
                                  os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            finally:
                os.close(root)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        raise StoreError(f"metacopy file {arc}: no lower layer holds its data")


def write_layer_tar(upper: str, out, lowers=()) -> int:
    """Write the upper dir as a layer tar to the writer `out`; the entry count."""
    root = os.open(upper, _OPEN_DIR)
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                          encoding="utf-8", errors="surrogateescape") as tf:
            walker = _UpperTar(tf, list(lowers))
            walker.walk(root, "")
    finally:
        os.close(root)
    return walker.entries


def commit(store: Store, container: str, names=(), compression: str = "gzip",
           message: str | None = None, author: str | None = None) -> str:
    """A new image: the container's image plus its upper as the top layer.
    Returns the new manifest digest; `names` are pointed at it."""
    c = containers_mod.get(store, container)
    try:
        base = store.resolve(c.manifest_digest)
    except StoreError:
        raise StoreError(f"the image of container {c.name} is no longer in the store") \
            from None
    with store.writing():
        work = store.tmpdir("commit-")
        blob_path = os.path.join(work, "blob")
        try:
            with open(blob_path, "wb") as raw:
                blob = dg.HashingWriter(raw)
                comp = compressing_writer(blob, compression)
                tar = dg.HashingWriter(comp)
                write_layer_tar(c.upper, tar, c.lowerdirs(store))
                comp.close()
                raw.flush()
                os.fsync(raw.fileno())
            store.adopt_blob(blob_path, blob.digest, verified=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        store.apply_layer_from_blob(blob.digest, diff_id=tar.digest)
        config = copy.deepcopy(base.config.raw)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        config["created"] = now
        config["rootfs"]["diff_ids"] = list(config["rootfs"]["diff_ids"]) + [tar.digest]
        entry = {"created": now, "created_by": "unionfs commit"}
        if message:
            entry["comment"] = message
        if author:
            entry["author"] = author
            config["author"] = author
        config["history"] = list(config.get("history") or []) + [entry]
        config_bytes = formats.canonical_json(config)
        config_digest = store.add_blob_bytes(config_bytes)
        layers = [formats.Descriptor(formats.to_oci_layer_type(d.media_type), d.digest, d.size)
                  for d in base.manifest.layers]
        layers.append(formats.Descriptor(formats.OCI_LAYER_BY_COMPRESSION[compression],
                                         blob.digest, blob.size))
        manifest = formats.make_manifest(
            formats.Descriptor(formats.OCI_CONFIG, config_digest, len(config_bytes)), layers)
        return store.add_image(manifest, names)
