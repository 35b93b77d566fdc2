"""The scale configuration: a tree of many files and one very large directory.

Its own stack (cached like the main one, under CACHE_ROOT/scale-<hash>/):
the bottom layer holds `tree/` (DIRS directories of FILES_PER_DIR empty
files: 300,000 in the full size) and `big/` (BIG_ENTRIES files in one
directory: 100,000); the three layers above it are empty, so every target
mounts the same four layers as in the main configuration. The workloads are
read-only, so the native floor reads the bottom layer itself. What they
measure: `find` over everything, a cold lstat walk, a scandir and a warm
`ls -f` of the big directory, and (recorded after every workload by the
suite) the server's peak memory, the number the issue that added them cares
about as much as the times.
"""
import dataclasses
import hashlib
import json
import os
import subprocess
import time

from . import stack as stackmod
from .workloads import Workload

clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class ScaleParams:
    name: str
    dirs: int
    files_per_dir: int
    big_entries: int

    def digest(self):
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


FULL = ScaleParams("scale", dirs=3000, files_per_dir=100, big_entries=100_000)
QUICK = ScaleParams("scale-quick", dirs=30, files_per_dir=100, big_entries=2000)


class ScaleStack:
    """What the suite needs of a stack, for the scale tree."""

    def __init__(self, root, params):
        self.root = root
        self.meta = {"params": dataclasses.asdict(params), "content_sample": []}
        self.reference = self.native = os.path.join(root, "layers", stackmod.LAYER_NAMES[-1])

    def layers(self, fmt="kernel"):
        if fmt == "native":
            return [self.native]
        # no markers anywhere: unionfs-fuse's format is the same tree
        return [os.path.join(self.root, "layers", name) for name in stackmod.LAYER_NAMES]

    @property
    def scratch(self):
        return os.path.join(self.root, "scratch")

    def physical_copies(self, rel):
        return [os.path.join(self.native, rel)]


def _touch_many(directory, names):
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def build(params, log=print, cache_root=stackmod.CACHE_ROOT):
    root = os.path.join(cache_root, f"{params.name}-{params.digest()}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return ScaleStack(root, params)
    if os.path.exists(root):
        stackmod.shutil.rmtree(root)
    log(f"scale: generating {params.dirs * params.files_per_dir + params.big_entries} files "
        f"in {root} (cached for later runs)")
    for name in stackmod.LAYER_NAMES:
        os.makedirs(os.path.join(root, "layers", name))
    bottom = os.path.join(root, "layers", stackmod.LAYER_NAMES[-1])
    for d in range(params.dirs):
        _touch_many(os.path.join(bottom, "tree", f"d{d:05d}"),
                    (f"f{i:04d}" for i in range(params.files_per_dir)))
    _touch_many(os.path.join(bottom, "big"), (f"entry{i:06d}" for i in range(params.big_entries)))
    os.makedirs(os.path.join(root, "scratch"))
    os.sync()
    open(done, "w").close()
    return ScaleStack(root, params)


# ------------------------------------------------------------------ workloads

def _expect(ctx, what, count, want):
    if count != want:
        raise RuntimeError(f"{what}: {count} entries seen, {want} expected")


def _tree_entries(ctx):
    p = ctx.meta["params"]
    return 1 + p["dirs"] + p["dirs"] * p["files_per_dir"]


def find_all(ctx):
    start = clock()
    out = subprocess.run(["find", ctx.path("tree")], stdout=subprocess.PIPE, check=True).stdout
    elapsed = clock() - start
    _expect(ctx, "find", out.count(b"\n"), _tree_entries(ctx))
    return [("time_s", elapsed, "s")]


def lstat_walk(ctx):
    start = clock()
    count = 1
    for top, dirs, files in os.walk(ctx.path("tree")):
        for name in dirs + files:
            os.lstat(os.path.join(top, name))
            count += 1
    elapsed = clock() - start
    _expect(ctx, "walk", count, _tree_entries(ctx))
    return [("time_s", elapsed, "s")]


def scandir_big(ctx):
    start = clock()
    with os.scandir(ctx.path("big")) as it:
        count = sum(1 for entry in it if not entry.is_dir(follow_symlinks=False))
    elapsed = clock() - start
    _expect(ctx, "scandir", count, ctx.meta["params"]["big_entries"])
    return [("time_s", elapsed, "s")]


def ls_f_warm(ctx):
    def ls():
        subprocess.run(["ls", "-f", ctx.path("big")], stdout=subprocess.DEVNULL, check=True)
    ls()
    start = clock()
    ls()
    return [("time_s", clock() - start, "s")]


def build_workloads():
    return [
        Workload("find-tree", "scale", find_all),
        Workload("lstat-walk-tree", "scale", lstat_walk),
        Workload("scandir-bigdir", "scale", scandir_big),
        Workload("ls-f-bigdir-warm", "scale", ls_f_warm),
    ]
