"""Building layer tars entry by entry, for tests (hostile ones included)."""
import io
import tarfile


def entry(name, kind="file", data=b"", *, mode=None, uid=0, gid=0, link="", mtime=1_000_000_000,
          xattrs=None, pax=None, dev=(0, 0)):
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
               "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
               "fifo": tarfile.FIFOTYPE}[kind]
    ti.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    ti.linkname = link
    ti.devmajor, ti.devminor = dev
    headers = dict(pax or {})
    for k, v in (xattrs or {}).items():
        headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape") \
            if isinstance(v, bytes) else v
    ti.pax_headers = headers
    if kind == "file":
        ti.size = len(data)
    return ti, (data if kind == "file" else None)


def make_tar(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()
