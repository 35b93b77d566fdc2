"""The benchmark's layer stack: a deterministic, seeded generator and its cache.

Owns the on-disk stack every target is measured on:
  layers/l1..l4      four lower layers in the kernel's format (l1 = top):
                     char 0/0 whiteouts, `trusted.overlay.opaque=y` directories
  layers-uf/l1..l4   the same layers converted to unionfs-fuse's own format
                     (`.unionfs-fuse/PATH_HIDDEN~` markers); files are hard links
  reference/         the flattened merged tree (hard links into layers/): the
                     correctness reference
  native/            a real copy of the flattened tree: the "native" floor, which
                     mutating workloads may touch (and restore)
  meta.json          lists the workloads need (paths, small files, samples, ...)

A stack is built once per parameter set under /var/tmp/unionfs-bench/<hash>/ and
reused by later runs; `.complete` marks a finished build.
"""
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile

CACHE_ROOT = os.environ.get("UNIONFS_BENCH_CACHE", "/var/tmp/unionfs-bench")
GENERATOR_VERSION = 4
LAYER_NAMES = ("l1", "l2", "l3", "l4")  # top first
UF_META = ".unionfs-fuse"
UF_SUFFIX = "_HIDDEN~"
MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class StackParams:
    """Sizes of one stack; `quick` and `full` are the two presets."""

    name: str
    seed: int
    real_files: int          # files taken from the Python standard library
    merged_files: int        # target count of merged regular files (synthetic fill)
    whiteouts: int
    bigdir_entries: int
    big_sizes: tuple         # three file sizes in the bottom layer
    git_files: int
    tar_files: int
    compile_files: int
    opaque_lower_files: int
    deep_depth: int
    symlinks: int

    def digest(self):
        blob = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


FULL = StackParams(
    name="full", seed=20261129, real_files=7000, merged_files=32000, whiteouts=1200,
    bigdir_entries=10500, big_sizes=(MiB, 64 * MiB, GiB), git_files=400, tar_files=1500,
    compile_files=150, opaque_lower_files=60, deep_depth=16, symlinks=100,
)
QUICK = StackParams(
    name="quick", seed=20261129, real_files=300, merged_files=1800, whiteouts=100,
    bigdir_entries=600, big_sizes=(MiB, 4 * MiB, 16 * MiB), git_files=40, tar_files=100,
    compile_files=12, opaque_lower_files=10, deep_depth=16, symlinks=20,
)


def size_label(size):
    if size >= GiB:
        return f"{size // GiB}G"
    if size >= MiB:
        return f"{size // MiB}M"
    return f"{size // 1024}K"


class Stack:
    """A built stack rooted at `root` (on ext4 or inside the XFS image)."""

    def __init__(self, root, meta, reference_root=None):
        self.root = root
        self.meta = meta
        self.reference = reference_root or os.path.join(root, "reference")

    def layers(self, fmt="kernel"):
        if fmt == "native":
            return [self.native]
        base = "layers" if fmt == "kernel" else "layers-uf"
        return [os.path.join(self.root, base, name) for name in LAYER_NAMES]

    @property
    def native(self):
        return os.path.join(self.root, "native")

    @property
    def scratch(self):
        return os.path.join(self.root, "scratch")

    def physical_copies(self, rel):
        """Every on-disk file backing merged path `rel` (for cache dropping)."""
        out = [os.path.join(self.native, rel)]
        layer = self.meta["owner"].get(rel)
        if layer is not None:
            out.append(os.path.join(self.root, "layers", layer, rel))
        return out


# ---------------------------------------------------------------- generation

def _write(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def _copy(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)


def _whiteout(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def _is_opaque(path):
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _stdlib_files():
    top = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests"))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                found.append(os.path.relpath(full, top))
    return top, found


def _big_file(path, size, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    block = rng.randbytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        remaining = size
        while remaining:
            n = os.write(fd, block[: min(remaining, MiB)])
            remaining -= n
    finally:
        os.close(fd)


def _generate_layers(params, root, log):
    rng = random.Random(params.seed)
    layer_dir = {name: os.path.join(root, "layers", name) for name in LAYER_NAMES}
    for d in layer_dir.values():
        os.makedirs(d)
    # owner[rel] = top layer that holds a regular file at rel (the merged winner)
    owner = {}
    pool = rng.randbytes(256 * 1024)

    def put(layer, rel, data, mode=0o644):
        _write(os.path.join(layer_dir[layer], rel), data, mode)
        if rel not in owner or LAYER_NAMES.index(layer) < LAYER_NAMES.index(owner[rel]):
            owner[rel] = layer

    def pick_layer():
        return rng.choices(LAYER_NAMES, weights=(10, 15, 25, 50))[0]

    # 1. a real tree: the standard library, spread over the layers
    top, std = _stdlib_files()
    rng_sample = sorted(rng.sample(std, min(params.real_files, len(std))))
    log(f"stack: {len(rng_sample)} files from {top}")
    for rel in rng_sample:
        with open(os.path.join(top, rel), "rb") as f:
            data = f.read()
        layer = pick_layer()
        put(layer, "std/" + rel, data)
        below = LAYER_NAMES[LAYER_NAMES.index(layer) + 1:]
        if below and rng.random() < 0.05:  # an older version underneath
            _write(os.path.join(layer_dir[rng.choice(below)], "std/" + rel), data[: len(data) // 2])

    # 2. the 10,000-entry directory, merged from three layers
    for i in range(params.bigdir_entries):
        layers = rng.sample(LAYER_NAMES[1:], 2 if rng.random() < 0.1 else 1)
        for layer in layers:
            put(layer, f"bigdir/e{i:06d}", pool[i % 1000: i % 1000 + 64 + i % 200])

    # 3. big files in the bottom layer
    for size in params.big_sizes:
        _big_file(os.path.join(layer_dir["l4"], f"data/file-{size_label(size)}.bin"), size, rng)
        owner[f"data/file-{size_label(size)}.bin"] = "l4"

    # 4. an opaque directory: l2's opq/ hides l3's and l4's
    for i in range(params.opaque_lower_files):
        _write(os.path.join(layer_dir["l4"], f"opq/old{i:04d}"), b"old\n")
        _write(os.path.join(layer_dir["l3"], f"opq/mid{i:04d}"), b"mid\n")
    for i in range(5):
        put("l2", f"opq/new{i}", b"new\n")
    os.setxattr(os.path.join(layer_dir["l2"], "opq"), "trusted.overlay.opaque", b"y")
    os.makedirs(os.path.join(layer_dir["l1"], "opq"), exist_ok=True)  # merges over the opaque one

    # 5. a deep path present in every layer, the leaf at the bottom
    deep = "/".join(f"d{i:02d}" for i in range(params.deep_depth))
    for layer in LAYER_NAMES:
        os.makedirs(os.path.join(layer_dir[layer], "deep", deep))
    put("l4", f"deep/{deep}/leaf.txt", b"leaf\n")

    # 6. a source tarball and a tree to compile, from the standard library
    py_files = [r for r in std if r.endswith(".py")]
    tar_members = sorted(rng.sample(py_files, min(params.tar_files, len(py_files))))
    tar_path = os.path.join(layer_dir["l4"], "src/pkg.tar")
    os.makedirs(os.path.dirname(tar_path))
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for rel in tar_members:
            info = tar.gettarinfo(os.path.join(top, rel), arcname="pkg/" + rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 1_700_000_000, 0, 0, "", ""
            with open(os.path.join(top, rel), "rb") as f:
                tar.addfile(info, f)
    owner["src/pkg.tar"] = "l4"
    compilable = []
    for rel in rng.sample(py_files, len(py_files)):
        if len(compilable) >= params.compile_files:
            break
        with open(os.path.join(top, rel), "rb") as f:
            source = f.read()
        try:
            compile(source, rel, "exec")
        except (SyntaxError, ValueError):
            continue
        compilable.append((rel, source))
    for rel, source in compilable:
        put(rng.choice(("l2", "l3", "l4")), "pysrc/" + rel.replace("/", "_"), source)

    # 7. synthetic files up to the target count
    synthetic = max(0, params.merged_files - len(owner))
    for i in range(synthetic):
        size = rng.choice((0, 100, 512, 1024, 2048, 4096, 8192, 16384))
        off = rng.randrange(0, len(pool) - size)
        put(pick_layer(), f"syn/d{i // 200:03d}/f{i:06d}.txt", pool[off: off + size],
            0o755 if i % 50 == 0 else 0o644)

    # 8. symlinks (relative, inside the tree)
    targets = sorted(r for r in owner if r.startswith("syn/"))
    for i in range(params.symlinks):
        dst = os.path.join(layer_dir["l2"], f"links/s{i:04d}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink("../" + rng.choice(targets), dst)

    # 9. a git repository in the bottom layer, edited in the top one
    repo = os.path.join(layer_dir["l4"], "repo")
    for rel in sorted(rng.sample(py_files, min(params.git_files, len(py_files)))):
        _copy(os.path.join(top, rel), os.path.join(repo, "src", rel))
    git_env = dict(os.environ, GIT_AUTHOR_DATE="2023-11-14T00:00:00Z",
                   GIT_COMMITTER_DATE="2023-11-14T00:00:00Z", GIT_CONFIG_NOSYSTEM="1",
                   HOME=root)

    def git(*args):
        subprocess.run(["git", "-C", repo, *args], check=True, env=git_env,
                       stdout=subprocess.DEVNULL)
    git("init", "-q", "-b", "main")
    git("config", "user.name", "bench")
    git("config", "user.email", "bench@localhost")
    # The layers are re-linked after the commit (ctime changes), so compare
    # stat data the way git does on a checkout that was copied: mtime and size.
    git("config", "core.checkStat", "minimal")
    git("config", "core.trustctime", "false")
    # Files older than the index are not "racily clean": git status then only
    # stats them and has no reason to rewrite the index.
    for dirpath, _dirnames, filenames in os.walk(repo):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (1_700_000_000, 1_700_000_000))
    git("add", "-A")
    git("commit", "-q", "-m", "bench: initial import")
    repo_files = []
    for dirpath, _dirnames, filenames in os.walk(repo):
        for name in filenames:
            repo_files.append(os.path.relpath(os.path.join(dirpath, name), layer_dir["l4"]))
    for rel in repo_files:
        owner.setdefault(rel, "l4")
    tracked = sorted(r for r in repo_files if r.startswith("repo/src/"))
    for rel in rng.sample(tracked, min(10, len(tracked))):
        put("l1", rel, b"# edited in the top layer\n")
    for i in range(3):
        put("l1", f"repo/untracked{i}.txt", b"untracked\n")

    # 10. whiteouts: hide files of lower layers from a layer above their winner
    candidates = sorted(r for r, layer in owner.items()
                        if layer != "l1" and (r.startswith("syn/") or r.startswith("std/")))
    for rel in rng.sample(candidates, params.whiteouts):
        layer = rng.choice(LAYER_NAMES[: LAYER_NAMES.index(owner[rel])])
        _whiteout(os.path.join(layer_dir[layer], rel))
        del owner[rel]
    # a whiteout over a whole lower directory
    for i in range(20):
        _write(os.path.join(layer_dir["l3" if i % 2 else "l4"], f"gone/f{i:03d}"), b"gone\n")
    _whiteout(os.path.join(layer_dir["l2"], "gone"))

    for d in layer_dir.values():
        for dirpath, _dirnames, _filenames in os.walk(d):
            os.chmod(dirpath, 0o755)
    return owner


def merge_layers(layers, dst):
    """Flatten kernel-format `layers` (top first) into `dst` with hard links.

    Follows the kernel's rules: a whiteout hides the name below, a non-directory
    hides everything below, an opaque directory stops the merge.
    """
    def merge(rel, sources):
        # name -> None (whited out) or [layer, lstat, directory sources, closed]
        entries = {}
        for src in sources:
            path = os.path.join(src, rel)
            for name in os.listdir(path):
                full = os.path.join(path, name)
                st = os.lstat(full)
                is_dir = stat.S_ISDIR(st.st_mode)
                entry = entries.get(name, "absent")
                if entry == "absent":
                    if _is_whiteout(st):
                        entries[name] = None
                    else:
                        entries[name] = [src, st, [src] if is_dir else [],
                                         not is_dir or _is_opaque(full)]
                elif entry is not None and not entry[3]:
                    if is_dir:
                        entry[2].append(src)
                    # a non-directory or a whiteout under a directory ends its merge
                    entry[3] = not is_dir or _is_opaque(full)
        for name, entry in sorted(entries.items()):
            if entry is None:
                continue
            src, st, dir_sources = entry[0], entry[1], entry[2]
            child = os.path.join(rel, name) if rel else name
            out = os.path.join(dst, child)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(out)
                merge(child, dir_sources)
                os.chmod(out, stat.S_IMODE(st.st_mode))
            else:
                os.link(os.path.join(src, child), out, follow_symlinks=False)

    os.makedirs(dst)
    merge("", list(layers))


def convert_for_unionfs_fuse(layers, dst_root):
    """Lay out a copy of kernel-format `layers` in unionfs-fuse's whiteout format.

    Regular files and symlinks are hard links to the originals. A whiteout
    becomes `.unionfs-fuse/PATH_HIDDEN~` in the same layer; an opaque directory
    becomes a hidden marker for itself plus the directory (unionfs-fuse then
    shows only that layer's entries, which is the opaque semantics).
    """
    out_layers = []
    for src in layers:
        dst = os.path.join(dst_root, os.path.basename(src))
        out_layers.append(dst)
        os.makedirs(dst)
        for dirpath, dirnames, filenames in os.walk(src):
            rel_dir = os.path.relpath(dirpath, src)
            rel_dir = "" if rel_dir == "." else rel_dir
            for name in list(dirnames):
                rel = os.path.join(rel_dir, name)
                full = os.path.join(src, rel)
                if os.path.islink(full):
                    dirnames.remove(name)
                    filenames.append(name)
                    continue
                os.makedirs(os.path.join(dst, rel), exist_ok=True)
                if _is_opaque(full):
                    marker = os.path.join(dst, UF_META, rel + UF_SUFFIX)
                    os.makedirs(os.path.dirname(marker), exist_ok=True)
                    open(marker, "wb").close()
            for name in filenames:
                rel = os.path.join(rel_dir, name)
                full = os.path.join(src, rel)
                st = os.lstat(full)
                if _is_whiteout(st):
                    marker = os.path.join(dst, UF_META, rel + UF_SUFFIX)
                    os.makedirs(os.path.dirname(marker), exist_ok=True)
                    open(marker, "wb").close()
                else:
                    os.makedirs(os.path.join(dst, rel_dir), exist_ok=True)
                    os.link(full, os.path.join(dst, rel), follow_symlinks=False)
    return out_layers


def _copy_tree(src, dst):
    """A real copy (data, modes, owners, times) of the flattened tree."""
    def copy_fn(s, d):
        shutil.copy2(s, d)
        st = os.lstat(s)
        os.chown(d, st.st_uid, st.st_gid)
    shutil.copytree(src, dst, symlinks=True, copy_function=copy_fn)


def _list_meta(params, reference, owner):
    paths, files, small = [], [], []
    for dirpath, dirnames, filenames in os.walk(reference):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, reference)
        for name in sorted(dirnames) + sorted(filenames):
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            paths.append(rel)
            st = os.lstat(os.path.join(reference, rel))
            if stat.S_ISREG(st.st_mode):
                files.append(rel)
                if st.st_size < 64 * 1024 and (rel.startswith("syn/") or rel.startswith("std/")):
                    small.append(rel)
    rng = random.Random(params.seed + 1)
    deep = "deep/" + "/".join(f"d{i:02d}" for i in range(params.deep_depth)) + "/leaf.txt"
    sizes = [f"data/file-{size_label(s)}.bin" for s in params.big_sizes]
    return {
        "params": dataclasses.asdict(params),
        "paths": paths,
        "regular_files": len(files),
        "small_files": sorted(rng.sample(small, min(1000 if params.name == "full" else 100,
                                                    len(small)))),
        "content_sample": sorted(rng.sample(files, min(600, len(files)))),
        "big_files": sizes,
        "deep_path": deep,
        "bigdir": "bigdir",
        "bigdir_entries": len(os.listdir(os.path.join(reference, "bigdir"))),
        "owner": {r: owner[r] for r in files if r in owner},
        "whiteouts": params.whiteouts,
    }


def _prune_stale(cache_root, params, keep, log):
    """Remove stacks of the same preset built with other parameters or generator versions."""
    if not os.path.isdir(cache_root):
        return
    for name in os.listdir(cache_root):
        path = os.path.join(cache_root, name)
        if path == keep or not name.startswith(params.name + "-"):
            continue
        xfs_mnt = os.path.join(path, "xfs-mnt")
        if os.path.ismount(xfs_mnt):
            continue  # in use by a running bench
        log(f"stack: removing the stale stack {path}")
        shutil.rmtree(path, ignore_errors=True)


def _lock(cache_root, params, log):
    """Held until the process exits: one bench per preset at a time, since runs
    share the stack's scratch area and mutate (and restore) its native tree."""
    os.makedirs(cache_root, exist_ok=True)
    lock = open(os.path.join(cache_root, f"{params.name}.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"stack: waiting for another bench run on the {params.name} stack")
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


_held_locks = []


def build(params, log=print, cache_root=CACHE_ROOT):
    """Return the cached Stack for `params`, generating it first if needed."""
    _held_locks.append(_lock(cache_root, params, log))
    root = os.path.join(cache_root, f"{params.name}-{params.digest()}")
    done = os.path.join(root, ".complete")
    _prune_stale(cache_root, params, root, log)
    if os.path.exists(done):
        with open(os.path.join(root, "meta.json")) as f:
            return Stack(root, json.load(f))
    if os.path.exists(root):
        log(f"stack: removing an unfinished build at {root}")
        shutil.rmtree(root)
    os.makedirs(root)
    log(f"stack: generating the {params.name} stack in {root} (cached for later runs)")
    owner = _generate_layers(params, root, log)
    layers = [os.path.join(root, "layers", n) for n in LAYER_NAMES]
    log("stack: flattening the reference tree")
    merge_layers(layers, os.path.join(root, "reference"))
    log("stack: converting the layers for unionfs-fuse")
    convert_for_unionfs_fuse(layers, os.path.join(root, "layers-uf"))
    log("stack: copying the native tree")
    _copy_tree(os.path.join(root, "reference"), os.path.join(root, "native"))
    meta = _list_meta(params, os.path.join(root, "reference"), owner)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    os.makedirs(os.path.join(root, "scratch"), exist_ok=True)
    os.sync()
    open(done, "w").close()
    log(f"stack: {meta['regular_files']} merged regular files, {len(meta['paths'])} entries")
    return Stack(root, meta)


if __name__ == "__main__":  # pragma: no cover - manual use
    print(build(QUICK if "--quick" in sys.argv else FULL).root)
