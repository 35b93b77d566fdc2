"""The layer applier: one untrusted layer tar unpacked into an empty directory.

tarfile only parses; every entry is created here, relative to directory fds
opened one component at a time with O_NOFOLLOW from the layer root, so no
name, symlink or hard link in the tar can reach outside the root:

- names are normalised (`./x`, `/x` and `x` are the same entry); a `..`
  component, a NUL byte, or a path through a symlink or a non-directory of
  the layer is refused; a symlink, file or link named `.` (the root) is refused;
- symlinks are stored as they are (absolute targets such as `/etc/localtime`
  included) and never followed; hard links must name an earlier non-directory
  entry of the same layer and never follow a symlink;
- a later entry replaces an earlier one of the same name (two directories
  merge), as tar extraction does;
- owners, modes with setuid/setgid/sticky, times (nanoseconds from PAX),
  xattrs (PAX `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`), hard links, device
  nodes and FIFOs are kept; the union's own bookkeeping xattrs
  (`trusted.overlay.*`, `*.unionfs.*`, ...) are dropped, since in a layer they
  would forge whiteouts, opaque dirs or copy-up origins;
- OCI whiteouts are stored as the filesystem reads them: an empty file
  `.wh.NAME` and `.wh..wh..opq` (so where the opaque marker stands in the
  tar does not matter: it hides only lower layers); a bare `.wh.`, or a
  whiteout that is a directory, is refused; other `.wh..wh.*` (AUFS
  bookkeeping) entries are skipped, as docker does.

Without CAP_CHOWN owners are not kept, and without CAP_MKNOD device nodes are
skipped (counted in the result); see docs/images.md, "Rootless".
Directory modes and times are set after all entries, so a read-only
directory or a later child does not disturb them.
"""
import base64
import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import unquote_to_bytes

from ..fs import whiteout

_DIR_OPEN = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 20
_SKIPPABLE_XATTR_ERRNOS = (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL)


class LayerError(Exception):
    """The layer is refused: one line naming the entry and the reason."""


@dataclass
class ApplyResult:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    owners_dropped: int = 0
    devices_skipped: int = 0
    xattrs_skipped: int = 0
    skipped_names: list = field(default_factory=list)


@dataclass
class _DirMeta:
    mode: int
    mtime_ns: int | None        # None: a parent the tar left out (times not kept)
    atime_ns: int | None


def normalize(name: str) -> tuple:
    """The components of an entry name, as bytes; LayerError if it climbs."""
    raw = os.fsencode(name)
    if b"\0" in raw:
        raise LayerError(f"entry {name!r}: NUL byte in the name")
    parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise LayerError(f"entry {name!r}: '..' in the name (would leave the layer)")
    return parts


def _show(parts) -> str:
    return "/".join(os.fsdecode(p) for p in parts) or "."


def _times_ns(m: tarfile.TarInfo) -> tuple[int, int]:
    def ns(text):
        return int(Decimal(text).scaleb(9).to_integral_value())
    pax = m.pax_headers
    try:
        mtime = ns(pax["mtime"]) if "mtime" in pax else int(m.mtime) * 1_000_000_000
        atime = ns(pax["atime"]) if "atime" in pax else mtime
    except (ArithmeticError, ValueError):
        raise LayerError(f"entry {m.name!r}: malformed PAX time") from None
    return atime, mtime


def entry_xattrs(m: tarfile.TarInfo) -> dict:
    """xattrs carried by an entry's PAX header (bytes -> bytes), the union's
    bookkeeping ones left out."""
    out = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            try:
                data = base64.b64decode(value.encode("ascii", "surrogateescape") + b"==")
            except ValueError:
                raise LayerError(f"entry {m.name!r}: malformed xattr {key!r}") from None
        else:
            continue
        if not name or b"\0" in name:
            raise LayerError(f"entry {m.name!r}: malformed xattr name {name!r}")
        if not whiteout.is_private_xattr(name):
            out[name] = data
    return out


class _Applier:
    def __init__(self, root_fd: int, may_chown: bool, may_mknod: bool, recorder=None):
        self.root_fd = root_fd
        self.recorder = recorder        # a tarsplit.Recorder, or None
        self.may_chown = may_chown
        self.may_mknod = may_mknod
        self.dirs = {(): root_fd}       # components -> O_PATH fd (root not owned)
        self.dir_meta = {}              # components -> _DirMeta, applied at the end
        self.result = ApplyResult()

    # --- directories -------------------------------------------------------

    def dir_fd(self, parts: tuple, create: bool, entry: str) -> int:
        fd = self.dirs.get(parts)
        if fd is not None:
            return fd
        parent = self.dir_fd(parts[:-1], create, entry)
        name = parts[-1]
        if whiteout.is_marker_name(name):
            raise LayerError(f"entry {entry!r}: a whiteout marker {_show(parts)!r} "
                             f"used as a directory")
        try:
            fd = os.open(name, _DIR_OPEN, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise LayerError(f"entry {entry!r}: {_show(parts)!r} is not in the layer") \
                    from None
            # a parent the tar leaves out (umoci repack does): root-owned 0755
            os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_OPEN, dir_fd=parent)
            self.dir_meta[parts] = _DirMeta(0o755, None, None)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise LayerError(f"entry {entry!r}: {_show(parts)!r} is a symlink or not a "
                                 f"directory in the layer") from None
            raise
        self.dirs[parts] = fd
        return fd

    def forget_dirs_under(self, parts: tuple) -> None:
        n = len(parts)
        for key in [k for k in self.dirs if k[:n] == parts and k]:
            os.close(self.dirs.pop(key))
        for key in [k for k in self.dir_meta if k[:n] == parts]:
            del self.dir_meta[key]

    def close(self) -> None:
        for key, fd in self.dirs.items():
            if key:
                os.close(fd)
        self.dirs = {(): self.root_fd}

    # --- replacing an earlier entry -------------------------------------------

    def clear(self, parent: int, parts: tuple, keep_dir: bool) -> bool:
        """Make room for a new entry; True if a directory was kept to merge into."""
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if self.recorder is not None and not (keep_dir and stat.S_ISDIR(st.st_mode)):
            self.recorder.removing(parts, stat.S_ISDIR(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self.forget_dirs_under(parts)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return False

    # --- metadata ------------------------------------------------------------

    def owner(self, m, chown) -> None:
        if m.uid == 0 and m.gid == 0 and self.may_chown:
            return      # what we create is ours: 0:0 as root
        if not self.may_chown:
            if m.uid or m.gid:
                self.result.owners_dropped += 1
            return
        try:
            chown(m.uid, m.gid)
        except OSError as e:
            if e.errno != errno.EINVAL:     # an id not mapped in our user namespace
                raise
            self.result.owners_dropped += 1

    def xattrs(self, m, setter) -> None:
        for name, value in entry_xattrs(m).items():
            try:
                setter(name, value)
            except OSError as e:
                if e.errno not in _SKIPPABLE_XATTR_ERRNOS:
                    raise
                self.result.xattrs_skipped += 1

    def meta_at(self, parent: int, name: bytes, m, symlink: bool) -> None:
        path = whiteout.entry_path(parent, name)
        self.owner(m, lambda u, g: os.chown(name, u, g, dir_fd=parent, follow_symlinks=False))
        if not symlink:
            os.chmod(name, m.mode & 0o7777, dir_fd=parent)
        self.xattrs(m, lambda k, v: os.setxattr(path, k, v, follow_symlinks=False))
        os.utime(name, ns=_times_ns(m), dir_fd=parent, follow_symlinks=False)

    # --- entries -------------------------------------------------------------

    def apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = normalize(m.name)
        self.result.entries += 1
        if not parts:
            if not m.isdir():
                raise LayerError(f"entry {m.name!r}: only a directory may stand for "
                                 f"the layer root")
            self.root_meta(m)
            return
        name = parts[-1]
        if whiteout.is_marker_name(name):
            self.marker(parts, m)
            return
        parent = self.dir_fd(parts[:-1], True, m.name)
        if m.islnk():
            self.hardlink(parent, parts, m)
        elif m.isdir():
            self.directory(parent, parts, m)
        elif m.isreg():
            self.regular(tf, parent, parts, m)
        elif m.issym():
            self.clear(parent, parts, False)
            if not m.linkname:
                raise LayerError(f"entry {m.name!r}: symlink with an empty target")
            os.symlink(os.fsencode(m.linkname), name, dir_fd=parent)
            self.meta_at(parent, name, m, symlink=True)
        elif m.ischr() or m.isblk() or m.isfifo():
            self.special(parent, parts, m)
        else:
            raise LayerError(f"entry {m.name!r}: unsupported tar entry type {m.type!r}")

    def root_meta(self, m) -> None:
        self.owner(m, lambda u, g: os.chown(whiteout.fd_path(self.root_fd), u, g))
        self.xattrs(m, lambda k, v: os.setxattr(whiteout.fd_path(self.root_fd), k, v))
        atime, mtime = _times_ns(m)
        self.dir_meta[()] = _DirMeta(m.mode & 0o7777, mtime, atime)

    def marker(self, parts, m) -> None:
        name = parts[-1]
        if name == whiteout.OPAQUE_MARKER:
            self.result.opaque_dirs += 1
        elif name.startswith(whiteout.WH_PREFIX + whiteout.WH_PREFIX):
            self.result.skipped_names.append(m.name)     # AUFS bookkeeping
            return
        elif whiteout.whited_out_name(name) is None:
            raise LayerError(f"entry {m.name!r}: a whiteout that names nothing")
        else:
            self.result.whiteouts += 1
        if m.isdir():
            raise LayerError(f"entry {m.name!r}: a whiteout marker cannot be a directory")
        parent = self.dir_fd(parts[:-1], True, m.name)
        self.clear(parent, parts, False)
        os.close(os.open(name, _FILE_CREATE, 0o000, dir_fd=parent))

    def directory(self, parent, parts, m) -> None:
        name = parts[-1]
        if not self.clear(parent, parts, True):
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = self.dir_fd(parts, False, m.name)
        path = whiteout.fd_path(fd)
        self.owner(m, lambda u, g: os.chown(path, u, g))
        self.xattrs(m, lambda k, v: os.setxattr(path, k, v))
        atime, mtime = _times_ns(m)
        self.dir_meta[parts] = _DirMeta(m.mode & 0o7777, mtime, atime)

    def regular(self, tf, parent, parts, m) -> None:
        name = parts[-1]
        try:
            fd = os.open(name, _FILE_CREATE, 0o600, dir_fd=parent)
        except FileExistsError:
            self.clear(parent, parts, False)
            fd = os.open(name, _FILE_CREATE, 0o600, dir_fd=parent)
        try:
            if m.size:
                if self.recorder is not None:
                    if m.sparse is not None:
                        self.recorder.invalidate("sparse member")
                    else:
                        self.recorder.file_data(m.offset_data, m.size, parts)
                src = tf.extractfile(m)
                remaining = m.size
                while remaining:
                    chunk = src.read(min(remaining, _COPY_CHUNK))
                    if not chunk:
                        raise LayerError(f"entry {m.name!r}: truncated file data")
                    remaining -= len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            self.owner(m, lambda u, g: os.fchown(fd, u, g))
            os.fchmod(fd, m.mode & 0o7777)
            self.xattrs(m, lambda k, v: os.setxattr(fd, k, v))
            os.utime(fd, ns=_times_ns(m))
        finally:
            os.close(fd)
        self.result.files += 1
        self.result.bytes += m.size

    def hardlink(self, parent, parts, m) -> None:
        target = normalize(m.linkname)
        if not target:
            raise LayerError(f"entry {m.name!r}: hard link to the layer root")
        if target == parts:
            raise LayerError(f"entry {m.name!r}: hard link to itself")
        target_parent = self.dir_fd(target[:-1], False, m.name)
        try:
            st = os.stat(target[-1], dir_fd=target_parent, follow_symlinks=False)
        except FileNotFoundError:
            raise LayerError(f"entry {m.name!r}: hard link target {m.linkname!r} is not "
                             f"an earlier entry of the layer") from None
        if stat.S_ISDIR(st.st_mode):
            raise LayerError(f"entry {m.name!r}: hard link to a directory")
        self.clear(parent, parts, False)
        os.link(target[-1], parts[-1], src_dir_fd=target_parent, dst_dir_fd=parent,
                follow_symlinks=False)

    def special(self, parent, parts, m) -> None:
        name = parts[-1]
        self.clear(parent, parts, False)
        if m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            if not self.may_mknod:
                self.result.devices_skipped += 1
                self.result.skipped_names.append(m.name)
                return
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=parent)
        self.meta_at(parent, name, m, symlink=False)

    def finish(self) -> None:
        # deepest first, so that nothing set here is disturbed by a later step
        for parts in sorted(self.dir_meta, key=len, reverse=True):
            meta = self.dir_meta[parts]
            fd = self.dir_fd(parts, False, _show(parts))
            path = whiteout.fd_path(fd)
            os.chmod(path, meta.mode)
            if meta.mtime_ns is not None:
                os.utime(path, ns=(meta.atime_ns, meta.mtime_ns))


class _ForwardReader:
    """A stream that tarfile may treat as seekable: seeks go forward only
    (by reading), so the stream is still read exactly once, in order. In
    this mode tarfile reads headers and data straight from the stream,
    without the re-copied buffer of its stream mode ('r|')."""

    def __init__(self, raw):
        self.raw = raw
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self.pos + offset if whence == 1 else None
        if target is None or target < self.pos:
            raise OSError(errno.ESPIPE, "a layer stream cannot seek backwards")
        while self.pos < target:
            if not self.read(min(target - self.pos, _COPY_CHUNK)):
                break
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def apply_tar(fileobj, root_fd: int, *, may_chown: bool, may_mknod: bool,
              recorder=None) -> ApplyResult:
    """Unpack the (uncompressed) tar stream `fileobj` into the directory
    `root_fd` (expected empty). Reads the stream once, front to back, up to
    the tar's end-of-archive marker. LayerError for refused input; the caller
    removes the half-made directory. `recorder` (a tarsplit.Recorder that
    `fileobj` reads through) is told where regular files' contents are."""
    applier = _Applier(root_fd, may_chown, may_mknod, recorder)
    try:
        tf = tarfile.open(fileobj=_ForwardReader(fileobj), mode="r:",
                          encoding="utf-8", errors="surrogateescape")
        for m in tf:
            try:
                applier.apply(tf, m)
            except LayerError:
                raise
            except OSError as e:
                raise LayerError(f"entry {m.name!r}: {e.strerror}") from None
            except ValueError as e:     # e.g. an embedded NUL in a link target
                raise LayerError(f"entry {m.name!r}: {e}") from None
        applier.finish()
    except tarfile.TarError as e:
        raise LayerError(f"not a valid tar stream: {e}") from None
    except EOFError:
        raise LayerError("not a valid tar stream: unexpected end of data") from None
    finally:
        applier.close()
    return applier.result
