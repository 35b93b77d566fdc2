"""One differential run: a seed's stack and op sequence on kernel vs target.

`run_seed` builds two copies of the seed's stack (the kernel's with OCI
markers converted to kernel form), mounts both, applies the same ops to each
and stops at the first divergence: an op result, the state around an op's
paths, the whole merged tree at the end, inode-number relationships, readdir
d_ino, and finally the target's upper (plus the lowers) remounted under the
kernel, which must show the target's merged view. `first_divergence` bisects
an end-of-run divergence down to the op that caused it.
"""
import contextlib
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import generator, mounts, ops, tree


@dataclass
class Divergence:
    seed: int
    nops: int
    target: str
    where: str  # "op #i", "end of run", "initial view", "kernel remount of target upper"
    op_index: int  # index of the op found to diverge (-1: before any op)
    history: list  # (op, kernel_result, target_result) up to and including the failure
    details: list = field(default_factory=list)
    replay_flags: str = ""

    def report(self):
        lines = [f"DIVERGENCE seed={self.seed} target={self.target} at {self.where}",
                 f"replay: python -m tests.difftest.replay {self.seed} --ops {self.nops} "
                 f"--target {self.target}{self.replay_flags}"]
        for i, (op, ra, rb) in enumerate(self.history):
            mark = ">>" if i == self.op_index else "  "
            if ra == rb:
                lines.append(f"{mark} #{i} {op!r} -> {ra!r}")
            else:
                lines.append(f"{mark} #{i} {op!r}\n       kernel: {ra!r}\n"
                             f"       {self.target}: {rb!r}")
        lines += ["details:"] + [f"  {d}" for d in self.details[:60]]
        if len(self.details) > 60:
            lines.append(f"  ... {len(self.details) - 60} more")
        return "\n".join(lines)


def same_result(op, ra, rb, target):
    """Equal results, up to the target's documented differences from the kernel."""
    if ra == rb:
        return True
    if target.startswith("unionfs") and op[0] == "unlink_open" and ra[0] == rb[0] == "ok":
        # docs/format.md: fstat of an open file whose last name is gone shows
        # nlink 0 in unionfs; the kernel shows a never-copied-up lower file's count.
        (ka, na), (kb, nb) = ra[1], rb[1]
        return ka == kb and nb == 0 and na >= 1
    return False


def upper_entries(upper):
    """Every relpath in an upper layer (to see what one op copied up)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(upper):
        for n in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, n), upper))
    return found


def _mirror_failed_op_copyups(result, before, ref_upper, mnt):
    """docs/semantics.md: a failed op copies nothing up; docs/format.md lists where the
    kernel does (setxattr failing with ENODATA/EEXIST, a failed link(), a failed
    rename copying up the target's parent). Such a kernel copy-up shows later
    (a dir becomes merged: nlink 1; its parent's mtime moves), so after an op
    that failed on both sides, whatever the kernel copied up during it is
    copied up in the target too, by a trusted xattr set and removed at once:
    the two states stay alike and the difference stays the documented one."""
    if result[0] != "err":
        return
    for rel in sorted(upper_entries(ref_upper) - before, key=lambda r: (r.count("/"), r)):
        path = os.path.join(str(mnt), rel)
        try:
            os.setxattr(path, "trusted.difftest", b"", follow_symlinks=False)
            os.removexattr(path, "trusted.difftest", follow_symlinks=False)
        except OSError:
            pass  # a whiteout the kernel wrote, or a name the union does not show


def build_stacks(seed, workdir, target, make_stack=None, split_fs=None):
    """Two copies of the seed's stack: the kernel's with OCI markers converted.

    With `split_fs` (an ExitStack), every lower layer of each copy lives on its
    own tmpfs: inode numbers then repeat across layers, and the union must not
    confuse them (st_ino hashed from (st_dev, st_ino)).
    """
    make_stack = make_stack or generator.generate_stack
    workdir = Path(workdir)
    if split_fs is not None:
        make_stack = _on_split_fs(make_stack, split_fs)
    ref = make_stack(seed, workdir / "kernel")
    for layer in ref.lowers + [ref.upper]:
        generator.convert_oci_to_kernel(layer)
    tgt = make_stack(seed, workdir / "target")
    # identify the generated OCI markers by inode: renames through the union may move them
    tgt.upper_marker_inos = {os.lstat(tgt.upper / rel).st_ino for rel in tgt.upper_oci_markers}
    if target == "kernel":  # kernel vs kernel: a self-check of the harness
        for layer in tgt.lowers + [tgt.upper]:
            generator.convert_oci_to_kernel(layer)
    return ref, tgt


def _on_split_fs(make_stack, exit_stack):
    def make(seed, root):
        root = Path(root)
        for i in range(1, 5):  # generate_stack makes up to 4 lowers, named lower1..4
            d = root / f"lower{i}"
            d.mkdir(parents=True)
            exit_stack.enter_context(mounts.tmpfs(d))
        return make_stack(seed, root)  # unused lowerN tmpfs mounts stay empty
    return make


def _lower_only(paths, upper):
    """Names whose object at the start comes from a lower layer (its st_ino is never freed)."""
    return [p for p in paths if p and not os.path.lexists(Path(upper) / p)]


def random_ops(seed):
    """The seeded op source: op i from the rng and the kernel side's current names."""
    rng = random.Random(f"difftest-ops-{seed}")
    return lambda i, ref_mnt: ops.choose_op(rng, ops.list_names(ref_mnt), i)


def run_seed(seed, nops, workdir, target="unionfs", remount_check=True, deadline=120.0,
             ignore=(), make_stack=None, op_source=None, split_fs=False):
    with contextlib.ExitStack() as fs_mounts:
        div = _run_seed(seed, nops, workdir, target, remount_check, deadline, ignore,
                        make_stack, op_source, fs_mounts if split_fs else None)
    if div is not None and split_fs:
        div.replay_flags += " --split-fs"
    return div


def _run_seed(seed, nops, workdir, target, remount_check, deadline, ignore, make_stack,
              op_source, split_fs):
    """Run one seed; return None if both sides agree, else the first Divergence.

    `ignore` names describe() keys (e.g. "nlink") left out of every comparison.
    A FUSE server that logs a traceback is a divergence too. `make_stack(seed,
    dir)` and `op_source(i, kernel_mnt)` replace the random stack and ops.
    """
    ref, tgt = build_stacks(seed, workdir, target, make_stack, split_fs)
    op_source = op_source or random_ops(seed)
    history = []
    server_log = mounts.ServerLog()
    end = {}
    try:
        div = _run_mounted(seed, nops, ref, tgt, target, deadline, ignore, history, server_log,
                           end, op_source, split_fs is not None)
    except (OSError, mounts.MountError) as e:  # e.g. a FUSE mount that failed or died
        div = Divergence(seed, nops, target, "exception", len(history) - 1, history,
                         [f"{type(e).__name__}: {e}"])
    errors = server_log.errors()
    if div is None and errors:
        div = Divergence(seed, nops, target, "server log", len(history) - 1, history,
                         [f"{target} server logged errors:"] + errors)
    elif div is not None and errors:
        div.details += [f"{target} server log:"] + errors
    if div is None and remount_check and target != "kernel" and "view" in end:
        details = kernel_remount_check(ref, tgt, end["view"], end["inos"], Path(workdir),
                                       target, ignore, subset_only=split_fs is not None)
        if details:
            div = Divergence(seed, nops, target, "kernel remount of target upper",
                             len(history) - 1, history, details)
    return div


class _Remountable:
    """A mount context that can be left and entered again (for the remount op)."""
    def __init__(self, factory):
        self.factory, self.cm = factory, None

    def up(self):
        cm = self.factory()
        cm.__enter__()
        self.cm = cm

    def down(self):
        cm, self.cm = self.cm, None
        if cm is not None:
            cm.__exit__(None, None, None)


def _run_mounted(seed, nops, ref, tgt, target, deadline, ignore, history, server_log, end,
                 op_source, split_fs):

    def diverged(where, index, details):
        return Divergence(seed, nops, target, where, index, history, details)

    with contextlib.ExitStack() as stack:
        sides = [_Remountable(lambda: mounts.kernel_overlay(ref.lowers, ref.upper, ref.work,
                                                             ref.mnt)),
                 _Remountable(lambda: mounts.mount_target(target, tgt, deadline, server_log))]
        for side in sides:
            side.up()
            stack.callback(side.down)

        def remount():
            for side in sides:
                side.down()
            for side in sides:
                side.up()
            return ("ok", None)

        ref0, ref0_inos, _ = tree.snapshot(ref.mnt)
        tgt0, tgt0_inos, dino = tree.snapshot(tgt.mnt)
        if target == "kernel":
            dino = []  # the kernel's merged dirs break d_ino == st_ino; only FUSE targets owe it
        details = (tree.compare_entries(ref0, tgt0, "kernel", target, ignore)
                   + tree.compare_ino_groups(ref0_inos, tgt0_inos, "kernel", target, ref0,
                                             subset_only=split_fs) + dino)
        if details:
            return diverged("initial view", -1, details)
        eligible = _lower_only(ref0, ref.upper)

        for i in range(nops):
            op = op_source(i, ref.mnt)
            ref_upper_before = upper_entries(ref.upper) if target.startswith("unionfs") else None
            if op[0] == "remount":  # unmount both, mount both again: state must persist
                ra = rb = remount()
            else:
                ra = ops.run_op(ref.mnt, op)
                rb = ops.run_op(tgt.mnt, op)
            history.append((op, ra, rb))
            if not same_result(op, ra, rb, target):
                return diverged(f"op #{i}", i, [f"result: kernel={ra!r} {target}={rb!r}"])
            if target.startswith("unionfs"):
                _mirror_failed_op_copyups(ra, ref_upper_before, ref.upper, tgt.mnt)
            paths = ops.op_paths(op)
            details = tree.compare_entries(ops.local_state(ref.mnt, paths),
                                           ops.local_state(tgt.mnt, paths), "kernel", target,
                                           ignore)
            if details:
                return diverged(f"op #{i} (state after it)", i, details)

        ref1, ref1_inos, _ = tree.snapshot(ref.mnt)
        tgt1, tgt1_inos, dino = tree.snapshot(tgt.mnt)
        if target == "kernel":
            dino = []
        details = (tree.compare_entries(ref1, tgt1, "kernel", target, ignore)
                   + tree.compare_ino_groups(ref1_inos, tgt1_inos, "kernel", target, ref1,
                                             subset_only=split_fs)
                   # across layers on several filesystems the kernel's st_ino is no oracle
                   + ([] if split_fs else tree.compare_stability(
                       ref0_inos, ref1_inos, tgt0_inos, tgt1_inos, eligible, "kernel", target,
                       ref0))
                   + tree.compare_copied_up(ref.upper, tgt.upper, "kernel", target)
                   + tree.compare_holes(ref.upper, tgt.upper, "kernel", target)
                   + dino)
        if details:
            return diverged("end of run", len(history) - 1, details)
        end["view"], end["inos"] = tgt1, tgt1_inos
    return None


def kernel_remount_check(ref, tgt, tgt_view, tgt_inos, workdir, target, ignore=(),
                         subset_only=False):
    """The target's upper (unmounted now) under kernel overlayfs must show the same view."""
    details = []
    written = {rel for rel in generator.list_oci_markers(tgt.upper)
               if os.lstat(tgt.upper / rel).st_ino not in tgt.upper_marker_inos}
    if written and target != "unionfs-oci":  # that one is told to write the OCI form
        details.append(f"{target} wrote OCI markers into upper as root: {sorted(written)}")
    generator.convert_oci_to_kernel(tgt.upper)
    work, mnt = workdir / "remount-work", workdir / "remount-mnt"
    work.mkdir()
    mnt.mkdir()
    try:
        with mounts.kernel_overlay(ref.lowers, tgt.upper, work, mnt,
                                   metacopy=target == "unionfs-metacopy"):
            view, inos, _ = tree.snapshot(mnt)
    except mounts.MountError as e:
        return details + [str(e)]
    details += tree.compare_entries(view, tgt_view, "kernel-on-target-upper", target, ignore)
    details += tree.compare_ino_groups(inos, tgt_inos, "kernel-on-target-upper", target, view,
                                       subset_only=subset_only)
    return details


def first_divergence(seed, nops, workdir, target="unionfs", **kw):
    """Like run_seed, but an end-of-run divergence is bisected to the op that made it."""
    workdir = Path(workdir)
    runs = [0]

    def attempt(n):
        runs[0] += 1
        d = workdir / f"run{runs[0]}"
        d.mkdir(parents=True)
        try:
            return run_seed(seed, n, d, target, **kw)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    div = attempt(nops)
    if div is None or not div.where.startswith(("end of run", "kernel remount", "server log")):
        return div
    lo, hi, best = 0, len(div.history), div  # hi diverges; find the smallest n that does
    while lo < hi - 1:
        mid = (lo + hi) // 2
        d = attempt(mid)
        if d is not None:
            hi, best = mid, d
            if not d.where.startswith(("end of run", "kernel remount", "server log")):
                return d  # an op-level divergence appeared first
        else:
            lo = mid
    best.details.insert(0, f"(bisected: the first {hi} ops suffice; the last one is the culprit)")
    return best


def run_open_matrix(workdir, target="unionfs", **kw):
    """Every open flag combination on every kind of name, each on its own fresh name."""
    cases = generator.open_matrix_cases()
    return run_seed(0, len(cases), workdir, target, make_stack=generator.generate_open_matrix_stack,
                    op_source=lambda i, _mnt: cases[i], **kw)


def mmap_cases():
    """Reads and shared writable mappings of lower files, upper files and symlinks to
    lower files (the write copies up), checked with pread and, later, the trees."""
    cases = []
    for k in range(6):
        for name in (f"lowerfile{k}", f"upperfile{k}", f"symlower{k}", f"chain{k}"):
            cases.append(("mmap_read", name))
            cases.append(("mmap_rw", name, k * 3, 1 + k * 2, k))
            cases.append(("mmap_read", name))
    return cases


def run_mmap_cases(workdir, target="unionfs", **kw):
    cases = mmap_cases()
    return run_seed(0, len(cases), workdir, target, make_stack=generator.generate_open_matrix_stack,
                    op_source=lambda i, _mnt: cases[i], **kw)
