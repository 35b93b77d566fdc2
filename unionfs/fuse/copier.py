"""The copier: runs the copy-ups that operations ask for, off the event loop.

Concurrency contract. Everything here runs on the trio event loop except
copy jobs, which run in worker threads with fds of their own and never touch
the node table. A copy-up of a node happens under that node's trio lock, and
the node is in `union.in_flight` from the moment its copy starts until it is
committed; an operation that needs or touches an in-flight node raises
Deferred (fs.copyplan) and waits here for that lock. So a second open of a
file being copied waits for the first copy instead of starting another, and
a rename, unlink or link of it waits for the copy to land.

What runs inline, on the loop: copies that cannot take long, namely metadata
only (directories, symlinks, special files, metacopy), reflink clones, and,
in volatile mode, regular files of at most QUICK_COPY_BYTES (a thread hop
costs more than they do). Everything else, and anything once a clone turns
out impossible, goes to a thread.
"""
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import trio

from ..fs import copyup

# A copy this small, with no fsync to wait for, costs less than a thread hop.
QUICK_COPY_BYTES = 256 << 10
# Fault injection for tests: every copy-up runs in a worker thread that first
# waits this many seconds, so that other requests can arrive mid-copy.
COPY_DELAY = float(os.environ.get("UNIONFS_COPY_DELAY") or 0)


def _delayed_run(job) -> None:
    time.sleep(COPY_DELAY)
    copyup.run(job)


def _wait_at(barrier) -> None:
    try:
        barrier.wait(timeout=5)
    except threading.BrokenBarrierError:
        pass


def is_quick(job) -> bool:
    if COPY_DELAY:
        return False
    if job.kind == copyup.META or job.clone_only or not stat.S_ISREG(job.st.st_mode):
        return True
    return not job.durable and job.st.st_size <= QUICK_COPY_BYTES


class CopyWorkers:
    """Threads for copy-ups that live as long as the server. trio's own
    thread cache lets an idle thread go after 10 s, and starting a thread
    costs the next copy-up about half a millisecond."""

    def __init__(self, threads: int):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="copy-up")
        self._threads = threads

    def prestart(self) -> None:
        """Start every thread now, in the background: the first copy-up of a
        fresh mount would otherwise pay for starting its thread."""
        # a pool starts a thread for a job only when none is idle: jobs that
        # wait for each other keep every thread busy until all have started
        started = threading.Barrier(self._threads)
        for _ in range(self._threads):
            self._pool.submit(_wait_at, started)

    def start(self, fn, *args) -> None:
        """Run fn in the background; nobody waits for it."""
        self._pool.submit(fn, *args)

    async def run(self, fn, *args):
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):     # the copy finishes even at shutdown
            await done.wait()
        return future.result()


class Copier:
    def __init__(self, union, threads: int = 4, counters=None, events=None):
        self.u = union
        self.counters = counters
        self.events = events
        union.defer_copies()
        self._locks: dict = {}      # node -> trio.Lock, while copied or waited for
        self._workers = CopyWorkers(threads)
        # the workdir's first ready inodes are made once the mount is live
        # (prestart), not while it starts

    def prestart(self) -> None:
        """Once the mount is live: start the threads, and make the first
        ready inodes, so that the first copy-up pays for neither. A read-only
        union copies nothing."""
        if not self.u.writable:
            return
        self._workers.prestart()
        self.refill()

    def refill(self) -> None:
        work = self.u.temp_pool_refill()
        if work is not None:
            self._workers.start(work)

    async def settle(self, deferred) -> None:
        """Do what a Deferred operation asked for: its copies, then wait for
        the in-flight copies of the nodes it touches."""
        for node, meta_only in deferred.needs:
            await self.copy_up(node, meta_only)
        for node in deferred.busy:
            lock = self._locks.get(node)
            if lock is not None:
                async with lock:
                    pass
        self.refill()

    async def copy_up(self, node, meta_only: bool = False) -> None:
        u = self.u
        for n in u.copy_chain(node, meta_only):
            lock = self._locks.setdefault(n, trio.Lock())
            async with lock:
                # the copy may have happened while we waited for the lock
                if n in u.copy_chain(n, meta_only):
                    u.in_flight.add(n)
                    try:
                        job = u.copy_job(n, meta_only)
                        start = time.perf_counter()
                        await self._run(job)
                        u.commit_copy(n, job)
                    finally:
                        u.in_flight.discard(n)
                    self._count(n, job, time.perf_counter() - start)
            if not lock.statistics().tasks_waiting:
                self._locks.pop(n, None)

    def _count(self, node, job, seconds) -> None:
        nbytes = job.st.st_size if stat.S_ISREG(job.st.st_mode) and job.kind != copyup.META \
            else 0
        if self.counters is not None:
            self.counters.copyup(job.kind, nbytes, seconds)
        if self.events:
            self.events.publish({"type": "copy-up", "path": "/" + node.path().decode(
                errors="surrogateescape"), "kind": job.kind, "bytes": nbytes,
                "seconds": round(seconds, 6)})

    async def _run(self, job) -> None:
        if is_quick(job):
            try:
                copyup.run(job)
                return
            except copyup.NotCloned:
                job.clone_only = False
        await self._workers.run(_delayed_run if COPY_DELAY else copyup.run, job)
