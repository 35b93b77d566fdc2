"""The debian configuration of `unionfs bench`: real programs on a Debian minbase rootfs.

One real run (`--configs debian --reps 1`, four targets, every workload): each
workload gives a time for each target, nothing fails, the merged trees match
the rootfs, and the native tree that the pyfuse3 floor mutates in place is put
back. No timing is asserted. The first run builds the rootfs with debootstrap
(about a minute here; cached in /var/tmp/unionfs-bench/debian-HASH/ after).

Without a mount: an unfinished build is never taken for a cached one, and its
leftovers are removed without deleting through what is mounted in them.
"""
import os
import subprocess

import pytest
from benchutil import bench, bench_run

from bench import correctness, debian

TARGETS = ("overlay", "fuse-overlayfs", "unionfs-volatile", "pyfuse3-floor")
FUSE_TARGETS = ("fuse-overlayfs", "unionfs-volatile", "pyfuse3-floor")
WORKLOADS = [w.name for w in debian.build_workloads()]


@pytest.fixture(scope="module")
def debian_run(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("unionfs bench mounts filesystems and needs root")
    out = tmp_path_factory.mktemp("bench-debian")
    records, log = bench_run(out, "--configs", "debian", "--reps", "1",
                             "--targets", ",".join(TARGETS), timeout=660)
    return out, records, log


@pytest.mark.timeout(720)
def test_every_workload_has_a_time_for_every_target(debian_run):
    _out, records, log = debian_run
    problems = [f"{r['impl']} {r['workload']} {r['metric']}: {r.get('reason')}"
                for r in records if r["metric"] in ("error", "skipped")]
    assert not problems, problems
    times = {(r["impl"], r["workload"]) for r in records
             if r["config"] == "debian" and r["metric"] == "time_s" and r["value"] > 0}
    missing = [(t, w) for t in TARGETS for w in WORKLOADS if (t, w) not in times]
    assert not missing, (missing, log[-2000:])


@pytest.mark.timeout(720)
def test_correctness_passes_and_fuse_targets_get_ledgers_and_memory(debian_run):
    out, records, _log = debian_run
    checks = {r["impl"]: r["value"] for r in records
              if r["workload"] == "correctness" and r["metric"] == "mismatches"}
    assert checks == {t: 0 for t in TARGETS}
    for impl in FUSE_TARGETS:
        ledgers = {r["workload"]: r for r in records
                   if r["impl"] == impl and r["metric"] == "fuse_requests"}
        assert set(ledgers) == set(WORKLOADS), impl
        assert ledgers["dpkg-i"]["ops"]["WRITE"]["count"] > 0, impl
        assert any(r["impl"] == impl and r["metric"] == "server_vmhwm_kib" for r in records)
    summary = (out / "summary.md").read_text()
    assert "## debian" in summary and "vs the pyfuse3 floor" in summary


@pytest.mark.timeout(720)
def test_the_native_tree_is_put_back_after_the_in_place_runs(debian_run):
    stack = debian.cached()
    assert stack is not None
    # the floor ran rm -rf, chmod -R, cp -a and dpkg -i on it in place
    assert correctness.compare(stack.native, stack.reference,
                               stack.meta["content_sample"]) == []
    assert not debian.mounts_below(stack.root)


def test_list_names_the_debian_config_and_its_workloads():
    proc = bench("--list", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "config   debian" in proc.stdout
    for name in WORKLOADS:
        assert name in proc.stdout


def test_an_unfinished_build_is_not_a_cached_stack_and_is_removed(tmp_path):
    params = debian.PARAMS
    final = tmp_path / f"debian-{params.digest()}"
    killed = tmp_path / f".debian-{params.digest()}.tmp-12345"
    (killed / "rootfs").mkdir(parents=True)
    (killed / ".complete").touch()       # killed between the stamp and the rename
    (killed / "meta.json").write_text("{}")
    final.mkdir()                        # a directory without the stamp (an older layout)
    (final / "meta.json").write_text("{}")
    stale = tmp_path / "debian-0123456789ab"
    (stale / "rootfs").mkdir(parents=True)
    other = tmp_path / "full-0123456789ab"  # another preset's stack: not ours
    other.mkdir()
    assert debian.cached(params, str(tmp_path)) is None
    debian._clear_leftovers(params, str(tmp_path), str(final), lambda _m: None)
    assert not killed.exists() and not stale.exists()
    assert other.exists() and final.exists()
    assert debian.cached(params, str(tmp_path)) is None


def test_leftovers_are_unmounted_before_removal_never_deleted_through(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    host = tmp_path / "host-dev"
    host.mkdir()
    (host / "keep").write_text("a file outside the cache")
    killed = tmp_path / "cache" / f".debian-{debian.PARAMS.digest()}.tmp-12345"
    proc_dir = killed / "rootfs" / "proc"
    proc_dir.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(host), str(proc_dir)], check=True)
    try:
        debian._clear_leftovers(debian.PARAMS, str(tmp_path / "cache"),
                                str(tmp_path / "cache" / "x"), lambda _m: None)
    finally:
        if debian.mounts_below(str(proc_dir)):
            subprocess.run(["umount", "-l", str(proc_dir)])
    assert not killed.exists()
    assert (host / "keep").read_text() == "a file outside the cache"
