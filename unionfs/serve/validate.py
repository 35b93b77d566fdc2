"""A mount's configuration checked against the disk before anything is mounted.

`validate(cfg)` resolves every path (relative ones against the current
directory) and refuses, with a one-line MountError, what a mount must never
be: missing or non-directory layers, overlapping layers, a workdir on another
filesystem or in use by an overlay mount, a mountpoint inside a layer or
already mounted.
"""
import os
import stat

from ..sys import mountinfo
from .config import MountConfig, shown


class MountError(Exception):
    """A problem with the layers or the mountpoint: exit status 1."""


def _real_dir(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{what} {shown(path)} does not exist") from None
    except OSError as e:
        raise MountError(f"{what} {shown(path)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{what} {shown(path)} is not a directory")
    return os.path.realpath(path)


def _inside(a: str, b: str) -> bool:
    """Is a equal to or below b?"""
    return a == b or a.startswith(b.rstrip("/") + "/")


def overlay_workdirs() -> set:
    """The workdirs of the kernel overlay mounts in the mount table."""
    try:
        table = mountinfo.mounts()
    except OSError:
        return set()
    return {m.option("workdir") for m in table
            if m.fstype == "overlay" and m.option("workdir") is not None}


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
        raise MountError(f"mountpoint {shown(mnt)} is already a mount point")
    if upper:
        for low in lowers:
            if _inside(upper, low) or _inside(low, upper):
                raise MountError(f"upper layer {shown(upper)} and lower layer {shown(low)} "
                                 "overlap")
        if _inside(work, upper) or _inside(upper, work):
            raise MountError(f"workdir {shown(work)} and upper layer {shown(upper)} overlap")
        if os.stat(work).st_dev != os.stat(upper).st_dev:
            raise MountError(f"workdir {shown(work)} is not on the upper layer's filesystem")
        if work in overlay_workdirs():
            raise MountError(f"workdir {shown(work)} is in use by another overlay mount")
    for layer in lowers + ([upper, work] if upper else []):
        if mnt != layer and _inside(mnt, layer):
            raise MountError(f"mountpoint {shown(mnt)} is inside layer {shown(layer)}")
    cfg.lowers, cfg.upper, cfg.work, cfg.mountpoint = lowers, upper, work, mnt
    return cfg
