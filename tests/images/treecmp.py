"""Comparing root filesystems: names, types, modes, owners, sizes, content,
xattrs, link targets, device numbers and hard-link sets."""
import hashlib
import os
import stat

PRIVATE = ("trusted.overlay.", "user.overlay.", "trusted.unionfs.", "user.unionfs.")


def _xattrs(path):
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if n.startswith(PRIVATE) or n.startswith("security.selinux"):
            continue
        out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


def describe(root, inode_of=None):
    """{relpath: facts} for every entry under root (root itself as '.'), and
    the hard-link sets: a set of frozensets of relpaths sharing an inode.
    inode_of(relpath, lstat) gives an entry's identity (default: its st_ino)."""
    facts, by_inode = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [None] + sorted(dirnames + filenames):
            path = dirpath if name is None else os.path.join(dirpath, name)
            if name is None and dirpath != str(root):
                continue
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            f = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                 "gid": st.st_gid, "xattrs": _xattrs(path)}
            if stat.S_ISREG(st.st_mode):
                f["size"] = st.st_size
                with open(path, "rb") as fh:
                    f["sha"] = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                f["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                f["rdev"] = st.st_rdev
            facts[rel] = f
            if not stat.S_ISDIR(st.st_mode):
                key = inode_of(rel, st) if inode_of else (st.st_dev, st.st_ino)
                by_inode.setdefault(key, set()).add(rel)
    links = {frozenset(s) for s in by_inode.values() if len(s) > 1}
    return facts, links


def provider(layer_dirs):
    """inode_of for a merged view: the identity of a path in the topmost
    layer holding it (unionfs gives lower hard links distinct st_ino)."""
    def inode_of(rel, _st):
        for d in layer_dirs:
            try:
                st = os.lstat(os.path.join(d, rel))
            except OSError:
                continue
            return (st.st_dev, st.st_ino)
        raise AssertionError(f"{rel}: in the merged view but in no layer")
    return inode_of


def diff(a, b):
    """Readable differences between two describe() results (empty if equal)."""
    (fa, la), (fb, lb) = a, b
    out = []
    for rel in sorted(set(fa) | set(fb)):
        if rel not in fa:
            out.append(f"only in second: {rel}")
        elif rel not in fb:
            out.append(f"only in first: {rel}")
        elif fa[rel] != fb[rel]:
            keys = [k for k in set(fa[rel]) | set(fb[rel]) if fa[rel].get(k) != fb[rel].get(k)]
            out.append(f"{rel}: " + ", ".join(f"{k} {fa[rel].get(k)!r} != {fb[rel].get(k)!r}"
                                              for k in sorted(keys)))
    if la != lb:
        out.append(f"hard links differ: {sorted(map(sorted, la ^ lb))}")
    return out
