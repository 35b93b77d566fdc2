"""Merged-tree snapshots and their comparison.

A snapshot maps every relpath under a mountpoint to what a user can observe:
type, mode, owner, size, nlink, content hash, symlink target, xattrs (minus
the filesystems' private ones), the mtime's class and st_ino. Comparison never
looks at raw st_ino values across two mounts, only at which names share one.
"""
import errno
import hashlib
import os
import stat

from .generator import NOW_THRESHOLD_NS

PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "trusted.unionfs.", "user.unionfs.",
                          "user.overlay.", "user.fuseoverlayfs.")


def ftype(mode):
    for test, name in ((stat.S_ISREG, "reg"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "lnk"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "?"


def mtime_class(mtime_ns):
    """Times set by the generator or an explicit utime compare exactly; clock times do not."""
    return mtime_ns if mtime_ns < NOW_THRESHOLD_NS else "now"


def public_xattrs(path):
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return f"listxattr:{e.errno}"
    out = {}
    for n in sorted(names):
        if n.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            out[n] = f"err:{e.errno}"
    return out


def content_hash(path):
    h = hashlib.blake2b(digest_size=12)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            buf = os.read(fd, 1 << 20)
            if not buf:
                break
            h.update(buf)
    finally:
        os.close(fd)
    return h.hexdigest()


def describe(path, st=None, with_content=True):
    """What a user sees of one entry, without inode numbers or clock times."""
    if st is None:
        st = os.lstat(path)
    kind = ftype(st.st_mode)
    d = {
        "type": kind,
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "nlink": st.st_nlink,
        "mtime": mtime_class(st.st_mtime_ns),
        "xattrs": public_xattrs(path),
    }
    if kind != "dir":
        d["size"] = st.st_size
    if kind == "lnk":
        d["target"] = os.readlink(path)
    elif kind == "reg" and with_content:
        try:
            d["hash"] = content_hash(path)
        except OSError as e:
            d["hash"] = f"err:{e.errno}"
    elif kind in ("chr", "blk"):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return d


def snapshot(mnt):
    """Walk a mounted union; return (entries, inos, problems).

    entries: relpath -> describe(); inos: relpath -> (st_dev, st_ino) (the kernel
    shows lower objects with their layer's st_dev when layers span filesystems);
    problems: d_ino != st_ino findings (readdir must agree with stat).
    """
    entries, inos, problems = {}, {}, []

    def walk(rel):
        full = os.path.join(mnt, rel) if rel else str(mnt)
        try:
            with os.scandir(full) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as e:  # a failing readdir is a finding, not a crash
            entries.setdefault(rel, {})["readdir"] = errno.errorcode.get(e.errno, e.errno)
            return
        for e in children:
            crel = f"{rel}/{e.name}" if rel else e.name
            try:
                st = os.lstat(e.path)
            except OSError as err:
                entries[crel] = {"lstat": errno.errorcode.get(err.errno, err.errno)}
                continue
            if e.inode() != st.st_ino:
                problems.append(f"{crel}: readdir d_ino {e.inode()} != st_ino {st.st_ino}")
            entries[crel] = describe(e.path, st)
            inos[crel] = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                walk(crel)

    root_st = os.lstat(mnt)
    entries[""] = describe(str(mnt), root_st)
    inos[""] = (root_st.st_dev, root_st.st_ino)
    walk("")
    return entries, inos, problems


def ino_groups(inos):
    """relpath -> sorted tuple of every relpath sharing its st_ino."""
    by_ino = {}
    for rel, ino in inos.items():
        by_ino.setdefault(ino, []).append(rel)
    return {rel: tuple(sorted(by_ino[ino])) for rel, ino in inos.items()}


def compare_entries(ref, other, label_ref="kernel", label_other="target", ignore=()):
    """Differences between two {relpath: describe()} maps, as readable lines."""
    out = []
    for rel in sorted(set(ref) | set(other)):
        if rel not in other:
            out.append(f"/{rel}: only in {label_ref}: {ref[rel]}")
            continue
        if rel not in ref:
            out.append(f"/{rel}: only in {label_other}: {other[rel]}")
            continue
        a, b = ref[rel], other[rel]
        if not (isinstance(a, dict) and isinstance(b, dict)):
            if a != b:
                out.append(f"/{rel}: {label_ref}={a!r} {label_other}={b!r}")
            continue
        for key in sorted(set(a) | set(b)):
            if key in ignore:
                continue
            if a.get(key) != b.get(key):
                out.append(f"/{rel}: {key}: {label_ref}={a.get(key)!r} "
                           f"{label_other}={b.get(key)!r}")
    return out


def _lower_hard_link(entry):
    """A kernel-side entry that may be a lower hard link: a regular file with nlink > 1."""
    return isinstance(entry, dict) and entry.get("type") == "reg" and entry.get("nlink", 1) > 1


def compare_ino_groups(ref_inos, other_inos, label_ref="kernel", label_other="target",
                       ref_entries=None, subset_only=False):
    """Which names share an inode must agree (hard links), for names both sides have.

    Documented difference (docs/format.md, "Lower hard links"): unionfs gives
    each name of a multiply-linked LOWER file its own st_ino, where the kernel
    shows one. So a target group may be a subset of the kernel's when every
    name the target leaves out is a regular file with nlink > 1 on the kernel side.

    `subset_only`: the kernel's groups are not trustworthy (layers on several
    filesystems without xino: its dirs' st_ino collide across layers); then
    the target may only never join names the kernel keeps apart.
    """
    common = set(ref_inos) & set(other_inos)
    ga, gb = ino_groups({r: i for r, i in ref_inos.items() if r in common}), \
        ino_groups({r: i for r, i in other_inos.items() if r in common})
    out = []
    for rel in sorted(common):
        if ga[rel] == gb[rel] or (subset_only and set(gb[rel]) <= set(ga[rel])):
            continue
        if ref_entries is not None and set(gb[rel]) <= set(ga[rel]) and all(
                _lower_hard_link(ref_entries.get(r)) for r in ga[rel]):
            continue
        out.append(f"/{rel}: names sharing st_ino: {label_ref}={list(ga[rel])} "
                   f"{label_other}={list(gb[rel])}")
    return out


def stability_map(before, after, eligible):
    """relpath (after) -> names (before, among `eligible`) that had its st_ino.

    Only st_ino counts here, not st_dev: a remount gives a FUSE mount a new
    st_dev (the split-fs variant, where st_dev matters, skips this check).
    """
    by_ino = {}
    for rel in eligible:
        if rel in before:
            by_ino.setdefault(before[rel][1], []).append(rel)
    return {rel: tuple(sorted(by_ino.get(ino, ()))) for rel, (_dev, ino) in after.items()}


def compare_stability(ref_before, ref_after, oth_before, oth_after, eligible,
                      label_ref="kernel", label_other="target", ref_start_entries=None):
    """st_ino kept across copy-up/rename must agree: same old names map to each new name.

    Documented difference (docs/format.md, "Lower hard links"): unionfs numbers
    each name of a multiply-linked lower file on its own and keeps that number
    across copy-up; the kernel (index=off) shows the shared lower st_ino until
    copy-up and the upper file's afterwards. Names that were such lower hard
    links at the start (kernel: regular, nlink > 1) are exempt on both sides.
    """
    ma = stability_map(ref_before, ref_after, eligible)
    mb = stability_map(oth_before, oth_after, eligible)
    start = ref_start_entries or {}
    out = []
    for rel in sorted(set(ma) & set(mb)):
        if ma[rel] == mb[rel]:
            continue
        if ref_start_entries is not None and all(
                _lower_hard_link(start.get(r)) for r in set(ma[rel]) ^ set(mb[rel])):
            continue
        if ma[rel] != mb[rel]:
            out.append(f"/{rel}: st_ino equals the st_ino at start of: {label_ref}={list(ma[rel])} "
                       f"{label_other}={list(mb[rel])} ({label_other} (dev, ino) at start "
                       f"{oth_before.get(rel)}, at end {oth_after.get(rel)}; {label_ref} "
                       f"{ref_before.get(rel)}, {ref_after.get(rel)})")
    return out


def upper_non_dirs(upper):
    """relpath -> type of every non-directory in an upper layer, markers left out."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if n.startswith(".wh."):
                continue
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue  # a kernel-form whiteout
            found[os.path.relpath(os.path.join(dirpath, n), upper)] = ftype(st.st_mode)
    return found


def compare_copied_up(ref_upper, other_upper, label_ref="kernel", label_other="target"):
    """A non-dir in the target's upper that the kernel never put in its own: a copy-up
    the kernel did not do (reading, or a failed op, must copy nothing up)."""
    ref, other = upper_non_dirs(ref_upper), upper_non_dirs(other_upper)
    return [f"/{rel}: {label_other} has it in upper ({other[rel]}), {label_ref} does not "
            f"(copied up without need?)" for rel in sorted(set(other) - set(ref))]


def hole_bytes(path):
    """Bytes of a file that are holes (SEEK_DATA/SEEK_HOLE); st_blocks would also
    count xattr blocks, so it cannot tell."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data, pos = 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            data += end - start
            pos = end
        return size - data
    finally:
        os.close(fd)


def compare_holes(ref_upper, other_upper, label_ref="kernel", label_other="target"):
    """Holes must survive copy-up and writes: a file in both uppers, of one size, may not
    have fewer hole bytes in the target's (the kernel's copy-up may fill small holes)."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(other_upper):
        for n in filenames:
            rel = os.path.relpath(os.path.join(dirpath, n), other_upper)
            a, b = os.path.join(ref_upper, rel), os.path.join(other_upper, rel)
            try:
                sa, sb = os.lstat(a), os.lstat(b)
            except OSError:
                continue
            if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or \
                    sa.st_size != sb.st_size:
                continue
            ha, hb = hole_bytes(a), hole_bytes(b)
            if hb < ha:
                out.append(f"/{rel}: hole bytes in upper: {label_ref}={ha} {label_other}={hb}")
    return out
