"""The measurement loop: fresh mounts, interleaved targets, isolated workloads, records.

For every configuration (the stack on the host filesystem, and a copy on a
loop-mounted XFS image with reflink), every workload and every repetition,
each target gets a fresh upper and a fresh mount; the targets run in a
shuffled order that changes with every repetition (seeded: the same run order
for the same targets), so that no target always follows the same neighbour
(a rotation keeps neighbours: whatever one run leaves behind, say 1 GiB of
blocks to free, would always land on the same next one). A workload runs in a forked child (never in
the FUSE server's process) with a timeout, so a hung server costs one record,
not the run. Records are appended to records.jsonl as they are made.

Where the kernel has the fuse tracepoints, every timed run of a FUSE target
also records its request ledger (bench.ledger: requests by opcode, the mean
time of each) as one `fuse_requests` record; UNIONFS_BENCH_LEDGER=0 turns it
off. The tracepoints cost well under a microsecond per request, against tens
of microseconds for the requests themselves.
"""
import dataclasses
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback

from . import correctness
from . import ledger as ledgermod
from . import stack as stackmod
from .targets import MountError
from .workloads import Context


@dataclasses.dataclass
class Config:
    name: str          # "ext4" (the host fs) or "xfs-reflink"
    stack: object      # stack.Stack
    fstype: str
    workloads: list


def fstype_of(path):
    out = subprocess.run(["findmnt", "-no", "FSTYPE", "--target", path],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def git_commit():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("-dirty" if dirty else "")


def vmhwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cache_drops():
    """How often anyone has written to /proc/sys/vm/drop_caches since boot."""
    try:
        with open("/proc/vmstat") as f:
            return sum(int(line.split()[1]) for line in f
                       if line.startswith(("drop_pagecache ", "drop_slab ")))
    except OSError:
        return 0


def drop_file_cache(paths):
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_cache(paths):
    buf = bytearray(1 << 20)
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        except OSError:
            pass


def _rmtree(path):
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):  # e.g. overlay's work/work is 0000: retry after chmod
            subprocess.run(["rm", "-rf", path])


def run_in_child(fn, ctx, timeout):
    """Run fn(ctx) in a forked child; return (metrics, error)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            payload = {"metrics": fn(ctx)}
        except BaseException as e:  # report anything to the parent
            payload = {"error": f"{type(e).__name__}: {e}",
                       "trace": traceback.format_exc(limit=3)}
        data = json.dumps(payload).encode()
        while data:
            data = data[os.write(write_end, data):]
        os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                return None, f"timeout after {timeout} s"
            ready, _, _ = select.select([read_end], [], [], left)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_end)
        # a child killed inside a FUSE request may take a moment to go
        for _ in range(200):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.01)
    if not chunks:
        return None, "the workload process died without a result"
    payload = json.loads(b"".join(chunks))
    return payload.get("metrics"), payload.get("error")


class NativeGuard:
    """Snapshot what a workload touches in the native tree, and put it back."""

    def __init__(self, root, touched, created):
        self.root, self.created = root, created
        self.saved = []
        for rel in touched:
            path = os.path.join(root, rel)
            st = os.lstat(path)
            content = None
            if st.st_size <= (1 << 20):  # small files (e.g. git's index) may be rewritten
                with open(path, "rb") as f:
                    content = f.read()
            self.saved.append((path, st, os.listxattr(path, follow_symlinks=False), content))

    def restore(self):
        for rel in self.created:
            path = os.path.join(self.root, rel)
            if os.path.isdir(path) and not os.path.islink(path):
                _rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        for path, st, xattrs, content in self.saved:
            if content is not None:
                with open(path, "rb") as f:
                    changed = f.read() != content
                if changed:
                    with open(path, "wb") as f:
                        f.write(content)
            elif os.path.getsize(path) != st.st_size:
                os.truncate(path, st.st_size)
            for name in os.listxattr(path, follow_symlinks=False):
                if name not in xattrs:
                    os.removexattr(path, name, follow_symlinks=False)
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, st.st_mode & 0o7777)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


class Suite:
    def __init__(self, configs, targets, out_dir, quick, reps, heavy_reps, timeout, log):
        self.configs = configs
        self.targets = targets
        self.out_dir = out_dir
        self.quick = quick
        self.reps = reps
        self.heavy_reps = heavy_reps
        self.timeout = timeout
        self.log = log
        self.kernel = os.uname().release
        self.commit = git_commit()
        self.versions = {}
        self.records_path = os.path.join(out_dir, "records.jsonl")
        self.records = []
        self.done_runs = 0
        self.total_runs = 0
        self.started = time.monotonic()
        self.ledger = None

    # -------------------------------------------------------------- records
    def record(self, config, target, workload, metric, value, unit, rep, **extra):
        rec = {
            "impl": target.name, "workload": workload, "metric": metric, "value": value,
            "unit": unit, "rep": rep, "config": config.name, "fstype": config.fstype,
            "kernel": self.kernel, "version": self.versions.get(target.name, "?"),
            "commit": self.commit, "quick": self.quick, **extra,
        }
        self.records.append(rec)
        with open(self.records_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def progress(self, text):
        self.done_runs += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done_runs * (self.total_runs - self.done_runs)
        self.log(f"[{self.done_runs}/{self.total_runs} {elapsed:5.0f}s eta {eta:4.0f}s] {text}")

    # -------------------------------------------------------------- mounting
    def _fresh_dirs(self, config):
        base = os.path.join(config.stack.scratch, "run")
        mnt = os.path.join(base, "mnt")
        if os.path.ismount(mnt):  # left behind by a killed run: never delete through it
            subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
        _rmtree(base)
        dirs = {k: os.path.join(base, k) for k in ("upper", "work", "mnt")}
        for d in dirs.values():
            os.makedirs(d)
        return base, dirs

    def _mount(self, config, target, dirs):
        layers = config.stack.layers(target.layer_format)
        start = time.perf_counter()
        target.mount(layers, dirs["upper"], dirs["work"], dirs["mnt"])
        return time.perf_counter() - start

    def _unmount(self, target, mnt, hung):
        if hung:
            target.force_cleanup(mnt)
            return None
        start = time.perf_counter()
        try:
            target.unmount(mnt)
        except MountError:
            target.force_cleanup(mnt)
            raise
        return time.perf_counter() - start

    # -------------------------------------------------------------- one run
    def run_once(self, config, target, workload, rep):
        """Fresh upper, fresh mount, one workload. Returns a one-line summary."""
        meta = config.stack.meta
        base, dirs = self._fresh_dirs(config)
        guard = None
        metrics = []
        requests = None
        if workload.kind != "mount":
            drop_file_cache(p for rel in workload.cold_files(meta)
                            for p in config.stack.physical_copies(rel))
            read_into_cache(p for rel in workload.warm_files(meta)
                            for p in config.stack.physical_copies(rel))
        # Start every run without dirty pages of the previous one (writeback
        # of an earlier 1 GiB write would land in this run's time). The quick
        # smoke run writes little and skips it.
        if not self.quick:
            os.sync()
        try:
            if target.in_place and workload.kind != "mount":
                # a stack may put its native tree back its own way (bench.debian)
                make_guard = getattr(config.stack, "native_guard", NativeGuard)
                guard = make_guard(config.stack.native, workload.touched(meta),
                                   workload.created(meta))
            if target.kind == "native":
                if workload.kind == "mount":
                    return "n/a"
                root = config.stack.native
                mount_s = None
            else:
                root = dirs["mnt"]
                mount_s = self._mount(config, target, dirs)
            hung = False
            drops_before = cache_drops()
            try:
                if workload.kind == "mount":
                    metrics = [("mount_s", mount_s, "s")]
                elif workload.kind == "correctness":
                    metrics, error = run_in_child(self._check, (config, target, root),
                                                  self.timeout)
                    hung = error is not None and error.startswith("timeout")
                    if error:
                        raise RuntimeError(error)
                else:
                    ctx = Context(root=root, meta=meta, quick=self.quick)
                    traced = self.ledger is not None and target.kind == "fuse"
                    if traced:
                        self.ledger.start(ledgermod.connection_of(root))
                    try:
                        metrics, error = run_in_child(workload.run, ctx, self.timeout)
                    finally:
                        requests = self.ledger.stop() if traced else None
                    hung = error is not None and error.startswith("timeout")
                    if error:
                        raise RuntimeError(error)
                if target.server_pid:
                    hwm = vmhwm_kib(target.server_pid)
                    if hwm:
                        metrics.append(("server_vmhwm_kib", hwm, "KiB"))
            finally:
                if target.kind != "native":
                    umount_s = self._unmount(target, dirs["mnt"], hung)
                    if workload.kind == "mount" and umount_s is not None:
                        metrics.append(("umount_s", umount_s, "s"))
        finally:
            if guard:
                guard.restore()
            _rmtree(base)
        # Another process dropping the host's caches mid-run makes "warm" cold;
        # the record says so (the summary counts such runs).
        disturbed = cache_drops() != drops_before
        for metric, value, unit in metrics:
            self.record(config, target, workload.name, metric, value, unit, rep,
                        group=workload.group, caches_dropped=disturbed)
        if workload.kind == "timed" and target.kind == "fuse" and requests is not None:
            self.record(config, target, workload.name, "fuse_requests", requests["requests"],
                        "count", rep, group=workload.group, ops=requests["ops"],
                        complete=requests["complete"])
        return ", ".join(f"{m}={v:.4g}" for m, v, _u in metrics if m != "server_vmhwm_kib")

    def _check(self, args):
        config, target, root = args
        sample = config.stack.meta["content_sample"]
        problems = correctness.compare(root, config.stack.reference,
                                       sample[::4] if self.quick else sample, target.name)
        if problems:
            path = os.path.join(self.out_dir, f"correctness-{config.name}-{target.name}.txt")
            with open(path, "w") as f:
                f.write("\n".join(problems) + "\n")
        return [("mismatches", len(problems), "count")]

    # -------------------------------------------------------------- the loop
    def run(self, skipped_configs=()):
        for name, reason in skipped_configs:
            rec = {"impl": "*", "workload": "*", "metric": "skipped", "value": None, "unit": "",
                   "rep": 0, "config": name, "fstype": "?", "kernel": self.kernel,
                   "version": "-", "commit": self.commit, "quick": self.quick,
                   "reason": f"configuration unavailable: {reason}"}
            self.records.append(rec)
            with open(self.records_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        for target in self.targets:
            reason = target.unavailable()
            self.versions[target.name] = "-" if reason else target.version()
        for config in self.configs:
            per_rep = sum(self.heavy_reps if w.heavy else self.reps for w in config.workloads)
            self.total_runs += len(self.targets) * (1 + per_rep)
        self._open_ledger()
        try:
            for config in self.configs:
                self.run_config(config)
        finally:
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None

    def _open_ledger(self):
        if os.environ.get("UNIONFS_BENCH_LEDGER") == "0":
            reason = "turned off (UNIONFS_BENCH_LEDGER=0)"
        else:
            reason = ledgermod.Ledger.available()
        if reason is None:
            self.ledger = ledgermod.Ledger()
            try:
                self.ledger.open()
                return
            except OSError as e:
                self.ledger.close()
                self.ledger = None
                reason = f"cannot open a trace instance: {e}"
        self.log(f"no request ledger: {reason}")
        rec = {"impl": "*", "workload": "*", "metric": "no-ledger", "value": None, "unit": "",
               "rep": 0, "config": "*", "fstype": "?", "kernel": self.kernel, "version": "-",
               "commit": self.commit, "quick": self.quick, "reason": reason}
        self.records.append(rec)
        with open(self.records_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run_config(self, config):
        from .workloads import Workload
        active = []
        check = Workload("correctness", "correctness", None, kind="correctness")
        for target in self.targets:
            reason = target.unavailable()
            if reason is None:
                try:
                    summary = self.run_once(config, target, check, 0)
                    active.append(target)
                    self.progress(f"{config.name} correctness {target.name}: {summary}")
                    continue
                except (MountError, RuntimeError, OSError) as e:
                    reason = f"cannot run: {e}"
            self.record(config, target, "*", "skipped", None, "", 0, reason=reason)
            self.total_runs -= 1 + sum(self.heavy_reps if w.heavy else self.reps
                                       for w in config.workloads)
            self.log(f"{config.name}: skipping {target.name}: {reason}")
        for workload in config.workloads:
            reps = self.heavy_reps if workload.heavy else self.reps
            for rep in range(reps):
                order = list(active)
                random.Random(f"{workload.name}/{rep}").shuffle(order)
                for target in order:
                    label = f"{config.name} {workload.name} rep {rep + 1}/{reps} {target.name}"
                    try:
                        summary = self.run_once(config, target, workload, rep)
                    except (MountError, RuntimeError, OSError) as e:
                        summary = f"ERROR {e}"
                        self.record(config, target, workload.name, "error", None, "", rep,
                                    group=workload.group, reason=str(e))
                    self.progress(f"{label}: {summary}")


# ------------------------------------------------------------------ configs

def xfs_config(base_stack, log):
    """The stack copied onto a loop-mounted XFS image made with reflink=1.

    Returns (Stack, cleanup). The image is cached next to the base stack.
    """
    img = os.path.join(base_stack.root, "xfs.img")
    mnt = os.path.join(base_stack.root, "xfs-mnt")
    stamp = img + ".complete"
    os.makedirs(mnt, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", mnt]).returncode == 0:
        subprocess.run(["umount", mnt], check=True)
    if not os.path.exists(stamp):
        log("xfs: building the reflink XFS image (cached for later runs)")
        if os.path.exists(img):
            os.unlink(img)
        data = sum(os.path.getsize(os.path.join(base_stack.native, rel))
                   for rel in base_stack.meta["big_files"])
        size = 2 * data + 3 * data + (2 << 30)
        with open(img, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", img], check=True)
        subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
        try:
            subprocess.run(["cp", "-a", os.path.join(base_stack.root, "layers"),
                            os.path.join(base_stack.root, "layers-uf"),
                            base_stack.native, mnt + "/"], check=True)
            os.makedirs(os.path.join(mnt, "scratch"))
        finally:
            subprocess.run(["umount", mnt], check=True)
        open(stamp, "w").close()
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True, capture_output=True)

    def cleanup():
        subprocess.run(["umount", mnt])
    return stackmod.Stack(mnt, base_stack.meta, reference_root=base_stack.reference), cleanup


def default_log(text):
    print(text, file=sys.stderr, flush=True)
