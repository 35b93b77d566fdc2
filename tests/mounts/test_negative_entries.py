"""Requests the kernel need not send: a missing name is answered with a
negative entry the kernel caches (one LOOKUP, not one per probe), and FLUSH
is declined with ENOSYS once, after which the kernel sends none. A cached
missing name must never hide a name made through the mount: every way of
making one is checked against the kernel's overlayfs."""
import json
import os

import pytest

from unionfs.fuse.ops import STATS_XATTR


def requests(mnt, op):
    stats = json.loads(os.getxattr(mnt, STATS_XATTR))
    return stats["requests"].get(op, {}).get("count", 0)


def test_probing_a_missing_name_again_sends_no_lookup(stack):
    with stack.unionfs():
        with pytest.raises(FileNotFoundError):
            os.stat(stack.mnt / "missing")
        before = requests(stack.mnt, "lookup")
        for _ in range(20):
            with pytest.raises(FileNotFoundError):
                os.stat(stack.mnt / "missing")
        assert requests(stack.mnt, "lookup") == before


def test_a_negative_entry_is_counted_in_the_stats(stack):
    with stack.unionfs():
        for name in ("a", "b", "c"):
            assert not os.path.lexists(stack.mnt / name)
        assert json.loads(os.getxattr(stack.mnt, STATS_XATTR))["negative_entries"] == 3


def test_closing_files_sends_flush_once_at_most(stack):
    (stack.lowers[0] / "f").write_bytes(b"lower")
    with stack.unionfs():
        for i in range(5):
            with open(stack.mnt / "f", "ab") as f:
                f.write(b"+%d" % i)
        assert requests(stack.mnt, "flush") <= 1
        assert (stack.mnt / "f").read_bytes() == b"lower+0+1+2+3+4"


# ---- no missing name hides a name made afterwards -----------------------------------

def _make_file(mnt, name):
    (mnt / name).write_bytes(b"made")


def _make_dir(mnt, name):
    os.mkdir(mnt / name)


def _make_symlink(mnt, name):
    os.symlink("target", mnt / name)


def _make_link(mnt, name):
    os.link(mnt / "lowerfile", mnt / name)


def _make_fifo(mnt, name):
    os.mkfifo(mnt / name)


def _rename_onto(mnt, name):
    os.rename(mnt / "lowerfile", mnt / name)


def _rename_dir_onto(mnt, name):
    os.mkdir(mnt / "newdir")
    (mnt / "newdir" / "inside").write_bytes(b"x")
    os.rename(mnt / "newdir", mnt / name)


MAKERS = [_make_file, _make_dir, _make_symlink, _make_link, _make_fifo, _rename_onto,
          _rename_dir_onto]


def _state(mnt, name):
    """What a program sees at name and below it after it was made."""
    path = mnt / name
    st = os.lstat(path)
    seen = {"type": st.st_mode & 0o170000, "nlink": st.st_nlink,
            "root": sorted(os.listdir(mnt))}
    if os.path.isdir(path) and not os.path.islink(path):
        seen["children"] = sorted(os.listdir(path))
    return seen


def _probe_then_make(mnt, where, make):
    """Probe the name (and one inside it) while missing, make it, then look."""
    name = where + "/fresh" if where else "fresh"
    for probe in (name, name + "/inside"):
        with pytest.raises(FileNotFoundError):
            os.lstat(mnt / probe)
    make(mnt, name)
    return _state(mnt, name)


@pytest.mark.parametrize("where", ["", "lowerdir", "gone"],
                         ids=["root", "in-a-lower-dir", "in-a-recreated-dir"])
@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__.lstrip("_"))
def test_a_name_made_after_it_was_missing_is_seen_as_on_the_kernel(make_stack, make, where):
    results = []
    for kind in ("kernel", "unionfs"):
        stack = make_stack(1, tag=kind)
        (stack.lowers[0] / "lowerfile").write_bytes(b"lower")
        (stack.lowers[0] / "lowerdir").mkdir()
        (stack.lowers[0] / "gone").mkdir()
        (stack.lowers[0] / "gone" / "fresh").write_bytes(b"lower fresh")
        with getattr(stack, kind)():
            if where == "gone":     # whited out and made again: an opaque dir
                os.remove(stack.mnt / "gone" / "fresh")
                os.rmdir(stack.mnt / "gone")
                with pytest.raises(FileNotFoundError):
                    os.lstat(stack.mnt / "gone")
                os.mkdir(stack.mnt / "gone")
            results.append(_probe_then_make(stack.mnt, where, make))
    assert results[1] == results[0]


def test_a_name_removed_through_the_mount_is_missing_at_once(stack):
    (stack.lowers[0] / "f").write_bytes(b"lower")
    with stack.unionfs():
        assert os.path.exists(stack.mnt / "f")
        os.remove(stack.mnt / "f")
        for _ in range(2):
            with pytest.raises(FileNotFoundError):
                os.stat(stack.mnt / "f")
        (stack.mnt / "f").write_bytes(b"again")
        assert (stack.mnt / "f").read_bytes() == b"again"

