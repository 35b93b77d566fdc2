"""Serve a layer stack at a mountpoint: checks, daemonizing, signals, unmount.

`start(cfg)` returns once the mount is live: in the foreground it then serves
until unmounted or sent SIGINT/SIGTERM; otherwise a daemon child serves and
the parent exits 0 (or reports the child's one-line error and exits 1).
After an unmount the server exits at once, so no layer fd outlives the mount.
"""
import fcntl
import logging
import os
import signal
import stat

from .options import MountConfig

log = logging.getLogger("unionfs")


class MountError(Exception):
    """A problem with the layers or the mountpoint: exit status 1."""


def _real_dir(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise MountError(f"{what} {path!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{what} {path!r} is not a directory")
    return os.path.realpath(path)


def _inside(a: str, b: str) -> bool:
    """Is a equal to or below b?"""
    return a == b or a.startswith(b.rstrip("/") + "/")


def _mounted_workdirs() -> set:
    dirs = set()
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[2] == "overlay":
                    for opt in parts[3].split(","):
                        if opt.startswith("workdir="):
                            dirs.add(opt[len("workdir="):].replace("\\040", " "))
    except OSError:
        pass
    return dirs


def validate(cfg: MountConfig) -> MountConfig:
    """Check and normalise every path; raise MountError with a one-line reason."""
    if not cfg.lowers:
        raise MountError("no lower layer given (lowerdir= or --lower)")
    if cfg.mountpoint is None:
        raise MountError("no mountpoint given")
    if (cfg.upper is None) != (cfg.work is None):
        raise MountError("upperdir and workdir must be given together")
    lowers = [_real_dir(p, "lower layer") for p in cfg.lowers]
    upper = _real_dir(cfg.upper, "upper layer") if cfg.upper else None
    work = _real_dir(cfg.work, "workdir") if cfg.work else None
    mnt = _real_dir(cfg.mountpoint, "mountpoint")
    if os.path.ismount(mnt) and mnt not in lowers:
        raise MountError(f"mountpoint {mnt!r} is already a mount point")
    if upper:
        for low in lowers:
            if _inside(upper, low) or _inside(low, upper):
                raise MountError(f"upper layer {upper!r} and lower layer {low!r} overlap")
        if _inside(work, upper) or _inside(upper, work):
            raise MountError(f"workdir {work!r} and upper layer {upper!r} overlap")
        if os.stat(work).st_dev != os.stat(upper).st_dev:
            raise MountError(f"workdir {work!r} is not on the upper layer's filesystem")
        if work in _mounted_workdirs():
            raise MountError(f"workdir {work!r} is in use by another overlay mount")
    for layer in lowers + ([upper, work] if upper else []):
        if mnt != layer and _inside(mnt, layer):
            raise MountError(f"mountpoint {mnt!r} is inside layer {layer!r}")
    cfg.lowers, cfg.upper, cfg.work, cfg.mountpoint = lowers, upper, work, mnt
    return cfg


def _lock_workdir(work: str) -> int:
    """Hold an exclusive lock on the workdir for the server's lifetime."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"workdir {work!r} is in use by another unionfs mount") from None
    return fd


def fuse_options(cfg: MountConfig) -> set:
    opts = {"fsname=" + cfg.source.replace(",", "_"), "subtype=unionfs", "default_permissions"}
    if os.geteuid() == 0:
        opts.add("allow_other")
        if "nodev" not in cfg.flags:
            opts.add("dev")
        if "nosuid" not in cfg.flags:
            opts.add("suid")
    for flag in cfg.flags:
        if flag == "rw":
            continue
        opts.add(flag)
    if cfg.upper is None:
        opts.add("ro")
    return opts


def _open_union(cfg: MountConfig):
    from ..fs.union import Union
    try:
        return Union(cfg.lowers, cfg.upper, cfg.work, whiteout_format=cfg.whiteout_format,
                     durable=not cfg.volatile, metacopy=cfg.metacopy)
    except OSError as e:
        raise MountError(f"cannot open layers: {e.strerror} ({e.filename!r})") from None


def _serve(cfg: MountConfig, ready_fd: int | None) -> int:
    """Mount and serve; write b'ok' or an error line to ready_fd once mounted."""
    import pyfuse3
    import trio

    from ..fuse.ops import Operations

    def report(msg: bytes):
        if ready_fd is not None:
            os.write(ready_fd, msg)
            os.close(ready_fd)

    try:
        lock_fd = _lock_workdir(cfg.work) if cfg.work else None
        union = _open_union(cfg)
    except MountError as e:
        report(str(e).encode())
        raise
    ops = Operations(union)
    try:
        pyfuse3.init(ops, cfg.mountpoint, fuse_options(cfg))
    except RuntimeError as e:
        union.close()
        msg = f"cannot mount on {cfg.mountpoint!r}: {e}"
        report(msg.encode())
        raise MountError(msg) from None
    report(b"ok")
    if ready_fd is not None:
        _detach_stdio()

    async def main():
        async with trio.open_nursery() as nursery:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                               signal.SIGHUP) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return
            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        # release the layers first: whoever unmounted us may unmount them next
        union.close()
        if lock_fd is not None:
            os.close(lock_fd)
        # after an external unmount the session is gone; unmounting again is harmless
        try:
            pyfuse3.close(unmount=True)
        except Exception:   # noqa: BLE001 - best effort on the way out
            pass
    return 0


def _detach_stdio():
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    if not log.isEnabledFor(logging.DEBUG):     # --debug keeps logging to stderr
        os.dup2(devnull, 2)
    os.close(devnull)


def start(cfg: MountConfig) -> int:
    validate(cfg)
    logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.WARNING,
                        format="unionfs: %(levelname)s %(message)s")
    if cfg.foreground:
        return _serve(cfg, None)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        os.chdir("/")
        status = 1
        try:
            status = _serve(cfg, wfd)
        except MountError:
            pass
        except BaseException:  # noqa: BLE001 - a daemon has nobody to raise to
            log.exception("server failed")
        finally:
            os._exit(status)
    os.close(wfd)
    chunks = []
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(rfd)
    answer = b"".join(chunks)
    if answer == b"ok":
        return 0
    os.waitpid(pid, 0)
    raise MountError(answer.decode(errors="replace") or "the server died before mounting")


def server_pid(mnt: str) -> int | None:
    """The pid of the server of a unionfs mount (from the root's stats xattr)."""
    import json
    try:
        return json.loads(os.getxattr(mnt, "user.unionfs.stats"))["pid"]
    except (OSError, ValueError, KeyError):
        return None


def unmount(mountpoint: str, timeout: float = 10.0) -> None:
    """Unmount, then wait until the server has exited (its layers are free)."""
    import subprocess
    import time
    mnt = os.path.realpath(mountpoint)
    if not os.path.ismount(mnt):
        raise MountError(f"{mnt!r} is not mounted")
    pid = server_pid(mnt)
    try:
        _umount2(mnt)
    except OSError:
        res = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if res.returncode != 0:
            raise MountError(f"cannot unmount {mnt!r}: {res.stderr.strip()}") from None
    deadline = time.monotonic() + timeout
    while pid is not None and os.path.exists(f"/proc/{pid}/fd/0"):
        if time.monotonic() > deadline:
            raise MountError(f"the server of {mnt!r} (pid {pid}) did not exit")
        time.sleep(0.002)


def _umount2(mnt: str) -> None:
    import ctypes
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.umount2(mnt.encode(), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), mnt)

