"""Smoke test of the benchmark suite: `unionfs bench --quick` end to end.

No timing is asserted: the test checks that records, summary and charts are
produced and that the untimed correctness check passed for every target that ran.
"""
import os

import pytest
from benchutil import bench, bench_run

from bench import workloads

EXPECTED_FIELDS = {"impl", "workload", "metric", "value", "unit", "rep", "kernel", "fstype",
                   "version", "commit", "config"}


def measured(records, impl):
    """The workloads impl has a measurement for."""
    return {r["workload"] for r in records if r["impl"] == impl
            and r["metric"] not in ("skipped", "error", "mismatches")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("unionfs bench mounts filesystems and needs root")
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")
    out = tmp_path_factory.mktemp("bench-out")
    records, log = bench_run(out, "--quick")
    return out, records, log


@pytest.mark.timeout(240)
def test_quick_run_writes_records_summary_and_charts(quick_run):
    out, records, _log = quick_run
    assert records, "no records"
    for rec in records:
        assert EXPECTED_FIELDS <= set(rec), rec
    ran = {r["impl"] for r in records if r["metric"] not in ("skipped", "error")}
    assert {"native", "overlay"} <= ran
    summary = (out / "summary.md").read_text()
    assert "## Correctness" in summary and "Ratios" in summary
    charts = sorted(p.name for p in out.glob("chart-*.png"))
    assert charts, "no charts"
    for name in charts:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in summary


@pytest.mark.timeout(240)
def test_quick_run_correctness_passes_for_every_target_that_ran(quick_run):
    _out, records, _log = quick_run
    checks = {r["impl"]: r["value"] for r in records
              if r["workload"] == "correctness" and r["metric"] == "mismatches"}
    assert checks, "no target ran the correctness check"
    assert all(v == 0 for v in checks.values()), checks
    ran_workloads = {r["impl"] for r in records if r["metric"] not in ("skipped", "mismatches")}
    assert ran_workloads <= set(checks)
    skipped = [f"{r['impl']}: {r.get('reason')}" for r in records if r["metric"] == "skipped"]
    assert not skipped, "targets the bench could not run (setup.sh installs them all)"
    assert {"unionfs", "unionfs-volatile", "fuse-overlayfs", "overlay",
            "pyfuse3-floor"} <= set(checks)


@pytest.mark.timeout(240)
def test_quick_run_covers_unionfs_and_every_workload(quick_run):
    _out, records, _log = quick_run
    workloads = measured(records, "overlay")
    for name in ("append-1M", "stat-all", "readdir-bigdir", "git-status", "compileall",
                 "latency", "mount", "untar-rm", "smallfile-copyup-4threads"):
        assert name in workloads
    assert workloads <= measured(records, "unionfs"), "unionfs must have run every workload"


@pytest.mark.timeout(240)
def test_unionfs_runs_every_workload_without_error(quick_run):
    _out, records, _log = quick_run
    errors = [f"{r['impl']} {r['config']} {r['workload']}: {r.get('reason')}"
              for r in records if r["impl"].startswith("unionfs")
              and r["impl"] != "unionfs-fuse" and r["metric"] == "error"]
    assert not errors, errors
    assert any(r["impl"] == "unionfs" and r["metric"] not in ("skipped", "error", "mismatches")
               for r in records), "unionfs measured nothing"


@pytest.mark.timeout(240)
def test_the_pyfuse3_floor_runs_every_workload_and_is_a_ratio_baseline(quick_run):
    out, records, _log = quick_run
    errors = [f"{r['workload']}: {r.get('reason')}" for r in records
              if r["impl"] == "pyfuse3-floor" and r["metric"] == "error"]
    assert not errors
    assert measured(records, "unionfs") <= measured(records, "pyfuse3-floor")
    assert "vs the pyfuse3 floor" in (out / "summary.md").read_text()


@pytest.mark.timeout(240)
def test_every_fuse_target_gets_a_request_ledger(quick_run):
    out, records, _log = quick_run
    assert not [r for r in records if r["metric"] == "no-ledger"]
    ledgers = {(r["impl"], r["workload"]): r for r in records if r["metric"] == "fuse_requests"}
    for impl in ("unionfs", "fuse-overlayfs"):
        stat_all = ledgers[(impl, "stat-all")]
        assert stat_all["value"] > 0 and stat_all["complete"], stat_all
        assert stat_all["ops"]["LOOKUP"]["count"] > 0
    assert not [k for k in ledgers if k[0] in ("overlay", "native")], "a ledger for a kernel fs"
    assert "## FUSE requests" in (out / "summary.md").read_text()


@pytest.mark.timeout(240)
def test_probing_missing_names_again_sends_no_lookup_to_unionfs(quick_run):
    _out, records, _log = quick_run
    probe = [r for r in records if r["metric"] == "fuse_requests"
             and r["workload"] == "probe-missing" and r["impl"] == "unionfs"]
    assert probe
    # the first round asks for each name once; the two later rounds hit
    # the kernel's negative entries
    lookups = max(r["ops"]["LOOKUP"]["count"] for r in probe)
    assert lookups <= workloads.PROBE_DIRS * (workloads.PROBE_NAMES + 2)    # 3,039 without


def test_unknown_target_is_a_usage_error():
    proc = bench("--quick", "--targets", "no-such-fs", timeout=60)
    assert proc.returncode == 2
    assert "unknown target" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_list_names_every_target_and_workload():
    proc = bench("--quick", "--list", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("native", "overlay", "fuse-overlayfs", "unionfs-fuse", "unionfs",
                 "unionfs-volatile", "append-16M", "seqwrite-16M-fsync", "latency"):
        assert name in proc.stdout
