"""Workloads: what is timed on a mounted union (or on the native tree).

Each workload runs in a process of its own, forked from the bench process,
never in the FUSE server. It gets a Context (the merged root, the stack's
lists) and returns [(metric, value, unit), ...]. Copy-up workloads come first.

Mutating workloads list what they touch (`touched`) and create (`created`) so
that the native floor, which works on a real tree in place, can be restored
afterwards; on a union the upper is simply thrown away.
"""
import dataclasses
import os
import random
import subprocess
import sys
import threading
import time

from .stack import size_label

CHUNK = 1 << 20
clock = time.perf_counter


@dataclasses.dataclass
class Context:
    root: str          # the mountpoint, or the native tree
    meta: dict         # the stack's lists (see stack._list_meta)
    quick: bool

    def path(self, rel):
        return os.path.join(self.root, rel)

    @property
    def iterations(self):
        return 500 if self.quick else 20000


@dataclasses.dataclass
class Workload:
    name: str
    group: str
    run: object                      # fn(ctx) -> [(metric, value, unit)]
    heavy: bool = False              # 1 GiB class: fewer repetitions
    touched: object = lambda meta: []
    created: object = lambda meta: []
    cold_files: object = lambda meta: []   # page cache dropped before the mount
    warm_files: object = lambda meta: []   # read into the page cache before the mount
    kind: str = "timed"              # "timed", "mount" or "correctness"


def _timed(fn):
    start = clock()
    fn()
    return clock() - start


# ------------------------------------------------------------------ copy-up
#
# The copy-up workloads look their paths up before the clock starts: they time
# the copy-up, not the first lookup of the path on a fresh mount (which the
# lookup group measures: stat-all cold).

def _look_up(paths):
    for path in paths:
        os.lstat(path)


def _append_one_byte(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def append_workload(index):
    def run(ctx):
        path = ctx.path(ctx.meta["big_files"][index])
        _look_up([path])
        return [("time_s", _timed(lambda: _append_one_byte(path)), "s")]
    return run


def meta_copyup(op):
    def run(ctx):
        path = ctx.path(ctx.meta["big_files"][1])
        actions = {
            "chmod": lambda: os.chmod(path, 0o600),
            "chown": lambda: os.chown(path, 1000, 1000),
            "utimes": lambda: os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9)),
            "setxattr": lambda: os.setxattr(path, "user.bench", b"1"),
        }
        _look_up([path])
        return [("time_s", _timed(actions[op]), "s")]
    return run


def smallfile_copyup(threads):
    def run(ctx):
        paths = [ctx.path(rel) for rel in ctx.meta["small_files"]]
        _look_up(paths)
        if threads == 1:
            return [("time_s", _timed(lambda: [_append_one_byte(p) for p in paths]), "s")]
        parts = [paths[i::threads] for i in range(threads)]
        errors = []

        def worker(part):
            try:
                for p in part:
                    _append_one_byte(p)
            except OSError as e:
                errors.append(e)
        pool = [threading.Thread(target=worker, args=(part,)) for part in parts]
        start = clock()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        elapsed = clock() - start
        if errors:
            raise errors[0]
        return [("time_s", elapsed, "s")]
    return run


# ------------------------------------------------------------------ lookup

def stat_all(ctx):
    paths = [ctx.path(rel) for rel in ctx.meta["paths"]]

    def once():
        for p in paths:
            os.lstat(p)
    return [("cold_s", _timed(once), "s"), ("warm_s", _timed(once), "s")]


def readdir_big(ctx):
    top = ctx.path(ctx.meta["bigdir"])

    def listing():
        return os.listdir(top)

    def with_stat():
        for name in os.listdir(top):
            os.lstat(os.path.join(top, name))
    return [("cold_s", _timed(listing), "s"), ("warm_s", _timed(listing), "s"),
            ("stat_s", _timed(with_stat), "s")]


def walk_tree(ctx):
    def walk():
        count = 0
        for _dirpath, dirnames, filenames in os.walk(ctx.root):
            count += len(dirnames) + len(filenames)
        return count
    return [("time_s", _timed(walk), "s")]


# A search path probed for names that are not there, as exec's PATH search,
# the dynamic loader and imports do: every directory asked for every name,
# three times (a shell running three commands). What the kernel may cache
# of a miss decides the second and third rounds.
PROBE_DIRS = 40
PROBE_NAMES = 25
PROBE_ROUNDS = 3


def probe_missing(ctx):
    dirs = sorted({os.path.dirname(rel) for rel in ctx.meta["paths"]})[:PROBE_DIRS]
    paths = [os.path.join(ctx.path(d), f"absent-{n}.so") for d in dirs
             for n in range(PROBE_NAMES)]

    def one_round():
        for p in paths:
            try:
                os.lstat(p)
            except FileNotFoundError:
                continue
            raise RuntimeError(f"{p} exists: the probe expects it missing")
    first = _timed(one_round)
    again = _timed(lambda: [one_round() for _ in range(PROBE_ROUNDS - 1)])
    return [("first_s", first, "s"), ("again_s", again, "s")]


# ------------------------------------------------------------------ read / write

def _read_all(path):
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def seq_read(ctx):
    path = ctx.path(ctx.meta["big_files"][2])
    return [("cold_s", _timed(lambda: _read_all(path)), "s"),
            ("warm_s", _timed(lambda: _read_all(path)), "s")]


def random_read(ctx):
    path = ctx.path(ctx.meta["big_files"][2])
    size = os.stat(path).st_size
    rng = random.Random(7)
    count = 200 if ctx.quick else 2000
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        start = clock()
        for off in offsets:
            os.pread(fd, 4096, off)
        elapsed = clock() - start
    finally:
        os.close(fd)
    return [("us_per_op", elapsed / count * 1e6, "us")]


NEW_FILE = "bench-written.bin"


def seq_write(fsync):
    def run(ctx):
        size = os.stat(ctx.path(ctx.meta["big_files"][2])).st_size
        block = os.urandom(CHUNK)
        path = ctx.path(NEW_FILE)

        def write():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for _ in range(size // CHUNK):
                    os.write(fd, block)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        return [("time_s", _timed(write), "s")]
    return run


def _sh(argv, cwd=None):
    proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-300:]}")


def untar_rm(ctx):
    dest = ctx.path("untar")
    os.mkdir(dest)
    untar = _timed(lambda: _sh(["tar", "-xf", ctx.path("src/pkg.tar"), "-C", dest]))
    rm = _timed(lambda: _sh(["rm", "-rf", dest]))
    return [("untar_s", untar, "s"), ("rm_s", rm, "s")]


GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def git_status(ctx):
    argv = ["git", "-C", ctx.path("repo"), "status", "--porcelain"]
    env = dict(os.environ, **GIT_ENV)

    def status():
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"git status: {proc.stderr.decode(errors='replace').strip()}")
    return [("cold_s", _timed(status), "s"), ("warm_s", _timed(status), "s")]


def compileall(ctx):
    argv = [sys.executable, "-m", "compileall", "-q", "-j", "1", ctx.path("pysrc")]
    return [("time_s", _timed(lambda: _sh(argv)), "s")]


# ------------------------------------------------------------------ latency

def latency(ctx):
    n = ctx.iterations
    path = ctx.path(ctx.meta["big_files"][0])
    deep = ctx.path(ctx.meta["deep_path"])
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fstat(fd)
        os.pread(fd, 1, 0)
        os.lstat(deep)
        start = clock()
        for _ in range(n):
            os.fstat(fd)
        out.append(("fstat_us", (clock() - start) / n * 1e6, "us"))
        start = clock()
        for _ in range(n):
            os.lstat(deep)
        out.append(("lstat_deep_us", (clock() - start) / n * 1e6, "us"))
        start = clock()
        for _ in range(n):
            os.close(os.open(path, os.O_RDONLY))
        out.append(("open_close_us", (clock() - start) / n * 1e6, "us"))
        start = clock()
        for _ in range(n):
            os.pread(fd, 1, 0)
        out.append(("pread1_us", (clock() - start) / n * 1e6, "us"))
    finally:
        os.close(fd)
    return out


# ------------------------------------------------------------------ the list

def build_workloads(meta):
    labels = [size_label(s) for s in meta["params"]["big_sizes"]]
    mid = labels[1]
    wl = []
    for i, label in enumerate(labels):
        wl.append(Workload(f"append-{label}", "copyup", append_workload(i), heavy=(i == 2),
                           touched=lambda m, i=i: [m["big_files"][i]],
                           warm_files=lambda m, i=i: [m["big_files"][i]]))
    for op in ("chmod", "chown", "utimes", "setxattr"):
        wl.append(Workload(f"{op}-{mid}", "metadata-copyup", meta_copyup(op),
                           touched=lambda m: [m["big_files"][1]],
                           warm_files=lambda m: [m["big_files"][1]]))
    wl.append(Workload("smallfile-copyup", "copyup", smallfile_copyup(1),
                       touched=lambda m: m["small_files"], warm_files=lambda m: m["small_files"]))
    wl.append(Workload("smallfile-copyup-4threads", "copyup", smallfile_copyup(4),
                       touched=lambda m: m["small_files"], warm_files=lambda m: m["small_files"]))
    wl.append(Workload("stat-all", "lookup", stat_all))
    wl.append(Workload("readdir-bigdir", "lookup", readdir_big))
    wl.append(Workload("walk", "lookup", walk_tree))
    wl.append(Workload("probe-missing", "lookup", probe_missing))
    wl.append(Workload(f"seqread-{labels[2]}", "read", seq_read, heavy=True,
                       cold_files=lambda m: [m["big_files"][2]]))
    wl.append(Workload("randread-4k", "read", random_read,
                       cold_files=lambda m: [m["big_files"][2]]))
    wl.append(Workload(f"seqwrite-{labels[2]}", "write", seq_write(False), heavy=True,
                       created=lambda m: [NEW_FILE]))
    wl.append(Workload(f"seqwrite-{labels[2]}-fsync", "write", seq_write(True), heavy=True,
                       created=lambda m: [NEW_FILE]))
    wl.append(Workload("untar-rm", "tools", untar_rm, created=lambda m: ["untar"]))
    wl.append(Workload("git-status", "tools", git_status,
                       touched=lambda m: ["repo/.git/index"]))
    wl.append(Workload("compileall", "tools", compileall,
                       created=lambda m: ["pysrc/__pycache__"]))
    wl.append(Workload("latency", "latency", latency))
    wl.append(Workload("mount", "mount", None, kind="mount"))
    return wl


GROUPS = ["copyup", "metadata-copyup", "lookup", "read", "write", "tools", "latency", "mount"]
