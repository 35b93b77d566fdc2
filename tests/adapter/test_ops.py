"""The pyfuse3 adapter without a mount: handlers called directly under trio
on a Union over temporary directories (no kernel session: pyfuse3's
notifications then fail with EINVAL, which the adapter tolerates)."""
import errno
import logging
import os
import threading
import types

import pyfuse3
import pytest
import trio

from unionfs.fs import copyup
from unionfs.fs.inodes import ROOT_INO
from unionfs.fuse import copier, ops

CTX = types.SimpleNamespace(uid=0, gid=0, umask=0o022, pid=os.getpid())


@pytest.fixture
def layers(make_stack):
    stack = make_stack(1)
    (stack.lowers[0] / "f").write_bytes(b"lower" * 100_000)     # 500 kB: not a quick copy
    (stack.lowers[0] / "g").write_bytes(b"g")
    return stack


@pytest.fixture
def adapter(layers):
    u = layers.open_union()
    yield ops.Operations(u)
    u.close()


def run(fn, *args):
    return trio.run(fn, *args)


@pytest.mark.parametrize("call", [
    lambda a: a.read(12345, 0, 10),
    lambda a: a.write(12345, 0, b"x"),
    lambda a: a.fsync(12345, False),
])
def test_an_unknown_file_handle_is_ebadf(adapter, call):
    with pytest.raises(pyfuse3.FUSEError, match="Bad file descriptor"):
        run(call, adapter)


def test_a_directory_handle_is_not_a_file_handle(adapter):
    fh = run(adapter.opendir, ROOT_INO, CTX)
    with pytest.raises(pyfuse3.FUSEError, match="Bad file descriptor"):
        run(adapter.read, fh, 0, 10)


def test_an_internal_error_is_eio_with_its_traceback_logged(adapter, caplog, monkeypatch):
    def broken(*args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(adapter.u, "readlink", broken)
    with caplog.at_level(logging.ERROR, logger="unionfs"):
        with pytest.raises(pyfuse3.FUSEError, match="Input/output error"):
            run(adapter.readlink, ROOT_INO, CTX)
    assert "ZeroDivisionError" in caplog.text


def test_a_data_copy_up_runs_in_a_worker_thread(adapter, layers, monkeypatch):
    threads = []
    real_run = copyup.run

    def spy(job):
        threads.append(threading.current_thread().name)
        return real_run(job)
    monkeypatch.setattr(copyup, "run", spy)

    async def rename():
        await adapter.rename(ROOT_INO, b"f", ROOT_INO, b"moved", 0, CTX)
    run(rename)
    assert threads and all(name.startswith("copy-up") for name in threads)
    assert (layers.upper / "moved").read_bytes() == (layers.lowers[0] / "f").read_bytes()
    assert os.stat(layers.upper / "f", follow_symlinks=False).st_rdev == 0   # a whiteout


def test_unlink_waits_for_the_copy_up_in_flight(adapter, layers, monkeypatch):
    monkeypatch.setattr(copier, "COPY_DELAY", 0.3)
    order = []

    async def both():
        async def write_open():
            node, _ = adapter.u.lookup(ROOT_INO, b"f")
            info = await adapter.open(node.ino, os.O_WRONLY, CTX)
            order.append("opened")
            await adapter.release(info.fh)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_open)
            await trio.sleep(0.1)
            assert adapter.u.in_flight, "the copy-up should be in flight"
            await adapter.unlink(ROOT_INO, b"f", CTX)
            order.append("unlinked")
    run(both)
    assert order == ["opened", "unlinked"]
    assert sorted(os.listdir(layers.upper)) == ["f"]       # only the whiteout
    assert os.stat(layers.upper / "f", follow_symlinks=False).st_rdev == 0


def test_a_missing_name_is_a_negative_entry_the_kernel_may_keep(adapter):
    entry = run(adapter.lookup, ROOT_INO, b"missing", CTX)
    assert (entry.st_ino, entry.entry_timeout > 0) == (0, True)
    assert adapter.stats()["negative_entries"] == 1


@pytest.mark.parametrize("call", [
    lambda a: a.flush(12345),
    lambda a: a.access(ROOT_INO, os.R_OK, CTX),
], ids=["flush", "access"])
def test_requests_with_nothing_to_do_are_declined_for_good(adapter, call):
    # ENOSYS: the kernel stops sending them (fc->no_flush, fc->no_access)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        run(call, adapter)
    assert raised.value.errno == errno.ENOSYS
