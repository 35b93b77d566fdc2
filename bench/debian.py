"""The debian configuration: real programs in a chroot on a Debian minbase rootfs.

Its own stack, cached under CACHE_ROOT/debian-<hash>/ like the others:
  rootfs/    `debootstrap --variant=minbase bookworm` (its downloaded .debs
             removed, as `apt-get clean` would): the only lower layer, and the
             correctness reference (it has no whiteouts, so unionfs-fuse mounts
             it as it is)
  native/    a `cp -a` copy of it: the native floor and the pyfuse3 floor's
             tree, put back after every mutating workload (`rsync --delete`
             of the trees the workload names, from rootfs/)
  debs/      the leaf packages `dpkg-i` installs, fetched with apt-get from
             the rootfs's own sources.list when the rootfs was built, so that
             their dependencies are the versions in the rootfs
A build happens in CACHE_ROOT/.debian-<hash>.tmp-<pid>/ and is renamed into
place when it is complete: a killed build leaves only a temporary directory,
which the next build removes (after unmounting anything debootstrap left
mounted in it). UNIONFS_BENCH_DEBIAN_MIRROR changes the archive
(default http://deb.debian.org/debian).

Every workload is one command in `chroot ROOT`, timed from the workload
process (so the time includes starting chroot, the loader and the libraries
from the union). Output goes to the bench's /dev/null. Two need /dev and get the host's:
`perl-posix` (perl opens /dev/null as the script of `-e`; the rootfs's own
device nodes cannot be opened on a FUSE mount without `dev`, fuse-overlayfs's
case) and `dpkg-i` (its maintainer scripts), which also gets the packages
read-only on /mnt. Those are bind mounts in a mount namespace of the
workload process's own: they vanish with that process, even a killed one.
Nothing needs /proc.
"""
import dataclasses
import datetime
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import time

from unionfs.sys import libc, mountinfo

from . import stack as stackmod
from .workloads import Workload

clock = time.perf_counter
BUILDER_VERSION = 1
MIRROR = os.environ.get("UNIONFS_BENCH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C",
              "DEBIAN_FRONTEND": "noninteractive"}
# Leaf packages minbase lacks, whose dependencies minbase has (libncursesw6,
# libproc2-0 and libmagic* are the dependencies of nano, procps and file).
PACKAGES = ("less", "file", "libmagic1", "libmagic-mgc", "bzip2", "xz-utils", "patch", "ed",
            "tree", "nano", "libncursesw6", "procps", "libproc2-0", "psmisc", "cpio", "zstd",
            "unzip", "zip", "bsdextrautils", "time", "netbase", "pv")


class BuildError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class DebianParams:
    name: str = "debian"
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple = PACKAGES

    def digest(self):
        blob = json.dumps([BUILDER_VERSION, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


PARAMS = DebianParams()


class DebianStack:
    """What the suite needs of a stack, for the Debian rootfs."""

    def __init__(self, root, meta):
        self.root = root
        self.debs = os.path.join(root, "debs")
        self.meta = dict(meta, debs_dir=self.debs)   # for dpkg-i, which gets only the meta
        self.reference = os.path.join(root, "rootfs")
        self.native = os.path.join(root, "native")

    def layers(self, fmt="kernel"):
        return [self.native] if fmt == "native" else [self.reference]

    @property
    def scratch(self):
        return os.path.join(self.root, "scratch")

    def physical_copies(self, rel):
        return [os.path.join(self.native, rel), os.path.join(self.reference, rel)]

    def native_guard(self, root, touched, created):
        return ResyncGuard(root, self.reference, touched)


class ResyncGuard:
    """Puts trees of the native copy back as they are in the rootfs."""

    def __init__(self, native, reference, trees):
        self.native, self.reference, self.trees = native, reference, list(trees)

    def restore(self):
        if not self.trees:
            return
        below = mounts_below(self.native)
        if below:  # never delete through a mount into the host
            raise RuntimeError(f"cannot restore {self.native}: {below[0]} is mounted")
        for rel in self.trees:
            src = os.path.join(self.reference, rel, "")
            dst = os.path.join(self.native, rel, "")
            proc = subprocess.run(["rsync", "-aHAXx", "--delete", src, dst],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"rsync {dst}: {proc.stderr.strip()[-300:]}")


def mounts_below(path):
    """Mount points at or under `path` (from /proc/self/mountinfo), deepest first."""
    top = os.path.realpath(path)
    found = [m.mount_point for m in mountinfo.mounts()
             if m.mount_point == top or m.mount_point.startswith(top + "/")]
    return sorted(found, key=len, reverse=True)


def _remove_tree(path, log):
    """Remove a (possibly half-built) tree, unmounting whatever is mounted in it first."""
    for point in mounts_below(path):
        log(f"debian: unmounting {point}, left by an unfinished build")
        subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)
    if mounts_below(path):
        raise BuildError(f"{path}: cannot unmount what is mounted in it")
    subprocess.run(["rm", "-rf", "--one-file-system", path], check=True)


def _run(argv, what, **kwargs):
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          **kwargs)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(f"{what} exited {proc.returncode}: {lines[-1] if lines else ''}")
    return proc


def _download_debs(rootfs, work, dest, packages):
    """apt-get download with the rootfs's sources, keys and dpkg status (not the host's)."""
    state, cache = os.path.join(work, "state"), os.path.join(work, "cache")
    for d in (os.path.join(state, "lists", "partial"),
              os.path.join(cache, "archives", "partial"), dest):
        os.makedirs(d, exist_ok=True)
    etc = os.path.join(rootfs, "etc", "apt")
    opts = {
        "Dir::Etc::SourceList": os.path.join(etc, "sources.list"),
        "Dir::Etc::SourceParts": os.path.join(etc, "sources.list.d"),
        "Dir::Etc::Trusted": os.path.join(etc, "trusted.gpg"),
        "Dir::Etc::TrustedParts": os.path.join(etc, "trusted.gpg.d"),
        "Dir::Etc::PreferencesParts": os.path.join(etc, "preferences.d"),
        "Dir::State": state, "Dir::State::status": os.path.join(rootfs, "var/lib/dpkg/status"),
        "Dir::Cache": cache, "APT::Sandbox::User": "root",
    }
    argv = ["apt-get", "-q"] + [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]
    _run(argv + ["update"], "apt-get update")
    _run(argv + ["download", *packages], "apt-get download", cwd=dest)
    got = sorted(os.listdir(dest))
    if len(got) != len(packages):
        raise BuildError(f"apt-get download: {len(got)} packages for {len(packages)} asked")
    return got


def _list_meta(params, rootfs, debs):
    files, entries = [], 0
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        for name in sorted(filenames):
            entries += 1
            full = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(full).st_mode):
                files.append(os.path.relpath(full, rootfs))
        entries += len(dirnames)
    usr_bin = sorted(os.path.join("usr/bin", n) for n in os.listdir(os.path.join(rootfs, "usr/bin"))
                     if stat.S_ISREG(os.lstat(os.path.join(rootfs, "usr/bin", n)).st_mode))
    return {
        "params": dataclasses.asdict(params),
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mirror": MIRROR, "entries": entries, "regular_files": len(files),
        "content_sample": sorted(random.Random(1).sample(files, min(600, len(files)))),
        "usr_bin_files": usr_bin, "debs": debs,
    }


def cached(params=PARAMS, cache_root=stackmod.CACHE_ROOT):
    """The complete cached stack for `params`, or None."""
    root = os.path.join(cache_root, f"{params.name}-{params.digest()}")
    if not os.path.exists(os.path.join(root, ".complete")):
        return None
    with open(os.path.join(root, "meta.json")) as f:
        return DebianStack(root, json.load(f))


def _clear_leftovers(params, cache_root, keep, log):
    """Unfinished builds (any: the lock is held) and stacks of other parameters."""
    for name in os.listdir(cache_root):
        path = os.path.join(cache_root, name)
        if name.startswith(f".{params.name}-") and ".tmp-" in name:
            log(f"debian: removing the unfinished build {path}")
            _remove_tree(path, log)
        elif name.startswith(f"{params.name}-") and path != keep and os.path.isdir(path):
            if mounts_below(path):
                continue  # in use
            log(f"debian: removing the stale stack {path}")
            _remove_tree(path, log)


def build(params=PARAMS, log=print, cache_root=stackmod.CACHE_ROOT):
    """Return the cached DebianStack, running debootstrap first if needed."""
    stackmod._held_locks.append(stackmod._lock(cache_root, params, log))
    root = os.path.join(cache_root, f"{params.name}-{params.digest()}")
    _clear_leftovers(params, cache_root, root, log)
    done = cached(params, cache_root)
    if done:
        return done
    if os.path.exists(root):  # no .complete: not ours to trust
        _remove_tree(root, log)
    for tool in ("debootstrap", "rsync", "apt-get"):
        if not shutil.which(tool):
            raise BuildError(f"{tool} is not installed (scripts/setup.sh installs it)")
    tmp = os.path.join(cache_root, f".{params.name}-{params.digest()}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    rootfs = os.path.join(tmp, "rootfs")
    log(f"debian: debootstrap --variant={params.variant} {params.suite} from {MIRROR} "
        f"(cached in {root})")
    started = time.monotonic()
    try:
        _run(["debootstrap", f"--variant={params.variant}", params.suite, rootfs, MIRROR],
             "debootstrap")
    finally:
        for point in mounts_below(tmp):   # debootstrap mounts /proc and /sys while it works
            subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)
    archives = os.path.join(rootfs, "var/cache/apt/archives")
    for name in os.listdir(archives):
        if name.endswith(".deb"):
            os.unlink(os.path.join(archives, name))
    log(f"debian: rootfs built in {time.monotonic() - started:.0f} s; fetching "
        f"{len(params.packages)} packages")
    debs = _download_debs(rootfs, os.path.join(tmp, "apt"), os.path.join(tmp, "debs"),
                          params.packages)
    shutil.rmtree(os.path.join(tmp, "apt"))
    _run(["cp", "-a", rootfs, os.path.join(tmp, "native")], "cp -a rootfs native")
    meta = _list_meta(params, rootfs, debs)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    os.makedirs(os.path.join(tmp, "scratch"))
    os.sync()
    open(os.path.join(tmp, ".complete"), "w").close()
    os.rename(tmp, root)
    log(f"debian: {meta['entries']} entries, {meta['regular_files']} regular files "
        f"({time.monotonic() - started:.0f} s)")
    return DebianStack(root, meta)


# ------------------------------------------------------------------ workloads

def _private_mount_namespace():
    """Give this (single-threaded, forked) workload process a mount namespace
    of its own, so that its binds go with it however it ends."""
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)


def _bind(src, dst, read_only=False):
    libc.mount(src, dst, None, libc.MS_BIND)
    if read_only:
        libc.mount(None, dst, None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY)


def _chroot(ctx, script):
    """Time `sh -c SCRIPT` in a chroot on the merged root; stdout to /dev/null."""
    argv = ["chroot", ctx.root, "/bin/sh", "-c", script]
    start = clock()
    proc = subprocess.run(argv, env=CHROOT_ENV, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = clock() - start
    if proc.returncode != 0:
        raise RuntimeError(f"chroot {script!r} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
    return elapsed


def command(script, check=None, dev=False):
    """A workload timing one shell command; `dev`: it needs /dev (perl opens /dev/null)."""
    def run(ctx):
        if dev:
            _private_mount_namespace()
            _bind("/dev", ctx.path("dev"))
        elapsed = _chroot(ctx, script)
        if check:
            check(ctx)
        return [("time_s", elapsed, "s")]
    return run


def _gone(*rels):
    def check(ctx):
        for rel in rels:
            if os.path.lexists(ctx.path(rel)):
                raise RuntimeError(f"{rel} is still there")
    return check


def _copied(ctx):
    def count(top):
        return sum(len(d) + len(f) for _p, d, f in os.walk(top))
    got, want = count(ctx.path("usr/share.copy")), count(ctx.path("usr/share"))
    if got != want:
        raise RuntimeError(f"cp -a: {got} entries copied, {want} in /usr/share")


def dpkg_install(ctx):
    _private_mount_namespace()
    _bind("/dev", ctx.path("dev"))
    _bind(ctx.meta["debs_dir"], ctx.path("mnt"), read_only=True)
    elapsed = _chroot(ctx, "dpkg -i /mnt/*.deb")
    with open(ctx.path("var/lib/dpkg/status"), errors="replace") as f:
        status = f.read()
    for name in ctx.meta["params"]["packages"]:
        if f"Package: {name}\nStatus: install ok installed" not in status:
            raise RuntimeError(f"dpkg -i: {name} is not installed")
    return [("time_s", elapsed, "s")]


def build_workloads():
    def wl(name, run, **kw):
        return Workload(name, "debian", run, **kw)
    return [
        wl("ls-lR-usr", command("ls -lR /usr")),
        wl("find-all", command("find / -xdev -printf '%p %s %m\\n'")),
        wl("exec-true-200", command("i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done")),
        wl("perl-posix", command("perl -MPOSIX -e 1", dev=True)),
        wl("dpkg-l", command("dpkg -l")),
        wl("sha256-usr-bin", command("sha256sum /usr/bin/*"),
           cold_files=lambda m: m["usr_bin_files"]),
        wl("cp-a-lower", command("cp -a /usr/share /usr/share.copy", _copied),
           touched=lambda m: ["usr"]),
        wl("rm-rf-lower", command("rm -rf /usr/share/doc /usr/share/locale",
                                  _gone("usr/share/doc", "usr/share/locale")),
           touched=lambda m: ["usr/share"]),
        wl("chmod-R", command("chmod -R go-w /usr/share"), touched=lambda m: ["usr/share"]),
        wl("dpkg-i", dpkg_install, touched=lambda m: ["usr", "etc", "var"]),
    ]
