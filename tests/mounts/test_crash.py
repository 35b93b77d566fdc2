"""A server killed (SIGKILL) in the middle of copy-ups never leaves a partial
file in the upper layer, and the next mount cleans the workdir."""
import os
import random
import signal
import subprocess
import threading

import pytest
import xxhash

from mountutil import UNIONFS, Stack, force_unmount, wait_for

FILE_SIZE = 96 << 20
NFILES = 3
# when to kill the server after the writers start: early ones land mid-copy,
# late ones after complete copies; both must leave a clean upper
KILL_DELAYS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 1.0, 2.0]


def digest(path):
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def big_lower(tmp_path_factory):
    low = tmp_path_factory.mktemp("crash-lower")
    rng = random.Random(7)
    block = rng.randbytes(1 << 20)
    sums = {}
    for i in range(NFILES):
        path = low / f"big{i}"
        with open(path, "wb") as f:
            for j in range(FILE_SIZE >> 20):
                f.write(block[j:] + block[:j])
        sums[path.name] = digest(path)
    return low, sums


def start_server(stack, lower):
    args = [UNIONFS, "mount", "-f", "--lower", str(lower), "--upper", str(stack.upper),
            "--work", str(stack.work), str(stack.mnt)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: os.path.ismount(stack.mnt) or proc.poll() is not None, what="mount")
    assert proc.poll() is None, proc.stderr.read()
    return proc


def append_to_all(mnt):
    def one(name):
        try:
            with open(os.path.join(mnt, name), "ab") as f:
                f.write(b"!")
        except OSError:
            pass      # the server died under us: expected
    threads = [threading.Thread(target=one, args=(f"big{i}",)) for i in range(NFILES)]
    for t in threads:
        t.start()
    return threads


def test_sigkill_during_copy_up_leaves_no_partial_file(tmp_path, big_lower):
    lower, sums = big_lower
    stack = Stack(tmp_path, nlowers=0)
    complete_seen = interrupted_seen = 0
    for round_, delay in enumerate(KILL_DELAYS):
        proc = start_server(stack, lower)
        try:
            threads = append_to_all(str(stack.mnt))
            threading.Event().wait(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            force_unmount(stack.mnt)
            for t in threads:
                t.join(timeout=30)
        # the workdir also holds the server's pool of empty files: a copy cut
        # short is one with data in it
        left = os.listdir(stack.work / "work")
        interrupted_seen += any(os.path.getsize(stack.work / "work" / n) for n in left)
        for name in os.listdir(stack.upper):
            path = stack.upper / name
            size = os.path.getsize(path)
            # either the whole copy (maybe with the appended byte) or nothing
            assert size in (FILE_SIZE, FILE_SIZE + 1), f"round {round_}: partial {name}"
            with open(path, "rb") as f:
                head = f.read(FILE_SIZE)
            assert xxhash.xxh64(head).hexdigest() == sums[name], f"round {round_}: {name}"
            complete_seen += 1
        # the next mount cleans what the killed server left in the workdir
        proc = start_server(stack, lower)
        try:
            assert not set(os.listdir(stack.work / "work")) & set(left)
            assert sorted(os.listdir(stack.mnt)) == sorted(sums)
        finally:
            force_unmount(stack.mnt)
            proc.wait(timeout=10)
        for name in os.listdir(stack.upper):
            os.unlink(stack.upper / name)
    assert complete_seen > 0, "no copy-up ever finished: the test proved nothing"
    assert interrupted_seen > 0, "no kill landed mid-copy: the test proved nothing"
