"""A concurrent stress workload, run the same way on the kernel's overlay and
on a FUSE union.

The stack: two lower layers, each holding part of every worker's private
subtree `wN/` and of a shared subtree `shared/`. Worker processes run at the
same time for a bounded number of rounds:

- **private workers**, one per subtree, each alone in its `wN/`: creates,
  writes (some fsynced), appends, truncates, renames, unlinks, mkdir/rmdir,
  links, chmod, stats and listings, drawn from a seeded generator. Nobody
  else touches that subtree, so every result (values and errnos) is a
  function of the seed alone and must equal the kernel's, op by op.
- **racing workers** on `shared/`: they rename files between names, write
  new files with unique contents and fsync them, and reap files (rename into
  their own trash directory, read, then unlink: so each knows exactly which
  content it removed). Their results depend on timing, so only invariants are
  checked at the end, after a remount: every content appears under at most
  one name (nothing duplicated), every fsynced content that was not reaped is
  still there (nothing lost), and no visible name has a whiteout beside it in
  the upper (no name both visible and whited out).
"""
import hashlib
import os
import random
import time

NAMES = ["a", "b", "c", "d", "e", "f", "g", "h"]
SHARED_FILES = 24


def build_stack(lowers, workers, seed):
    """Lay out the private subtrees and the shared one over two lower layers."""
    rng = random.Random(f"stress-stack-{seed}")
    for w in range(workers):
        for li, low in enumerate(lowers):
            base = os.path.join(low, f"w{w}")
            os.makedirs(os.path.join(base, "sub"), exist_ok=True)
            for name in rng.sample(NAMES, 4):
                with open(os.path.join(base, name if li else name + "0"), "wb") as f:
                    f.write(rng.randbytes(rng.randrange(0, 20_000)))
            with open(os.path.join(base, "sub", f"s{li}"), "wb") as f:
                f.write(b"sub %d" % li)
    for i in range(SHARED_FILES):
        low = lowers[i % len(lowers)]
        os.makedirs(os.path.join(low, "shared"), exist_ok=True)
        with open(os.path.join(low, "shared", f"f{i}"), "wb") as f:
            f.write(b"content-lower-%d" % i)


def _errno(e):
    import errno as errno_mod
    return errno_mod.errorcode.get(e.errno, str(e.errno))


def private_ops(base, seed, rounds):
    """Run the private worker's seeded op sequence in `base`; return its results."""
    rng = random.Random(f"stress-private-{seed}")
    results = []

    def name():
        return os.path.join(base, rng.choice(NAMES + [n + "0" for n in NAMES] + ["sub/x"]))

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:12]

    ops = {
        "write": lambda p: _write(p, rng.randbytes(rng.randrange(1, 9000)), rng.random() < 0.3),
        "append": lambda p: _append(p, rng.randbytes(rng.randrange(1, 500))),
        "truncate": lambda p: os.truncate(p, rng.randrange(0, 5000)),
        "read": digest,
        "stat": lambda p: (oct(os.lstat(p).st_mode), os.lstat(p).st_size),
        "rename": lambda p: os.rename(p, name()),
        "unlink": os.unlink,
        "link": lambda p: os.link(p, name()),
        "mkdir": lambda p: os.mkdir(p),
        "rmdir": os.rmdir,
        "chmod": lambda p: os.chmod(p, rng.choice([0o600, 0o644, 0o755])),
        "list": lambda p: sorted(os.listdir(os.path.dirname(p))),
    }
    kinds = sorted(ops)
    for _ in range(rounds):
        kind = rng.choice(kinds)
        path = name()
        try:
            value = ops[kind](path)
            results.append((kind, os.path.relpath(path, base), "ok", value))
        except OSError as e:
            results.append((kind, os.path.relpath(path, base), "err", _errno(e)))
    return results


def _write(path, data, sync):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def _append(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def racing_ops(shared, trash, worker, seed, rounds):
    """Race on `shared`: returns (contents written and fsynced, contents reaped, op count)."""
    rng = random.Random(f"stress-race-{seed}-{worker}")
    written, reaped = [], []
    os.makedirs(trash, exist_ok=True)
    ops = 0
    for i in range(rounds):
        choice = rng.random()
        src = os.path.join(shared, rng.choice([f"f{k}" for k in range(SHARED_FILES)]
                                              + [f"g{k}" for k in range(SHARED_FILES)]))
        try:
            if choice < 0.15:
                _append(src, b"+%d-%d" % (worker, i))     # a copy-up racing the renames
            elif choice < 0.45:
                dst = os.path.join(shared, rng.choice("fg") + str(rng.randrange(SHARED_FILES)))
                os.rename(src, dst)
            elif choice < 0.75:
                content = b"content-%d-%d" % (worker, i)
                tmp = os.path.join(trash, f"new{i}")
                _write(tmp, content, True)
                os.rename(tmp, os.path.join(shared, f"n{worker}-{i}"))
                written.append(content)
            else:
                mine = os.path.join(trash, f"reap{i}")
                os.rename(src, mine)
                with open(mine, "rb") as f:
                    reaped.append(f.read())
                os.unlink(mine)
        except OSError:
            pass
        ops += 1
    return written, reaped, ops


def visible_contents(mnt):
    """name -> content of every file the racing workers could have put somewhere:
    the shared subtree and their trash directories."""
    out = {}
    for top in [d for d in os.listdir(mnt) if d == "shared" or d.startswith("trash")]:
        for root, _dirs, files in os.walk(os.path.join(mnt, top)):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, mnt)] = f.read()
    return out


def run_private_worker(base, seed, rounds, conn):
    conn.send(private_ops(base, seed, rounds))
    conn.close()


def run_racing_worker(shared, trash, worker, seed, rounds, conn):
    conn.send(racing_ops(shared, trash, worker, seed, rounds))
    conn.close()


def run(mnt, workers, racers, seed, rounds, deadline):
    """Start every worker at once in processes of their own; return
    (private results by worker, racing results, wall time)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    jobs = []
    for w in range(workers):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=run_private_worker,
                        args=(os.path.join(mnt, f"w{w}"), f"{seed}-{w}", rounds, child))
        jobs.append(("private", w, p, parent))
    for r in range(racers):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=run_racing_worker,
                        args=(os.path.join(mnt, "shared"), os.path.join(mnt, f"trash{r}"),
                              r, seed, rounds, child))
        jobs.append(("race", r, p, parent))
    start = time.monotonic()
    for _, _, p, _ in jobs:
        p.start()
    private, racing = {}, []
    for kind, n, p, conn in jobs:
        left = max(1.0, deadline - (time.monotonic() - start))
        if not conn.poll(left):
            for _, _, q, _ in jobs:
                q.kill()
            raise TimeoutError(f"stress worker {kind} {n} did not finish in {deadline:.0f} s")
        result = conn.recv()
        p.join()
        if kind == "private":
            private[n] = result
        else:
            racing.append(result)
    return private, racing, time.monotonic() - start
