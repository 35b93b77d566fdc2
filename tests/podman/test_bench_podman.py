"""`unionfs bench --extras podman` times podman as root and as a plain user:
both modes give records for both mount programs (a workdir the plain user
cannot enter once made every rootless run fail at `podman import`)."""
from bench import extras


def test_podman_extra_times_both_programs_root_and_rootless():
    records, _fmt, notes = extras._podman(1, print)
    assert notes == {}
    timed = {(r["workload"], r["impl"]) for r in records if r["workload"].startswith("podman-run")}
    assert timed == {(f"podman-run-{mode}", program) for mode in ("root", "rootless")
                     for program in ("fuse-overlayfs", "fuse-unionfs")}
