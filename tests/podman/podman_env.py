"""podman with a FUSE mount program, as root and as a plain user: the test harness.

Owns: the busybox image the podman tests run (one layer made offline from
the host's busybox-static, with owners and modes worth checking); a fresh
storage root per test; the plain user made for the session (useradd,
subuid/subgid, /dev/fuse usable, its XDG_RUNTIME_DIR; at teardown its
processes are killed by pid and it is removed with its home); which mount
program podman gets; and the podman command line this host needs (cgroupfs,
file events, runc, the hard ulimits root cannot raise).

Environment:
  UNIONFS_FUSE_UNIONFS  the fuse-unionfs to test (default: the one next to the
      test interpreter). Rootless runs need one a plain user can execute: an
      interpreter outside /root, e.g. a venv under /opt (see podman tests'
      report in docs/rootless.md).
"""
import contextlib
import io
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

PROGRAMS = ("fuse-overlayfs", "fuse-unionfs")
MODES = ("root", "rootless")
PODMAN = shutil.which("podman") or "/usr/bin/podman"
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
IMAGE = "localhost/busybox:latest"
# Root lacks CAP_SYS_RESOURCE here: podman's default limits are above the hard ones.
ROOT_ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
COMMAND_TIMEOUT = 120


def fuse_unionfs_program() -> str:
    explicit = os.environ.get("UNIONFS_FUSE_UNIONFS")
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), "fuse-unionfs")
    return beside if os.path.exists(beside) else (shutil.which("fuse-unionfs") or beside)


def program_path(name: str) -> str:
    return {"fuse-overlayfs": FUSE_OVERLAYFS, "fuse-unionfs": fuse_unionfs_program()}[name]


def others_can_run(path: str) -> bool:
    """Can a user who is neither owner nor in the group execute `path`, its
    `#!` interpreter included? Decided from mode bits along every path, so
    it holds for any plain user (root's os.access would say yes)."""
    def reachable(p):
        p = os.path.realpath(p)
        parts = p.split("/")
        for i in range(2, len(parts)):
            d = "/".join(parts[:i]) or "/"
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        return True

    try:
        real = os.path.realpath(path)
        if not (reachable(path) and os.stat(real).st_mode & stat.S_IXOTH):
            return False
        with open(real, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    if not head.startswith(b"#!"):
        return True
    interpreter = head[2:].split(b"\n", 1)[0].split()[0].decode()
    return (os.stat(real).st_mode & stat.S_IROTH != 0) and others_can_run(interpreter)


# ---- the image --------------------------------------------------------------------

BUSYBOX = "/bin/busybox"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
GROUP = b"root:x:0:\nuser:x:1000:\n"


def build_rootfs_tar(path: str) -> str:
    """A one-layer busybox rootfs as a tar: a root-only 0600 /etc/secret, a
    file owned by 1000 (/data/owned), an image directory with content to
    delete and recreate (/data/sub), a setuid file, a 1777 /tmp."""
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()

    with tarfile.open(path, "w") as tar:
        def add(name, kind=tarfile.DIRTYPE, mode=0o755, uid=0, gid=0, data=b"", link=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
            info.mtime = 1700000000
            info.linkname = link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev",
                  "root", "data", "data/sub", "home", "home/user"):
            add(d, uid=1000 if d == "home/user" else 0, gid=1000 if d == "home/user" else 0)
        add("tmp", mode=0o1777)
        add("bin/busybox", tarfile.REGTYPE, 0o755, data=busybox)
        for applet in applets:
            if applet != "bin/busybox":
                add(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, data=PASSWD)
        add("etc/group", tarfile.REGTYPE, 0o644, data=GROUP)
        add("etc/secret", tarfile.REGTYPE, 0o600, data=b"root only\n")
        add("data/sub/f", tarfile.REGTYPE, 0o644, data=b"image file\n")
        add("data/owned", tarfile.REGTYPE, 0o644, uid=1000, gid=1000, data=b"user's\n")
        add("data/suid", tarfile.REGTYPE, 0o4755, data=b"#!/bin/sh\n")
    os.chmod(path, 0o644)
    return path


# ---- the plain user ---------------------------------------------------------------

class TestUser:
    """A user made for the session: subuids, a runtime dir, /dev/fuse usable."""

    def __init__(self, name: str):
        self.name = name
        self.added_subids = False
        self._fuse_mode = None
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True,
                       capture_output=True)
        pw = pwd.getpwnam(name)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        for path in ("/etc/subuid", "/etc/subgid"):
            with open(path) as f:
                if any(line.startswith(name + ":") for line in f):
                    continue
            with open(path, "a") as f:       # useradd without SUB_UID_COUNT
                f.write(f"{name}:{300000 + 65536 * (self.uid % 64)}:65536\n")
            self.added_subids = True
        self.runtime_dir = f"/tmp/{name}-runtime"
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        os.chown(self.runtime_dir, self.uid, self.gid)
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        if mode & 0o006 != 0o006:           # no udev here: /dev/fuse is 0600
            self._fuse_mode = mode
            os.chmod("/dev/fuse", 0o666)

    def env(self) -> list:
        return [f"HOME={self.home}", f"XDG_RUNTIME_DIR={self.runtime_dir}", f"USER={self.name}",
                "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

    def command(self, argv) -> list:
        return ["runuser", "-u", self.name, "--", "env", "-i", *self.env(), *argv]

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
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            uid = int(line.split()[1])
                            if uid == self.uid or uid in ids:
                                found.append(int(entry))
                            break
            except OSError:
                continue
        return found

    def pause_pid(self) -> int | None:
        """podman's pause process, which holds the user's namespaces."""
        try:
            with open(os.path.join(self.runtime_dir, "libpod", "tmp", "pause.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def kill_processes(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def remove(self) -> None:
        self.kill_processes()
        subprocess.run(["userdel", "-r", "-f", self.name], capture_output=True)
        if self.added_subids:
            for path in ("/etc/subuid", "/etc/subgid"):
                with open(path) as f:
                    kept = [line for line in f if not line.startswith(self.name + ":")]
                with open(path, "w") as f:
                    f.writelines(kept)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)
        if self._fuse_mode is not None:
            os.chmod("/dev/fuse", self._fuse_mode)


# ---- podman ------------------------------------------------------------------------

class Podman:
    """podman on a fresh storage root with one mount program, as root
    (user=None) or as the test user; `close` removes everything it made."""

    def __init__(self, program: str, storage: str, user: TestUser | None = None,
                 storage_opts=()):
        self.program = program
        self.path = program_path(program)
        self.user = user
        self.storage = storage
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

    def run(self, *args, check=True, timeout=COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        env = None if self.user else {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                      "HOME": "/root"}
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr.strip()}")
        return proc

    def container_flags(self) -> tuple:
        return ("--network", "none") + (() if self.rootless else ROOT_ULIMITS)

    def run_container(self, script: str, *flags, image=IMAGE, rm=True, check=False):
        """`podman run` of `sh -c script`: the CompletedProcess."""
        args = ["run", *(["--rm"] if rm else []), *self.container_flags(), *flags,
                image, "sh", "-c", script]
        return self.run(*args, check=check)

    def load_image(self, rootfs_tar: str) -> None:
        self.run("import", "-q", "--change", "CMD=/bin/sh", rootfs_tar, IMAGE)

    def container_upper(self, name: str) -> str:
        """The upper (diff) directory of a container's layer."""
        layer = self.run("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                         name).stdout.strip()
        return layer

    def mounts_left(self) -> list:
        """Mounts under the storage root, in the namespace podman mounts in
        (for rootless, the pause process's)."""
        where = "/proc/self/mountinfo"
        if self.user and self.user.pause_pid():
            where = f"/proc/{self.user.pause_pid()}/mountinfo"
        try:
            with open(where) as f:
                return [line.split()[4] for line in f if self.storage in line.split()[4]]
        except OSError:
            return []

    def servers_left(self) -> list:
        """Processes whose command line names the storage root: mount
        program servers still running."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(self.root.encode() in a for a in argv) and \
                    not any(a.endswith(b"podman") for a in argv[:1]):
                found.append((int(entry), b" ".join(argv[:2]).decode(errors="replace")))
        return found

    def close(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("rm", "-af", "-t", "0", check=False, timeout=60)
        for mnt in reversed(self.mounts_left()):
            if not self.user:
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(self.storage, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)
