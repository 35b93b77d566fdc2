"""The bench's FUSE request ledger (bench.ledger) on a real mount: the
kernel's fuse tracepoints, read from a trace instance of our own, against
the server's own request counters as the oracle."""
import json
import os

import pytest

from bench import ledger
from unionfs.fuse.ops import STATS_XATTR


def server_counts(mnt):
    stats = json.loads(os.getxattr(mnt, STATS_XATTR))
    return {op.upper(): e["count"] for op, e in stats["requests"].items()}


@pytest.fixture
def traced(stack):
    reason = ledger.Ledger.available()
    assert reason is None, reason           # kernel 6.18 has the tracepoints
    book = ledger.Ledger()
    book.open()
    try:
        with stack.unionfs():
            yield stack.mnt, book
    finally:
        book.close()
    assert not os.path.exists(book.path), "the trace instance outlived the ledger"


def test_the_ledger_counts_what_the_server_answered(traced):
    mnt, book = traced
    before = server_counts(mnt)
    book.start(ledger.connection_of(mnt))
    for i in range(7):
        os.mkdir(mnt / f"d{i}")
    for i in range(3):
        (mnt / f"d{i}" / "f").write_bytes(b"x" * 10)
    got = book.stop()
    after = server_counts(mnt)
    assert got["complete"]
    for op in ("MKDIR", "CREATE", "WRITE"):
        assert got["ops"][op]["count"] == after.get(op, 0) - before.get(op, 0), op
    assert got["ops"]["MKDIR"]["count"] == 7
    assert got["requests"] == sum(e["count"] for e in got["ops"].values())
    # a caller waits for these answers, so each was answered before stop()
    # (RELEASE is sent after close() returns: its answer may come later)
    for op in ("MKDIR", "CREATE", "WRITE"):
        assert got["ops"][op]["timed"] == got["ops"][op]["count"] and got["ops"][op]["total_us"] > 0


def test_the_ledger_sees_only_the_connection_it_was_started_on(traced, make_stack):
    mnt, book = traced
    other = make_stack(1, tag="other")
    with other.unionfs():
        book.start(ledger.connection_of(mnt))
        for i in range(4):
            os.mkdir(other.mnt / f"elsewhere{i}")
        os.mkdir(mnt / "here")
        got = book.stop()
    assert got["ops"]["MKDIR"]["count"] == 1


def test_errors_are_counted_by_kind(traced):
    mnt, book = traced
    os.mkdir(mnt / "full")
    (mnt / "full" / "f").write_bytes(b"")
    book.start(ledger.connection_of(mnt))
    for _ in range(3):      # ENOTEMPTY is the server's answer (no cached state says it)
        with pytest.raises(OSError):
            os.rmdir(mnt / "full")
    got = book.stop()
    assert got["ops"]["RMDIR"] == {**got["ops"]["RMDIR"], "count": 3, "errors": 3, "enoent": 0}


def test_a_request_without_its_answer_is_counted_but_not_timed():
    sends = {1: (1, 1000), 2: (1, 2000), 3: (2, 2500)}      # LOOKUP, LOOKUP, FORGET
    ends = {1: (-2, 4000)}                                    # one ENOENT answered
    got = ledger.summarize(sends, ends)
    assert got["ops"]["LOOKUP"] == {"count": 2, "errors": 1, "enoent": 1, "timed": 1,
                                    "total_us": 3.0}
    assert got["ops"]["FORGET"]["timed"] == 0
    assert got["requests"] == 3
