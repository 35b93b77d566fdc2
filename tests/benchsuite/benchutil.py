"""Running `unionfs bench` from the tests: the install under test's command,
and one run's records."""
import json
import os
import shutil
import subprocess
import sys


def unionfs_command():
    beside = os.path.join(os.path.dirname(sys.executable), "unionfs")
    return [beside] if os.path.exists(beside) else [shutil.which("unionfs") or "unionfs"]


def bench(*args, timeout=200):
    return subprocess.run(unionfs_command() + ["bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def bench_run(out, *args, timeout=200):
    """(records, log) of a bench run writing to `out`; fails the test if it failed."""
    proc = bench(*args, "--out", str(out), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "records.jsonl")) as f:
        return [json.loads(line) for line in f], proc.stderr
