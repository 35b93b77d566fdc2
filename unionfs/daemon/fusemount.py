"""The client's side of a FUSE mount: open /dev/fuse and mount it, here.

A mount through the daemon is made by the client, in the client's mount
namespace and with the client's credentials; only the serving is handed to
a server process (given the /dev/fuse descriptor). Where the client may
mount (CAP_SYS_ADMIN over its mount namespace: real root, or root of a user
namespace that owns it, as podman's mount program is) it calls mount(2) with
`fd=N`; else it asks fusermount3, the setuid helper, which mounts and hands
the descriptor back over a socket (_FUSE_COMMFD), as libfuse does.
client/fuse-unionfs-client.c does the same in C, with the bits and option
strings computed here (mount_bits, fusermount_options: the daemon's prepare
op sends them).
"""
import array
import os
import socket
import stat

from ..sys import libc

# mount(8) flags the kernel takes as MS_* bits for a FUSE mount
_FLAG_BITS = {
    "ro": libc.MS_RDONLY, "nosuid": libc.MS_NOSUID, "nodev": libc.MS_NODEV,
    "noexec": libc.MS_NOEXEC, "sync": 16, "dirsync": 128, "noatime": 1024,
    "nodiratime": 2048, "relatime": 1 << 21, "strictatime": libc.MS_STRICTATIME,
    "lazytime": 1 << 25,
}
# the flags FUSE's mount options string carries (fusermount3 takes them as -o)
_FUSERMOUNT_FLAGS = {"ro", "nosuid", "nodev", "noexec", "sync", "dirsync", "noatime",
                     "nodiratime", "relatime", "strictatime", "lazytime", "rw", "suid",
                     "dev", "exec", "atime", "async"}


class FuseMountError(Exception):
    """The FUSE mount could not be made (one line)."""


def mount(mountpoint: str, source: str, subtype: str, flags, options) -> int:
    """Mount FUSE at mountpoint; return the /dev/fuse descriptor to serve.

    flags: mount(8) flags (ro, nosuid, ...); options: FUSE options
    (allow_other, default_permissions, ...)."""
    try:
        return _mount_directly(mountpoint, source, subtype, flags, options)
    except PermissionError:
        return _mount_with_fusermount(mountpoint, source, subtype, flags, options)


def mount_bits(flags) -> int:
    """The MS_* bits of mount(2) for mount(8) flags."""
    bits = 0
    for flag in flags:
        bits |= _FLAG_BITS.get(flag, 0)
    return bits


def fusermount_options(source, subtype, flags, options) -> str:
    """fusermount3's -o for a mount."""
    return ",".join([f"fsname={source}", f"subtype={subtype}",
                     *sorted(f for f in flags if f in _FUSERMOUNT_FLAGS), *sorted(options)])


def _mount_directly(mountpoint, source, subtype, flags, options) -> int:
    mode = os.stat(mountpoint).st_mode
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        data = ",".join([f"fd={fd}", f"rootmode={stat.S_IFMT(mode):o}",
                         f"user_id={os.getuid()}", f"group_id={os.getgid()}",
                         *sorted(options)])
        libc.mount(source, mountpoint, f"fuse.{subtype}", mount_bits(flags), data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_with_fusermount(mountpoint, source, subtype, flags, options) -> int:
    import subprocess
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = fusermount_options(source, subtype, flags, options)
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run(["fusermount3", "-o", opts, "--", mountpoint], env=env,
                              pass_fds=[theirs.fileno()], capture_output=True, text=True)
        theirs.close()
        if proc.returncode != 0:
            raise FuseMountError(f"fusermount3: {proc.stderr.strip() or 'failed'}")
        _, ancdata, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:4])
                os.set_inheritable(fds[0], False)
                return fds[0]
        raise FuseMountError("fusermount3 sent no FUSE descriptor")
    except FileNotFoundError:
        raise FuseMountError("fusermount3 is not installed") from None
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()
