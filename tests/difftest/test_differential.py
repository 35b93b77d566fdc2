"""Differential test: unionfs against kernel overlayfs on random stacks and ops.

Each seed builds a random layer stack (both whiteout formats), runs a random
op sequence on a kernel overlay and on unionfs, and compares every result and
the merged trees (see docs/testing.md). A failure prints the seed, the ops up
to the divergence with both results, and the command that replays it.

Fast tier (default, CI): UNIONFS_DIFF_SEEDS seeds (40) x UNIONFS_DIFF_OPS ops (60),
plus UNIONFS_DIFF_OCI_SEEDS (10) with unionfs writing OCI-form markers, plus
UNIONFS_DIFF_SPLIT_SEEDS (8) with every lower layer on its own tmpfs, plus
UNIONFS_DIFF_META_SEEDS (6) with `-o metacopy=on`, plus the open-flag matrix.
Slow tier (`pytest -m slow`): UNIONFS_DIFF_SLOW_SEEDS (300) x UNIONFS_DIFF_SLOW_OPS
(2000); without `-m slow` it runs one seed of 300 ops as a smoke test.
UNIONFS_DIFF_TARGET=fuse-overlayfs|kernel points the same test at a peer.
"""
import os
import shutil
import stat

import pytest

from difftest import generator, harness, mounts

TARGET = os.environ.get("UNIONFS_DIFF_TARGET", "unionfs")
FAST_SEEDS = int(os.environ.get("UNIONFS_DIFF_SEEDS", "40"))
FAST_OPS = int(os.environ.get("UNIONFS_DIFF_OPS", "60"))
OCI_SEEDS = int(os.environ.get("UNIONFS_DIFF_OCI_SEEDS", "10"))  # unionfs -o whiteout=oci
SPLIT_SEEDS = int(os.environ.get("UNIONFS_DIFF_SPLIT_SEEDS", "8"))  # lowers on their own tmpfs
META_SEEDS = int(os.environ.get("UNIONFS_DIFF_META_SEEDS", "6"))  # unionfs -o metacopy=on
SLOW_SEEDS = int(os.environ.get("UNIONFS_DIFF_SLOW_SEEDS", "300"))
SLOW_OPS = int(os.environ.get("UNIONFS_DIFF_SLOW_OPS", "2000"))
SMOKE_OPS = 300  # the slow test's one seed when `-m slow` is not given
SLOW_SEED_BASE = 100_000  # the slow tier explores seeds the fast tier never runs


def pytest_generate_tests(metafunc):
    if "fast_seed" in metafunc.fixturenames:
        metafunc.parametrize("fast_seed", range(FAST_SEEDS))
    if "split_seed" in metafunc.fixturenames:
        metafunc.parametrize("split_seed", range(2000, 2000 + SPLIT_SEEDS))
    if "meta_seed" in metafunc.fixturenames:
        metafunc.parametrize("meta_seed", range(3000, 3000 + META_SEEDS))
    if "oci_seed" in metafunc.fixturenames:
        metafunc.parametrize("oci_seed", range(1000, 1000 + OCI_SEEDS))
    if "slow_seed" in metafunc.fixturenames:
        selected = "slow" in (metafunc.config.getoption("markexpr") or "")
        count = SLOW_SEEDS if selected else 1
        metafunc.parametrize("slow_seed", range(SLOW_SEED_BASE, SLOW_SEED_BASE + count))


def _filesystems():
    with open("/proc/filesystems") as f:
        return {line.split()[-1] for line in f if line.strip()}


@pytest.fixture(scope="module")
def requirements():
    if os.geteuid() != 0:
        pytest.skip("the differential test mounts overlayfs and FUSE: needs root")
    missing = {"overlay", "fuse"} - _filesystems()
    if missing:
        pytest.skip(f"kernel lacks filesystems: {sorted(missing)}")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if TARGET == "fuse-overlayfs" and not shutil.which("fuse-overlayfs"):
        pytest.skip("fuse-overlayfs not installed")
    if TARGET not in mounts.TARGETS:
        pytest.fail(f"UNIONFS_DIFF_TARGET={TARGET!r}: not one of {mounts.TARGETS}")


def _run(seed, nops, tmp_path, target=TARGET, **kw):
    div = harness.first_divergence(seed, nops, tmp_path, target,
                                   deadline=max(120.0, nops * 0.5), **kw)
    if div is not None:
        pytest.fail(div.report(), pytrace=False)


def test_oci_to_kernel_converter(tmp_path):
    """The converter the kernel side depends on: every OCI marker form and its kernel twin."""
    if os.geteuid() != 0:
        pytest.skip("writing trusted.* xattrs and char devices needs root")
    layer = tmp_path / "layer"
    (layer / "dirb").mkdir(parents=True)
    (layer / "d").mkdir()
    for marker in (".wh.a", ".wh.dirb", ".wh.c", "d/.wh..wh..opq"):
        (layer / marker).touch()
    (layer / "c").write_bytes(b"kept")
    os.utime(layer / "d", ns=(10**18, 10**18))
    converted = generator.convert_oci_to_kernel(layer)
    assert sorted(converted) == [".wh.a", ".wh.c", ".wh.dirb", "d/.wh..wh..opq"]
    assert sorted(os.listdir(layer)) == ["a", "c", "d", "dirb"]
    st = os.lstat(layer / "a")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # a whiteout for a
    assert os.getxattr(layer / "dirb", "trusted.overlay.opaque") == b"y"  # dir b stays, opaque
    assert (layer / "c").read_bytes() == b"kept"  # the same layer's c stays, marker dropped
    assert os.getxattr(layer / "d", "trusted.overlay.opaque") == b"y"
    assert os.listdir(layer / "d") == []
    assert os.lstat(layer / "d").st_mtime_ns == 10**18  # dir times kept


def test_generator_is_deterministic(tmp_path):
    """The two sides get identical copies: same seed, same bytes, modes, owners, times."""
    if os.geteuid() != 0:
        pytest.skip("the generator chowns and writes trusted.* xattrs: needs root")

    def fingerprint(root):
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
                xattrs = {x: os.getxattr(p, x, follow_symlinks=False)
                          for x in os.listxattr(p, follow_symlinks=False)}
                out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                 st.st_mtime_ns, st.st_rdev, data, xattrs)
        return out

    for copy in ("one", "two"):
        stack = generator.generate_stack(7, tmp_path / copy)
        os.rmdir(stack.mnt)
        os.rmdir(stack.work)
    assert fingerprint(tmp_path / "one") == fingerprint(tmp_path / "two")


@pytest.mark.timeout(300)
def test_open_flag_matrix(requirements, tmp_path):
    """All 48 RDONLY/WRONLY/RDWR x APPEND x TRUNC x CREAT x EXCL combinations on a lower
    file, an upper file, a missing name, a symlink to a lower file, a symlink chain,
    a dangling symlink and a merged dir, each on a fresh name."""
    div = harness.run_open_matrix(tmp_path, TARGET)
    if div is not None:
        pytest.fail(div.report(), pytrace=False)


@pytest.mark.timeout(300)
def test_mmap(requirements, tmp_path):
    """Private read mappings and shared writable mappings (a copy-up) of lower files,
    upper files and symlinks to lower files: pread and the trees must agree."""
    div = harness.run_mmap_cases(tmp_path, TARGET)
    if div is not None:
        pytest.fail(div.report(), pytrace=False)


@pytest.mark.timeout(300)
def test_differential(requirements, fast_seed, tmp_path):
    _run(fast_seed, FAST_OPS, tmp_path)


@pytest.mark.timeout(300)
def test_differential_split_fs(requirements, split_seed, tmp_path):
    """Each lower layer on its own tmpfs, so inode numbers repeat across layers: the
    union must never show two different objects under one st_ino."""
    _run(split_seed, FAST_OPS, tmp_path, split_fs=True)


@pytest.mark.timeout(300)
def test_differential_oci_upper(requirements, oci_seed, tmp_path):
    """unionfs writing OCI-form markers (`-o whiteout=oci`, its non-root mode) must show
    the same behaviour; its upper, converted, must still mount under the kernel."""
    if TARGET != "unionfs":
        pytest.skip("the OCI-upper variant is unionfs's own")
    _run(oci_seed, FAST_OPS, tmp_path, "unionfs-oci")


@pytest.mark.timeout(300)
def test_differential_metacopy(requirements, meta_seed, tmp_path):
    """unionfs with metadata-only copy-up (`-o metacopy=on`) must behave as without it;
    its upper must read back under the kernel with metacopy=on."""
    if TARGET != "unionfs":
        pytest.skip("the metacopy variant is unionfs's own")
    _run(meta_seed, FAST_OPS, tmp_path, "unionfs-metacopy")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_differential_long(requirements, slow_seed, tmp_path, request):
    selected = "slow" in (request.config.getoption("markexpr") or "")
    _run(slow_seed, SLOW_OPS if selected else SMOKE_OPS, tmp_path)
