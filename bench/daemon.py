"""The daemon's benchmarks: what a mount costs with pre-started servers.

Interleaved rounds (each round runs every contender once), medians:
- mount_first_stat: `unionfs mount` through a running daemon, then one
  stat in the mount, against fuse-overlayfs's mount + stat, and unionfs
  without a daemon (a server started for the mount); and fuse-unionfs's
  command line through the daemon: the installed fuse-unionfs (the C
  client, client/) and the Python program (fuse-unionfs-py), side by side;
- podman_run: `podman run --rm IMG true` (root) with fuse-unionfs through
  the daemon against fuse-overlayfs (and with fuse-unionfs-py, the Python
  client, as the mount program, where it is installed);
- run_true: `unionfs run --lower ROOTFS -- /bin/true` end to end through
  the daemon and without it, against `podman run --rm IMG true` with
  fuse-overlayfs;
- api_stats: one GET /v1/mounts/ID/stats round trip (the client's
  connect, request, the server's answer through its control socket);
- daemon memory (VmRSS, KiB) with 20 mounts up, and the servers' median.

`measure_daemon()` returns records {impl, workload, metric, value, unit, rep};
`python -m bench.daemon` prints a table.
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

UNIONFS = os.path.join(os.path.dirname(sys.executable), "unionfs")
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
FUSE_UNIONFS = os.path.join(os.path.dirname(sys.executable), "fuse-unionfs")
FUSE_UNIONFS_PY = os.path.join(os.path.dirname(sys.executable), "fuse-unionfs-py")


def _ms(start):
    return (time.perf_counter() - start) * 1000


def _record(records, impl, workload, value, unit, rep):
    records.append({"impl": impl, "workload": workload, "metric": workload, "value": value,
                    "unit": unit, "rep": rep})


class _Daemon:
    def __init__(self, root, pool=4):
        self.socket = os.path.join(root, "api.sock")
        self.proc = subprocess.Popen([UNIONFS, "daemon", "--socket", self.socket,
                                      "--pool", str(pool)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket + ".mount"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.01)
        self.env = {**os.environ, "UNIONFS_SOCKET": self.socket}

    def api(self, path):
        from unionfs.daemon import client
        return client.api("GET", path, socket_path=self.socket)[1]

    def wait_pool(self, ready):
        deadline = time.monotonic() + 60
        while self.api("/v1/info")["pool"]["ready"] < ready:
            if time.monotonic() > deadline:
                raise RuntimeError("the pool did not fill")
            time.sleep(0.05)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def _layers(root, name):
    base = os.path.join(root, name)
    for d in ("l", "u", "w", "m"):
        os.makedirs(os.path.join(base, d))
    with open(os.path.join(base, "l", "f"), "w") as f:
        f.write("x")
    return [os.path.join(base, d) for d in ("l", "u", "w", "m")]


def _mount_and_stat(argv, mnt, env=None):
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    os.stat(os.path.join(mnt, "f"))
    elapsed = _ms(start)
    subprocess.run(["umount", mnt], check=True)
    return elapsed


def measure_daemon(reps=15, notes=None, log=print):
    notes = {} if notes is None else notes
    records = []
    root = tempfile.mkdtemp(prefix="unionfs-bench-daemon-")
    daemon = _Daemon(root)
    try:
        daemon.wait_pool(4)
        no_daemon = {**os.environ, "UNIONFS_NO_DAEMON": "1"}
        fuse_programs = {"fuse-unionfs-daemon": FUSE_UNIONFS}
        if os.path.exists(FUSE_UNIONFS_PY):
            fuse_programs["fuse-unionfs-py-daemon"] = FUSE_UNIONFS_PY
        for rep in range(reps):
            for impl in ("fuse-overlayfs", "unionfs-daemon", "unionfs-no-daemon",
                         *fuse_programs):
                low, up, work, mnt = _layers(root, f"{impl}-{rep}")
                if impl == "fuse-overlayfs" or impl in fuse_programs:
                    argv = [fuse_programs.get(impl, FUSE_OVERLAYFS),
                            "-o", f"lowerdir={low},upperdir={up},workdir={work}", mnt]
                    value = _mount_and_stat(argv, mnt, daemon.env)
                else:
                    argv = [UNIONFS, "mount", "--lower", low, "--upper", up, "--work", work, mnt]
                    value = _mount_and_stat(argv, mnt, daemon.env if impl == "unionfs-daemon"
                                            else no_daemon)
                _record(records, impl, "mount_first_stat", value, "ms", rep)
            daemon.wait_pool(2)
        # the API round trip and memory, with 20 mounts up
        mounts = []
        for i in range(20):
            low, up, work, mnt = _layers(root, f"many-{i}")
            subprocess.run([UNIONFS, "mount", "--lower", low, "--upper", up, "--work", work, mnt],
                           check=True, env=daemon.env)
            mounts.append(mnt)
        listed = daemon.api("/v1/mounts")
        from unionfs.daemon import client
        for rep in range(reps):
            start = time.perf_counter()
            client.api("GET", f"/v1/mounts/{listed[rep % len(listed)]['id']}/stats",
                       socket_path=daemon.socket)
            _record(records, "unionfs-daemon", "api_stats", _ms(start), "ms", rep)
        info = daemon.api("/v1/info")
        _record(records, "unionfs-daemon", "daemon_rss_20_mounts",
                info["memory"]["vmrss_kib"], "KiB", 0)
        servers = [daemon.api(f"/v1/mounts/{m['id']}/stats")["memory"]["vmrss_kib"]
                   for m in listed]
        _record(records, "unionfs-daemon", "server_rss_median", statistics.median(servers),
                "KiB", 0)
        for mnt in mounts:
            subprocess.run(["umount", mnt], check=True)
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", root])
    return records


def measure_podman(reps=10, notes=None):
    """podman run --rm IMG true: fuse-overlayfs against fuse-unionfs through a daemon."""
    from .podman import Podman, build_rootfs_tar
    records = []
    root = tempfile.mkdtemp(prefix="udp-", dir="/tmp")
    daemon = _Daemon(root)
    tar = build_rootfs_tar(os.path.join(root, "rootfs.tar"))

    class Through(Podman):
        def env(self):
            return {**super().env(), "UNIONFS_SOCKET": daemon.socket}
    engines = {"fuse-overlayfs": Podman("fuse-overlayfs", os.path.join(root, "o")),
               "fuse-unionfs-daemon": Through("fuse-unionfs", os.path.join(root, "u"))}
    if os.path.exists(FUSE_UNIONFS_PY):
        engines["fuse-unionfs-py-daemon"] = Through("fuse-unionfs", os.path.join(root, "p"))
        engines["fuse-unionfs-py-daemon"].path = FUSE_UNIONFS_PY
    try:
        for pm in engines.values():
            pm.load_image(tar)
            pm.run("run", "--rm", *pm.container_flags(), "localhost/busybox:latest", "true")
        for rep in range(reps):
            for impl, pm in engines.items():
                daemon.wait_pool(2)
                start = time.perf_counter()
                subprocess.run(pm.run_argv("true"), check=True, env=pm.env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _record(records, impl, "podman_run", _ms(start), "ms", rep)
    finally:
        for pm in engines.values():
            pm.close()
        daemon.stop()
        subprocess.run(["rm", "-rf", root])
    return records


def measure_run(reps=10, notes=None):
    """`unionfs run --lower ROOTFS -- /bin/true` end to end, through the daemon
    and with a server of its own, against `podman run --rm IMG true` with
    fuse-overlayfs (the same busybox tree as its image)."""
    from .podman import Podman, build_rootfs_tar
    from .startup import build_busybox_rootfs
    records = []
    root = tempfile.mkdtemp(prefix="udr-", dir="/tmp")
    daemon = _Daemon(root)
    rootfs = build_busybox_rootfs(os.path.join(root, "rootfs"))
    podman = Podman("fuse-overlayfs", os.path.join(root, "o"))
    run = [UNIONFS, "run", "--lower", rootfs, "--", "/bin/true"]
    contenders = {
        "unionfs-run-daemon": (run, daemon.env),
        "unionfs-run": (run, {**os.environ, "UNIONFS_NO_DAEMON": "1"}),
        "podman(fuse-overlayfs)": (podman.run_argv("true"), podman.env()),
    }
    try:
        podman.load_image(build_rootfs_tar(os.path.join(root, "rootfs.tar")))
        for argv, env in contenders.values():     # warm caches, first-run set-up
            subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
        for rep in range(reps):
            for impl, (argv, env) in contenders.items():
                daemon.wait_pool(2)
                start = time.perf_counter()
                subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                _record(records, impl, "run_true", _ms(start), "ms", rep)
    finally:
        podman.close()
        daemon.stop()
        subprocess.run(["rm", "-rf", root])
    return records


def medians(records):
    groups = {}
    for r in records:
        groups.setdefault((r["workload"], r["impl"]), []).append(r["value"])
    return {k: statistics.median(v) for k, v in groups.items()}


def format_table(records):
    med = medians(records)
    peers = {"mount_first_stat": "fuse-overlayfs", "podman_run": "fuse-overlayfs",
             "run_true": "podman(fuse-overlayfs)"}
    lines = ["| workload | target | median | ratio |", "|---|---|---:|---:|"]
    for (workload, impl), value in sorted(med.items()):
        peer = peers.get(workload)
        ratio = f"{value / med[(workload, peer)]:.2f}x {peer}" \
            if peer and (workload, peer) in med and impl != peer else ""
        unit = next(r["unit"] for r in records if r["workload"] == workload)
        lines.append(f"| {workload} | {impl} | {value:.1f} {unit} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m bench.daemon")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--podman", action="store_true", help="also podman run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    records = measure_daemon(args.reps)
    if args.podman:
        records += measure_podman(args.reps) + measure_run(args.reps)
    print(json.dumps(records) if args.json else format_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
