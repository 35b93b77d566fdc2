"""podman on a FUSE mount program: the machinery, and its start-up benchmark.

Machinery (shared with tests/podman): podman on a fresh storage root with a
chosen mount program, as root or as a plain user made for the purpose
(useradd, subuids, /dev/fuse usable, XDG_RUNTIME_DIR; removed with every
process it left), the command line this host needs (cgroupfs, file events,
runc, the hard ulimits root cannot raise) and a one-layer busybox image
built offline from the host's busybox-static.

Benchmark (`python -m bench.podman`): `podman run --rm IMG true` with
fuse-unionfs against fuse-overlayfs, as root and rootless (when fuse-unionfs
is executable by a plain user), interleaved in a seeded shuffled order per
round, medians and ratios; then the mount program alone (mount to ready,
unmount) and where fuse-unionfs's start goes (interpreter, imports).
"""
import contextlib
import io
import os
import pwd
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

PODMAN = shutil.which("podman") or "/usr/bin/podman"
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
IMAGE = "localhost/busybox:latest"
# Root lacks CAP_SYS_RESOURCE here: podman's default limits are above the hard ones.
ROOT_ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
COMMAND_TIMEOUT = 120
BUSYBOX = "/bin/busybox"


def fuse_unionfs_program() -> str:
    """UNIONFS_FUSE_UNIONFS, else the fuse-unionfs next to this interpreter."""
    explicit = os.environ.get("UNIONFS_FUSE_UNIONFS")
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), "fuse-unionfs")
    return beside if os.path.exists(beside) else (shutil.which("fuse-unionfs") or beside)


def program_path(name: str) -> str:
    return {"fuse-overlayfs": FUSE_OVERLAYFS, "fuse-unionfs": fuse_unionfs_program()}[name]


def others_can_run(path: str) -> bool:
    """Can a user who is neither owner nor in the group execute `path`, its
    `#!` interpreter included? Read from mode bits along every path (root's
    os.access would say yes to anything)."""
    def reachable(p):
        parts = os.path.realpath(p).split("/")
        return all(os.stat("/".join(parts[:i]) or "/").st_mode & stat.S_IXOTH
                   for i in range(2, len(parts)))

    try:
        real = os.path.realpath(path)
        mode = os.stat(real).st_mode
        if not (reachable(path) and mode & stat.S_IXOTH):
            return False
        with open(real, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    if not head.startswith(b"#!"):
        return True
    interpreter = head[2:].split(b"\n", 1)[0].split()[0].decode()
    return bool(mode & stat.S_IROTH) and others_can_run(interpreter)


def build_rootfs_tar(path: str) -> str:
    """A one-layer busybox rootfs as a tar: a root-only 0600 /etc/secret, a
    file owned by 1000 (/data/owned), an image directory to delete and make
    again (/data/sub), a setuid file, a 1777 /tmp. World-readable."""
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    with tarfile.open(path, "w") as tar:
        def add(name, kind=tarfile.DIRTYPE, mode=0o755, uid=0, data=b"", link=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, uid, uid
            info.mtime, info.linkname, info.size = 1700000000, link, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev",
                  "root", "data", "data/sub", "home", "home/user"):
            add(d, uid=1000 if d == "home/user" else 0)
        add("tmp", mode=0o1777)
        add("bin/busybox", tarfile.REGTYPE, data=busybox)
        for applet in applets:
            if applet != "bin/busybox":
                add(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644,
            data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, data=b"root:x:0:\nuser:x:1000:\n")
        add("etc/secret", tarfile.REGTYPE, 0o600, data=b"root only\n")
        add("data/sub/f", tarfile.REGTYPE, 0o644, data=b"image file\n")
        add("data/owned", tarfile.REGTYPE, 0o644, uid=1000, data=b"user's\n")
        add("data/suid", tarfile.REGTYPE, 0o4755, data=b"#!/bin/sh\n")
    os.chmod(path, 0o644)
    return path


class PodmanUser:
    """A plain user made for rootless podman: subuids, a runtime dir,
    /dev/fuse usable (no udev here: it is 0600). `remove` kills its
    processes by pid and deletes it, its home and what it changed."""

    def __init__(self, name: str):
        self.name = name
        self._added_subids = False
        self._fuse_mode = None
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True,
                       capture_output=True)
        pw = pwd.getpwnam(name)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        for path in ("/etc/subuid", "/etc/subgid"):
            with open(path) as f:
                if any(line.startswith(name + ":") for line in f):
                    continue
            with open(path, "a") as f:       # a useradd without SUB_UID_COUNT
                f.write(f"{name}:{300000 + 65536 * (self.uid % 64)}:65536\n")
            self._added_subids = True
        self.runtime_dir = f"/tmp/{name}-runtime"
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        os.chown(self.runtime_dir, self.uid, self.gid)
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        if mode & 0o006 != 0o006:
            self._fuse_mode = mode
            os.chmod("/dev/fuse", 0o666)

    def command(self, argv) -> list:
        env = [f"HOME={self.home}", f"XDG_RUNTIME_DIR={self.runtime_dir}", f"USER={self.name}",
               "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        return ["runuser", "-u", self.name, "--", "env", "-i", *env, *argv]

    def subids(self) -> range:
        with open("/etc/subuid") as f:
            for line in f:
                name, start, count = line.strip().split(":")
                if name == self.name:
                    return range(int(start), int(start) + int(count))
        return range(0)

    def pids(self) -> list:
        """Processes running as the user or one of its subordinate uids."""
        ids, found = self.subids(), []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if uid == self.uid or uid in ids:
                found.append(int(entry))
        return found

    def pause_pid(self) -> int | None:
        """podman's pause process, which holds the user's namespaces."""
        try:
            with open(os.path.join(self.runtime_dir, "libpod", "tmp", "pause.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        subprocess.run(["userdel", "-r", "-f", self.name], capture_output=True)
        if self._added_subids:
            for path in ("/etc/subuid", "/etc/subgid"):
                with open(path) as f:
                    kept = [line for line in f if not line.startswith(self.name + ":")]
                with open(path, "w") as f:
                    f.writelines(kept)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)
        if self._fuse_mode is not None:
            os.chmod("/dev/fuse", self._fuse_mode)


class Podman:
    """podman on a fresh storage root with one mount program, as root
    (user=None) or as a PodmanUser; `close` removes everything it made."""

    def __init__(self, program: str, storage: str, user: PodmanUser | None = None,
                 storage_opts=()):
        self.program, self.path = program, program_path(program)
        self.user, self.storage = user, storage
        self.root = os.path.join(storage, "root")
        # podman refuses a runroot longer than 50 characters
        self.runroot = os.path.join(user.runtime_dir if user else storage,
                                    "r" + os.path.basename(storage)[-8:])
        self.storage_opts = tuple(storage_opts)
        os.makedirs(storage, exist_ok=True)
        if user:
            os.chown(storage, user.uid, user.gid)

    @property
    def rootless(self) -> bool:
        return self.user is not None

    def argv(self, *args) -> list:
        argv = [PODMAN, "--root", self.root, "--runroot", self.runroot,
                "--storage-driver", "overlay",
                "--storage-opt", f"overlay.mount_program={self.path}"]
        for opt in self.storage_opts:
            argv += ["--storage-opt", opt]
        argv += ["--cgroup-manager", "cgroupfs", "--events-backend", "file",
                 "--runtime", "runc", *args]
        return self.user.command(argv) if self.user else argv

    def env(self):
        return None if self.user else {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                       "HOME": "/root"}

    def run(self, *args, check=True, timeout=COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr.strip()}")
        return proc

    def container_flags(self) -> tuple:
        return ("--network", "none") + (() if self.rootless else ROOT_ULIMITS)

    def run_argv(self, *command, image=IMAGE) -> list:
        """The argv of `podman run --rm` of `command` (for timing)."""
        return self.argv("run", "--rm", *self.container_flags(), image, *command)

    def run_container(self, script: str, *flags, image=IMAGE, rm=True, check=False):
        """`podman run` of `sh -c script`: the CompletedProcess."""
        return self.run("run", *(["--rm"] if rm else []), *self.container_flags(), *flags,
                        image, "sh", "-c", script, check=check)

    def load_image(self, rootfs_tar: str) -> None:
        self.run("import", "-q", "--change", "CMD=/bin/sh", rootfs_tar, IMAGE)

    def close(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("rm", "-af", "-t", "0", check=False, timeout=60)
        if not self.user:       # a rootless user's mounts die with its pause process
            with open("/proc/self/mountinfo") as f:
                mounts = [line.split()[4] for line in f]
            for mnt in reversed([m for m in mounts if m.startswith(self.storage)]):
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(self.storage, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


# ---- the benchmark ---------------------------------------------------------------

PROGRAMS = ("fuse-overlayfs", "fuse-unionfs")


def _timed(argv, env=None) -> float:
    """Seconds to run argv to completion (output discarded); raises on failure."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                          timeout=COMMAND_TIMEOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
    return elapsed


def measure_podman_run(reps: int, modes, workdir: str, notes: dict, seed: int = 0) -> list:
    """`podman run --rm IMG true`, one storage root per (mode, program), all
    interleaved; records {impl, workload, metric, value (ms), unit, rep}."""
    tar = build_rootfs_tar(os.path.join(workdir, "busybox.tar"))
    user, made = None, []
    try:
        for mode in modes:
            if mode == "rootless":
                user = PodmanUser(f"ufsbench{os.getpid() % 10000}")
            for program in PROGRAMS:
                base = user.home if mode == "rootless" else workdir
                pm = Podman(program, tempfile.mkdtemp(prefix="pm-", dir=base),
                            user if mode == "rootless" else None)
                pm.load_image(tar)
                made.append((mode, pm))
        records, order, rng = [], list(made), random.Random(seed)
        for rep in range(-1, reps):          # round -1 warms up every storage
            rng.shuffle(order)
            for mode, pm in order:
                key = f"{mode}/{pm.program}"
                if key in notes:
                    continue
                try:
                    seconds = _timed(pm.run_argv("true"), pm.env())
                except RuntimeError as e:
                    notes[key] = f"failed: {e}"
                    continue
                if rep >= 0:
                    records.append({"impl": pm.program, "workload": f"podman-run-{mode}",
                                    "metric": "startup_time", "value": seconds * 1000,
                                    "unit": "ms", "rep": rep})
        return records
    finally:
        for _, pm in made:
            pm.close()
        if user:
            user.remove()


def _remove_tree(path: str) -> None:
    """rmtree, retried: a server may still be emptying its workdir just after
    `umount` returned (seen with fuse-unionfs: its ready inodes vanish mid-walk)."""
    for _ in range(40):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"cannot remove {path}")


def measure_mount(reps: int, workdir: str, seed: int = 0) -> list:
    """The mount program alone, as root: from exec to the mount being live
    (the program daemonizes and exits then), and `umount` to its return."""
    lower = os.path.join(workdir, "lower")
    os.makedirs(lower, exist_ok=True)
    with tarfile.open(build_rootfs_tar(os.path.join(workdir, "mount.tar"))) as tar:
        # our own tar; Debian's 3.11.2 predates extraction filters (3.11.4)
        trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(lower, **trusted)
    records, rng, order = [], random.Random(seed), list(PROGRAMS)
    for rep in range(-1, reps):
        rng.shuffle(order)
        for program in order:
            run = tempfile.mkdtemp(prefix="mnt-", dir=workdir)
            upper, work, mnt = (os.path.join(run, d) for d in ("upper", "work", "mnt"))
            for d in (upper, work, mnt):
                os.mkdir(d)
            ready = _timed([program_path(program), "-o",
                            f"lowerdir={lower},upperdir={upper},workdir={work}", mnt])
            gone = _timed(["umount", mnt])
            _remove_tree(run)
            if rep >= 0:
                for metric, seconds in (("mount_ready_time", ready), ("umount_time", gone)):
                    records.append({"impl": program, "workload": "mount-program",
                                    "metric": metric, "value": seconds * 1000, "unit": "ms",
                                    "rep": rep})
    return records


def interpreter_profile(reps: int) -> dict:
    """Where a fuse-unionfs start goes before it mounts anything: the
    interpreter alone, with site, and the imports the server needs."""
    program = fuse_unionfs_program()
    with open(program, "rb") as f:
        head = f.read(256)
    python = head[2:].split(b"\n", 1)[0].split()[0].decode() if head.startswith(b"#!") \
        else sys.executable
    steps = {"python -I -S -c pass": [python, "-I", "-S", "-c", "pass"],
             "python -c pass (site)": [python, "-c", "pass"],
             "+ import unionfs.cli": [python, "-c", "import unionfs.cli"],
             "+ import pyfuse3, trio": [python, "-c", "import pyfuse3, trio"],
             "+ the server's imports": [python, "-c",
                                        "import unionfs.serve.server, unionfs.fuse.ops"]}
    return {name: statistics.median(_timed(argv) for _ in range(reps)) * 1000
            for name, argv in steps.items()}


def import_times(top: int = 12) -> list:
    """The slowest imports (cumulative µs) of one real fuse-unionfs mount, read
    from -X importtime; the server is the forked child, so its imports are
    the launcher's."""
    with tempfile.TemporaryDirectory(prefix="unionfs-imports-") as d:
        for sub in ("lower", "upper", "work", "mnt"):
            os.mkdir(os.path.join(d, sub))
        log = os.path.join(d, "stderr")
        with open(log, "wb") as err:
            subprocess.run([fuse_unionfs_program(), "-o", f"lowerdir={d}/lower,upperdir="
                            f"{d}/upper,workdir={d}/work", f"{d}/mnt"], stderr=err,
                           env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"), check=True,
                           timeout=COMMAND_TIMEOUT)
        subprocess.run(["umount", f"{d}/mnt"], check=True)
        rows = []
        with open(log) as f:
            for line in f:
                if line.startswith("import time:") and "|" in line and "cumulative" not in line:
                    _, cumulative, name = line[len("import time:"):].split("|")
                    if not name.startswith("  "):       # top-level imports only
                        rows.append((int(cumulative), name.strip()))
        return sorted(rows, reverse=True)[:top]


def medians(records) -> dict:
    groups = {}
    for r in records:
        groups.setdefault((r["workload"], r["metric"], r["impl"]), []).append(r["value"])
    return {key: (statistics.median(v), len(v)) for key, v in groups.items()}


def format_table(records) -> str:
    table = medians(records)
    lines = [f"{'workload':<20} {'metric':<17} {'impl':<15} {'median ms':>10} {'n':>4}  ratio"]
    for (workload, metric, impl), (value, n) in table.items():
        ref = table.get((workload, metric, "fuse-overlayfs"))
        ratio = f"{value / ref[0]:.2f}x fuse-overlayfs" if ref and impl != "fuse-overlayfs" \
            else ""
        lines.append(f"{workload:<20} {metric:<17} {impl:<15} {value:>10.1f} {n:>4}  {ratio}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m bench.podman", description=__doc__.split(
        "\n\n")[2] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--no-rootless", action="store_true", help="root only")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the mount-program and interpreter measurements")
    args = parser.parse_args(argv)
    modes = ["root"]
    notes = {}
    if args.no_rootless:
        pass
    elif others_can_run(fuse_unionfs_program()):
        modes.append("rootless")
    else:
        notes["rootless"] = (f"skipped: {fuse_unionfs_program()} is not executable by a plain "
                             "user (set UNIONFS_FUSE_UNIONFS to one that is)")
    workdir = tempfile.mkdtemp(prefix="ufsbp-", dir="/tmp")     # podman: runroot < 50 chars
    os.chmod(workdir, 0o755)
    load_before = os.getloadavg()[0]
    try:
        records = measure_podman_run(args.reps, modes, workdir, notes)
        if not args.no_profile:
            records += measure_mount(args.reps, workdir)
        print(format_table(records))
        print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
              f"({os.cpu_count()} CPUs)")
        for key, note in notes.items():
            print(f"{key}: {note}")
        if not args.no_profile:
            print("\nfuse-unionfs before the mount (median ms):")
            for name, ms in interpreter_profile(max(5, args.reps // 2)).items():
                print(f"  {name:<28} {ms:7.1f}")
            print("slowest top-level imports of one mount (cumulative ms):")
            for us, name in import_times():
                print(f"  {name:<28} {us / 1000:7.1f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
