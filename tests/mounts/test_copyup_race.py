"""Requests that arrive while a copy-up runs in a worker thread.

The server is started with UNIONFS_COPY_DELAY, so every copy-up waits in its
worker thread before copying: the first request (a write open of a lower
file) is then mid-copy when the second one arrives. Whatever the second one
is, the outcome must be the kernel's for the same two operations one after
the other (the kernel serialises them on the inode), in both marker formats:
no EEXIST, no file that comes back, no whiteout beside a visible name; and a
request that does not touch the file being copied is answered meanwhile.
"""
import os
import threading
import time

import pytest

DELAY = 1.5         # each copy-up's wait in its worker thread
ARRIVE = 0.4        # when the second request is sent, after the first
LOWER_DATA = b"lower-data" * 10_000


def write_open(path, offset, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def rename_away(mnt):
    os.rename(mnt / "f", mnt / "g")


def unlink(mnt):
    os.unlink(mnt / "f")


def second_write_open(mnt):
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        os.pwrite(fd, b"B", 1)
    finally:
        os.close(fd)


def hard_link(mnt):
    os.link(mnt / "f", mnt / "h")


def chmod(mnt):
    os.chmod(mnt / "f", 0o600)


SECOND = {
    "rename": rename_away,
    "unlink": unlink,
    "second-open": second_write_open,
    "link": hard_link,
    "chmod": chmod,
}


def view(root):
    """Every name with its content (files) or kind, and its mode."""
    out = {}
    for name in sorted(os.listdir(root)):
        st = os.lstat(root / name)
        body = (root / name).read_bytes() if os.path.isfile(root / name) else "dir"
        out[name] = (oct(st.st_mode), st.st_nlink, body)
    return out


def make_layers(stack):
    (stack.lowers[0] / "f").write_bytes(LOWER_DATA)
    (stack.lowers[0] / "other").write_bytes(b"other")


def run_on_kernel(stack, second):
    make_layers(stack)
    with stack.kernel():
        write_open(stack.mnt / "f", 0, b"A")
        second(stack.mnt)
        return view(stack.mnt)


def run_mid_copy(stack, second):
    """The first request in a thread, the second while its copy-up waits."""
    outcome = {}

    def first():
        try:
            write_open(stack.mnt / "f", 0, b"A")
            outcome["first"] = "ok"
        except OSError as e:
            outcome["first"] = e.strerror
    t = threading.Thread(target=first)
    t.start()
    time.sleep(ARRIVE)
    try:
        second(stack.mnt)
        outcome["second"] = "ok"
    except OSError as e:
        outcome["second"] = e.strerror
    t.join()
    return outcome


@pytest.mark.parametrize("fmt", ["kernel", "oci"])
@pytest.mark.parametrize("name", sorted(SECOND))
def test_second_request_mid_copy_behaves_as_on_the_kernel(make_stack, name, fmt):
    second = SECOND[name]
    expected = run_on_kernel(make_stack(tag="kernel-"), second)
    stack = make_stack(tag="unionfs-")
    make_layers(stack)
    env = {"UNIONFS_COPY_DELAY": str(DELAY)}
    with stack.unionfs(options=[f"whiteout={fmt}"], env=env):
        outcome = run_mid_copy(stack, second)
        seen = view(stack.mnt)
    assert outcome == {"first": "ok", "second": "ok"}
    assert seen == expected
    with stack.unionfs(options=[f"whiteout={fmt}"]):
        assert view(stack.mnt) == expected      # nothing comes back after a remount
    upper = set(os.listdir(stack.upper))
    for visible in expected:
        assert ".wh." + visible not in upper, f"a whiteout beside the visible {visible}"


def test_requests_elsewhere_are_answered_during_a_copy(stack):
    make_layers(stack)
    with stack.unionfs(env={"UNIONFS_COPY_DELAY": str(DELAY)}):
        t = threading.Thread(target=write_open, args=(stack.mnt / "f", 0, b"A"))
        t.start()
        time.sleep(ARRIVE)
        assert (stack.mnt / "other").read_bytes() == b"other"
        assert sorted(os.listdir(stack.mnt)) == ["f", "other"]
        answered_mid_copy = t.is_alive()
        t.join()
    assert answered_mid_copy, "the other requests waited for the copy-up"
