"""Implementations under test: how to mount, unmount and find the server of each.

A target is a small class with mount(layers, upper, work, mnt), unmount(mnt)
and server_pid (the FUSE daemon, for VmHWM). `native` is the floor: the
flattened tree used in place. unionfs modes live in UNIONFS_MODES; adding a
mode is one line there.
"""
import os
import shutil
import subprocess
import sys
import time

from unionfs.sys import mountinfo

# (target name, extra `-o` options for `unionfs mount`)
UNIONFS_MODES = [
    ("unionfs", []),
    ("unionfs-volatile", ["volatile"]),
    ("unionfs-metacopy", ["metacopy=on"]),
]

MOUNT_TIMEOUT = 60
# A second unionfs to measure beside this one in the same interleaved run (an
# A/B of two commits): UNIONFS_BENCH_BASELINE=/path/to/other/venv/bin/unionfs
# adds the targets "baseline" and "baseline-volatile".
BASELINE_ENV = "UNIONFS_BENCH_BASELINE"


class MountError(Exception):
    pass


def _run(argv, timeout=MOUNT_TIMEOUT, env=None):
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise MountError(f"{argv[0]} did not return within {timeout} s") from None
    except OSError as e:
        raise MountError(f"{argv[0]}: {e.strerror}") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        raise MountError(f"{' '.join(argv[:2])}... exited {proc.returncode}: "
                         f"{msg[-1] if msg else 'no message'}")
    return proc


def is_mounted(mnt):
    return mountinfo.is_mountpoint(os.path.realpath(mnt))


def _find_server(mnt, program):
    """The live process whose argv names both the program and the mountpoint."""
    mnt = os.path.realpath(mnt).encode()
    prog = program.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.rstrip(b"/") == mnt for a in argv) and any(prog in a for a in argv[:3]):
            return int(entry)
    return None


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Target:
    name = "?"
    kind = "fuse"            # "native", "kernel" or "fuse"
    layer_format = "kernel"  # which layer copy it mounts ("native": the native tree)
    in_place = False         # works on the native tree, restored after each workload
    program = None           # executable to look for

    def __init__(self):
        self.server_pid = None

    def unavailable(self):
        """A reason this target cannot run here, or None."""
        if self.program and not shutil.which(self.program):
            return f"{self.program} is not installed (scripts/setup.sh installs it from Debian)"
        return None

    def version(self):
        return "?"

    def mount(self, layers, upper, work, mnt):
        raise NotImplementedError

    def unmount(self, mnt):
        _run(["umount", mnt])
        self._wait_server_exit()

    def _after_fuse_mount(self, mnt):
        if not is_mounted(mnt):
            raise MountError(f"{self.name}: the command returned but {mnt} is not mounted")
        self.server_pid = _find_server(mnt, self.program)

    def _wait_server_exit(self, timeout=30):
        pid, self.server_pid = self.server_pid, None
        deadline = time.monotonic() + timeout
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)

    def force_cleanup(self, mnt):
        """After a hang: lazy unmount and kill the server."""
        pid = self.server_pid
        subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
        if pid and _alive(pid):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        self._wait_server_exit(5)


class Native(Target):
    name = "native"
    kind = "native"
    in_place = True

    def version(self):
        return "-"

    def mount(self, layers, upper, work, mnt):
        raise AssertionError("native is used in place")

    def unmount(self, mnt):
        pass


class PyfuseFloor(Target):
    """bench.floor serving the native tree: what pyfuse3 and trio cost alone.
    It works on the native tree in place (restored after every workload), so
    it has no layers and no copy-up: a copy-up workload is a plain write."""
    name = "pyfuse3-floor"
    program = "bench.floor"     # a module of this package: always there
    layer_format = "native"
    in_place = True

    def __init__(self):
        super().__init__()
        self.proc = None

    def unavailable(self):
        return None

    def version(self):
        import pyfuse3
        return f"pyfuse3 {pyfuse3.__version__}"

    def mount(self, layers, upper, work, mnt):
        (tree,) = layers
        log = open(os.path.join(work, "floor.log"), "wb")
        with log:
            self.proc = subprocess.Popen([sys.executable, "-m", self.program, tree, mnt],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.force_cleanup(mnt)
                with open(os.path.join(work, "floor.log"), errors="replace") as f:
                    lines = f.read().strip().splitlines()
                raise MountError(f"{self.name}: {lines[-1] if lines else 'did not mount'}")
            time.sleep(0.002)
        self.server_pid = self.proc.pid

    def unmount(self, mnt):
        _run(["fusermount3", "-u", mnt])
        self._wait_server_exit()

    def _wait_server_exit(self, timeout=30):
        proc, self.proc = self.proc, None
        self.server_pid = None
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class KernelOverlay(Target):
    kind = "kernel"

    def __init__(self, name="overlay", extra=()):
        super().__init__()
        self.name = name
        self.extra = list(extra)

    def unavailable(self):
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                subprocess.run(["modprobe", "overlay"], stderr=subprocess.DEVNULL)
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "the kernel has no overlay filesystem"
        return None

    def version(self):
        return "kernel " + os.uname().release

    def mount(self, layers, upper, work, mnt):
        opts = [f"lowerdir={':'.join(layers)}", f"upperdir={upper}", f"workdir={work}", *self.extra]
        _run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), mnt])

    def unmount(self, mnt):
        _run(["umount", mnt])


class FuseOverlayfs(Target):
    name = "fuse-overlayfs"
    program = "fuse-overlayfs"

    def version(self):
        out = subprocess.run([self.program, "--version"], capture_output=True, text=True)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("fuse-overlayfs"):
                return line.split(":", 1)[-1].strip()
        return "?"

    def mount(self, layers, upper, work, mnt):
        opts = f"lowerdir={':'.join(layers)},upperdir={upper},workdir={work}"
        _run([self.program, "-o", opts, mnt])
        self._after_fuse_mount(mnt)

    def unmount(self, mnt):
        _run(["fusermount3", "-u", mnt])
        self._wait_server_exit()


class UnionfsFuse(Target):
    name = "unionfs-fuse"
    program = "unionfs-fuse"
    layer_format = "unionfs-fuse"

    def version(self):
        out = subprocess.run([self.program, "--version"], capture_output=True, text=True)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("unionfs-fuse version"):
                return line.split(":", 1)[-1].strip()
        return "?"

    def __init__(self):
        super().__init__()
        self.read_only_binds = []

    def mount(self, layers, upper, work, mnt):
        # Its lower branches are read-only bind mounts: under concurrent
        # copy-ups unionfs-fuse was seen appending to a file of a "RO" branch,
        # and its layers hard-link the stack's shared ones.
        self.read_only_binds = []
        try:
            for i, layer in enumerate(layers):
                ro = os.path.join(work, f"ro-{i}")
                os.mkdir(ro)
                _run(["mount", "--bind", layer, ro])
                self.read_only_binds.append(ro)
                _run(["mount", "-o", "remount,bind,ro", ro])
            branches = ":".join([f"{upper}=RW"] + [f"{ro}=RO" for ro in self.read_only_binds])
            _run([self.program, "-o", "cow,allow_other,use_ino,suid,dev,nonempty", branches, mnt])
            self._after_fuse_mount(mnt)
        except BaseException:
            self._drop_binds(lazy=True)
            raise

    def unmount(self, mnt):
        # unionfs-fuse is built on libfuse 2
        tool = "fusermount" if shutil.which("fusermount") else "fusermount3"
        _run([tool, "-u", mnt])
        self._wait_server_exit()
        self._drop_binds()

    def force_cleanup(self, mnt):
        super().force_cleanup(mnt)
        self._drop_binds(lazy=True)

    def _drop_binds(self, lazy=False):
        while self.read_only_binds:
            subprocess.run(["umount", *(["-l"] if lazy else []), self.read_only_binds.pop()],
                           stderr=subprocess.DEVNULL)


class Unionfs(Target):
    program = "unionfs"

    def __init__(self, name, options, command=None):
        super().__init__()
        self.name = name
        self.options = list(options)
        # The unionfs installed beside this interpreter is the one being measured.
        beside = os.path.join(os.path.dirname(sys.executable), "unionfs")
        self.command = command or (beside if os.path.exists(beside)
                                   else shutil.which("unionfs"))

    def unavailable(self):
        if not self.command:
            return "unionfs is not installed (run scripts/setup.sh)"
        return None

    def version(self):
        out = subprocess.run([self.command, "--version"], capture_output=True, text=True)
        return (out.stdout.strip().split() or ["?"])[-1]

    def mount(self, layers, upper, work, mnt):
        argv = [self.command, "mount"]
        for layer in layers:
            argv += ["--lower", layer]
        argv += ["--upper", upper, "--work", work]
        if self.options:
            argv += ["-o", ",".join(self.options)]
        # a server of its own for every mount: a running daemon would be another target
        _run(argv + [mnt], env={**os.environ, "UNIONFS_NO_DAEMON": "1"})
        self._after_fuse_mount(mnt)

    def unmount(self, mnt):
        _run(["fusermount3", "-u", mnt])
        self._wait_server_exit()


def all_targets():
    targets = [Native(), PyfuseFloor(), KernelOverlay("overlay"),
               KernelOverlay("overlay-metacopy", ["metacopy=on"]), FuseOverlayfs(), UnionfsFuse()]
    targets += [Unionfs(name, opts) for name, opts in UNIONFS_MODES]
    baseline = os.environ.get(BASELINE_ENV)
    if baseline:
        targets += [Unionfs("baseline", [], baseline),
                    Unionfs("baseline-volatile", ["volatile"], baseline)]
    return targets


TARGET_NAMES = [t.name for t in all_targets()]
