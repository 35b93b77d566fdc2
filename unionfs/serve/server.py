"""The serving loop: open the layers, mount them with FUSE, serve on trio, close.

`serve(cfg, ready)` runs in the server's own process (process.py decides
which one). It holds the workdir's lock, opens the union, mounts it, calls
`ready(None)` once the kernel has the mount (or `ready(message)` and raises
MountError if it could not), then serves until the mount goes away or
SIGINT/SIGTERM/SIGHUP arrives. After an unmount it returns at once, having
released every layer fd first, so that whoever unmounted can unmount the
layers next.
"""
import faulthandler
import fcntl
import functools
import logging
import os
import signal

import pyfuse3
import trio

from ..fs import idmap
from ..fs.owners import OverrideSetupError
from ..fs.profile import ProfileError
from ..fs.union import Union
from ..fuse.ops import Operations
from .config import MountConfig, shown
from .validate import MountError

log = logging.getLogger("unionfs")


def lock_workdir(work: str) -> int:
    """Hold an exclusive lock on the workdir for the server's lifetime."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"workdir {shown(work)} is in use by another unionfs mount") from None
    return fd


def fuse_options(cfg: MountConfig, allow_other: bool, dev_suid: bool = False) -> set:
    """The FUSE mount options. From the union's profile: `allow_other`
    (CAP_SYS_ADMIN in the server's own user namespace: real root, or root
    of a user namespace, where the kernel serves that namespace and its
    children), `dev_suid` (real root: device nodes and set-id bits honoured)."""
    opts = {"fsname=" + cfg.source.replace(",", "_"), "subtype=" + cfg.subtype,
            "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    if dev_suid:
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


def read_overflow_ids() -> tuple:
    """The kernel's overflow uid and gid (fuse-overlayfs's owners outside a mapping)."""
    found = []
    for path in (idmap.OVERFLOW_UID_FILE, idmap.OVERFLOW_GID_FILE):
        try:
            with open(path) as f:
                found.append(idmap.parse_overflow_id(f.read(), path))
        except OSError as e:
            raise MountError(f"cannot read {path}: {e.strerror}") from None
        except idmap.IdOptionError as e:
            raise MountError(str(e)) from None
    return tuple(found)


def id_options(cfg: MountConfig) -> idmap.IdOptions:
    """The mount's IdOptions, with the overflow ids read here when a
    mapping needs them."""
    values = cfg.id_options
    try:
        if "uidmapping" in values or "gidmapping" in values:
            return idmap.from_options(values, *read_overflow_ids())
        return idmap.from_options(values)
    except idmap.IdOptionError as e:
        raise MountError(str(e)) from None


def open_union(cfg: MountConfig) -> Union:
    options = id_options(cfg)
    try:
        return Union(cfg.lowers, cfg.upper, cfg.work, whiteout_format=cfg.whiteout_format,
                     durable=not cfg.volatile, metacopy=cfg.metacopy, id_options=options,
                     redirect_dir=cfg.redirect_dir)
    except OSError as e:
        raise MountError(f"cannot open layers: {e.strerror} ({shown(e.filename)})") from None
    except (ProfileError, OverrideSetupError) as e:
        raise MountError(str(e)) from None


def serve(cfg: MountConfig, ready, fuse_fd=None, companion=None) -> int:
    """Mount the validated `cfg` and serve it; see the module's docstring.

    fuse_fd: a /dev/fuse descriptor someone else mounted already (a client of
    the daemon, in its own mount namespace): served as it is, nothing mounted
    here. companion(union, operations): an async function run beside the
    FUSE loop (the server's control socket), cancelled with it."""
    # `kill -USR1 PID` writes every thread's stack to the server's stderr (its log)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        lock_fd = lock_workdir(cfg.work) if cfg.work else None
        try:
            union = open_union(cfg)
        except MountError:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
    except MountError as e:
        ready(str(e))
        raise
    try:
        profile = union.profile
        operations = Operations(union, xattrs=cfg.xattrs)
        pyfuse3.init(operations, cfg.mountpoint if fuse_fd is None else f"/dev/fd/{fuse_fd}",
                     fuse_options(cfg, profile.allow_other, profile.dev_suid))
    except RuntimeError as e:
        union.close()
        if lock_fd is not None:
            os.close(lock_fd)
        message = f"cannot mount on {shown(cfg.mountpoint)}: {e}"
        ready(message)
        raise MountError(message) from None
    ready(None)
    try:
        trio.run(_main, companion and functools.partial(companion, union, operations))
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


async def _main(companion=None):
    async with trio.open_nursery() as nursery:
        if companion is not None:
            nursery.start_soon(companion)
        async def on_signal():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                           signal.SIGHUP) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return
        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
