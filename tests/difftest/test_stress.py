"""Concurrency stress: seeded worker processes at once, on the kernel's
overlay and on unionfs (difftest/stress.py says what they do and what is
checked).

Short tier (CI): UNIONFS_STRESS_WORKERS (4) private workers and
UNIONFS_STRESS_RACERS (2) racing ones, UNIONFS_STRESS_ROUNDS (2000) ops each,
in both whiteout formats. Long tier (`pytest -m slow`): UNIONFS_STRESS_SLOW_ROUNDS
(5000) ops each over UNIONFS_STRESS_SLOW_SEEDS (5) seeds.
"""
import os

import pytest

from difftest import mounts, stress

WORKERS = int(os.environ.get("UNIONFS_STRESS_WORKERS", "4"))
RACERS = int(os.environ.get("UNIONFS_STRESS_RACERS", "2"))
ROUNDS = int(os.environ.get("UNIONFS_STRESS_ROUNDS", "2000"))
SLOW_ROUNDS = int(os.environ.get("UNIONFS_STRESS_SLOW_ROUNDS", "5000"))
SLOW_SEEDS = int(os.environ.get("UNIONFS_STRESS_SLOW_SEEDS", "5"))


def run_on(stack, kind, seed, rounds, options=()):
    stress.build_stack([str(p) for p in stack.lowers], WORKERS, seed)
    deadline = max(120.0, rounds * 0.2)
    if kind == "kernel":
        cm = mounts.kernel_overlay([str(p) for p in stack.lowers], str(stack.upper),
                                   str(stack.work), str(stack.mnt))
    else:
        cm = stack.unionfs(options=list(options))
    with cm:
        private, racing, wall = stress.run(str(stack.mnt), WORKERS, RACERS, seed, rounds,
                                           deadline)
    with (stack.kernel() if kind == "kernel" else stack.unionfs(options=list(options))):
        seen = stress.visible_contents(str(stack.mnt))
    return private, racing, seen


def check_invariants(stack, racing, seen, fmt):
    contents = list(seen.values())
    duplicated = {c for c in contents if contents.count(c) > 1}
    assert not duplicated, f"contents under two names: {sorted(duplicated)[:5]}"
    reaped = {c for _, gone, _ in racing for c in gone}
    for written, _, _ in racing:
        lost = [c for c in written if c not in reaped and c not in contents]
        assert not lost, f"fsynced and never reaped, yet gone: {lost[:5]}"
    assert not reaped & set(contents), "a reaped content is back"
    upper_shared = stack.upper / "shared"
    if fmt == "oci" and upper_shared.exists():
        names = set(os.listdir(upper_shared))
        beside = [n for n in names if not n.startswith(".wh.") and ".wh." + n in names
                  and (upper_shared / n).is_file()]
        assert not beside, f"visible names with a whiteout beside them: {beside}"


def stress_both(make_stack, seed, rounds, fmt):
    kstack = make_stack(tag="k")
    private_k, racing_k, seen_k = run_on(kstack, "kernel", seed, rounds)
    check_invariants(kstack, racing_k, seen_k, "kernel")
    ustack = make_stack(tag="u")
    private_u, racing_u, seen_u = run_on(ustack, "unionfs", seed, rounds,
                                         options=[f"whiteout={fmt}"])
    for w in range(WORKERS):
        for i, (k, u) in enumerate(zip(private_k[w], private_u[w], strict=True)):
            assert u == k, f"worker {w} op #{i}: kernel {k}, unionfs {u}"
    check_invariants(ustack, racing_u, seen_u, fmt)
    return sum(len(r) for r in private_u.values()) + sum(n for _, _, n in racing_u)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["kernel", "oci"])
def test_concurrent_workers_match_the_kernel(make_stack, fmt):
    ops = stress_both(make_stack, 1, ROUNDS, fmt)
    assert ops == (WORKERS + RACERS) * ROUNDS


def pytest_generate_tests(metafunc):
    if "slow_stress_seed" in metafunc.fixturenames:
        # without `-m slow`, one seed of the short length: a smoke run of the long tier
        selected = "slow" in (metafunc.config.getoption("markexpr") or "")
        metafunc.parametrize("slow_stress_seed", range(100, 100 + (SLOW_SEEDS if selected else 1)))


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_concurrent_workers_match_the_kernel_at_length(make_stack, slow_stress_seed, capsys,
                                                       request):
    selected = "slow" in (request.config.getoption("markexpr") or "")
    seed = slow_stress_seed
    ops = stress_both(make_stack, seed, SLOW_ROUNDS if selected else ROUNDS, "kernel")
    with capsys.disabled():
        print(f"\nstress seed {seed}: {ops} operations")
