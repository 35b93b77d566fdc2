"""The untimed correctness check: a merged tree against the flattened reference.

Compares every entry's type, permission bits, owner, size (non-directories),
mtime (non-directories), symlink target, and the content of a seeded sample of
files. Returns a list of human-readable mismatches (empty = pass).
"""
import os
import stat

# Entries a target shows by design and that are not part of the merged tree.
KNOWN_EXTRA = {
    # unionfs-fuse keeps its whiteouts in a visible meta directory
    "unionfs-fuse": {".unionfs-fuse"},
}


def _describe(root, rel):
    st = os.lstat(os.path.join(root, rel))
    kind = stat.S_IFMT(st.st_mode)
    desc = {"type": kind, "perm": stat.S_IMODE(st.st_mode), "owner": (st.st_uid, st.st_gid)}
    if not stat.S_ISDIR(st.st_mode):
        desc["size"] = st.st_size
        desc["mtime"] = int(st.st_mtime)
    if stat.S_ISLNK(st.st_mode):
        desc["target"] = os.readlink(os.path.join(root, rel))
    return desc


def _tree(root, ignore=()):
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in ignore]
            filenames = [f for f in filenames if f not in ignore]
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            found[rel] = _describe(root, rel)
    return found


def _same_content(a, b, chunk=1 << 20):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            da, db = fa.read(chunk), fb.read(chunk)
            if da != db:
                return False
            if not da:
                return True


def compare(merged_root, reference_root, content_sample, target_name=""):
    problems = []
    got = _tree(merged_root, KNOWN_EXTRA.get(target_name, ()))
    want = _tree(reference_root)
    for rel in sorted(set(want) - set(got)):
        problems.append(f"missing: {rel}")
    for rel in sorted(set(got) - set(want)):
        problems.append(f"extra: {rel}")
    for rel in sorted(set(got) & set(want)):
        if got[rel] != want[rel]:
            diff = {k: (got[rel].get(k), want[rel].get(k)) for k in want[rel]
                    if got[rel].get(k) != want[rel].get(k)}
            problems.append(f"differs: {rel}: {diff}")
    for rel in content_sample:
        if rel in got and rel in want and got[rel]["type"] == stat.S_IFREG:
            if not _same_content(os.path.join(merged_root, rel), os.path.join(reference_root, rel)):
                problems.append(f"content differs: {rel}")
    return problems
