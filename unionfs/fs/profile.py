"""What the server may do on disk, found out once at mount by trying it.

uid 0 is not root everywhere: in a user namespace (podman rootless,
`unshare -Ur`) `geteuid()` says 0 while `trusted.*` xattrs and device nodes
are refused. So the profile is never derived from the uid: the server tries
each privilege where it will use it (in the workdir) and reads its
capabilities, and the result decides the marker format it writes, the
namespace of its bookkeeping xattrs and which FUSE mount options it may ask
for. The profile is plain data, carried with the mount's configuration.

The marker format (fs.whiteout): the kernel's where trusted xattrs and char
0/0 devices can be written (real root); inside a user namespace that may
make char 0/0 devices and user xattrs, the kernel's rootless form (what
`mount -t overlay -o userxattr` reads there); else the OCI form. A plain
user outside any user namespace writes the OCI form: no kernel overlay it
could mount would read user.overlay.* there.
"""
import errno
import os
import stat
from dataclasses import dataclass

from ..sys.capabilities import (
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_SYS_ADMIN,
    effective_capabilities,
    in_init_user_namespace,
)
from .whiteout import FORMAT_KERNEL, FORMAT_OCI, FORMAT_USERXATTR


class ProfileError(ValueError):
    """A marker format was asked for that this server cannot write: one line."""


@dataclass(frozen=True)
class Profile:
    trusted_xattrs: bool = False    # trusted.* can be set (CAP_SYS_ADMIN over the fs)
    mknod_whiteouts: bool = False   # a char 0/0 device can be made
    may_chown: bool = False         # CAP_CHOWN: copies keep their owners
    init_userns: bool = False       # not inside a user namespace
    whiteout_format: str = FORMAT_OCI   # the marker format written in the upper
    user_xattrs: bool = False       # user.* can be set in the workdir
    dac_override: bool = False      # CAP_DAC_OVERRIDE: modes never stop the server
    sys_admin: bool = False         # CAP_SYS_ADMIN in the server's own user namespace

    @property
    def xattr_ns(self) -> str:
        """Namespace of the server's own xattrs (origin, metacopy): the one
        the kernel reads with the format written (user.* for userxattr)."""
        if self.trusted_xattrs and self.whiteout_format != FORMAT_USERXATTR:
            return "trusted"
        return "user"

    @property
    def allow_other(self) -> bool:
        """May the mount serve every user? Whoever mounted with CAP_SYS_ADMIN
        in its own user namespace may, and rootless podman needs it: it runs
        the container in a child namespace (keep-id), which FUSE refuses
        without allow_other. The kernel still serves only processes of that
        namespace and its children."""
        return self.sys_admin

    @property
    def dev_suid(self) -> bool:
        """May the mount honour device nodes and set-id bits (real root)?"""
        return self.init_userns and self.sys_admin


ROOT_PROFILE = Profile(True, True, True, True, FORMAT_KERNEL, True, True, True)
UNPRIVILEGED_PROFILE = Profile()


def _try(fn) -> bool:
    try:
        fn()
        return True
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EINVAL, errno.EROFS):
            return False
        raise


def choose_format(forced: str | None, trusted: bool, mknod: bool, user_xattrs: bool,
                  init_ns: bool) -> str:
    """The marker format to write (see the module doc); a forced one
    (-o whiteout=, -o userxattr) must be one the server can write."""
    if forced is None:
        if trusted and mknod:
            return FORMAT_KERNEL
        if mknod and user_xattrs and not init_ns:
            return FORMAT_USERXATTR
        return FORMAT_OCI
    if forced == FORMAT_KERNEL and not (trusted and mknod):
        raise ProfileError("whiteout=kernel: this server may not write trusted.* xattrs "
                           "and char 0/0 devices in the workdir")
    if forced == FORMAT_USERXATTR and not (mknod and user_xattrs):
        raise ProfileError("whiteout=userxattr: this server may not write user.* xattrs "
                           "and char 0/0 devices in the workdir")
    return forced


def probe(work_dir: int | None, whiteout_format: str | None = None) -> Profile:
    """The profile of this process on the workdir's filesystem (an fd of the
    workdir's scratch directory; None for a read-only union, where only
    reading matters and capabilities decide). `whiteout_format` forces a
    marker format (ProfileError if it cannot be written)."""
    caps = effective_capabilities()
    init_ns = in_init_user_namespace()
    if work_dir is None:
        trusted = mknod = init_ns and CAP_SYS_ADMIN in caps
        user_xattrs = False
        fmt = whiteout_format or FORMAT_OCI
    else:
        name = b"#uf-probe-" + os.urandom(6).hex().encode()
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=work_dir))
        try:
            path = b"/proc/self/fd/%d/%s" % (work_dir, name)
            trusted = _try(lambda: os.setxattr(path, b"trusted.unionfs.probe", b"y"))
            user_xattrs = _try(lambda: os.setxattr(path, b"user.unionfs.probe", b"y"))
        finally:
            os.unlink(name, dir_fd=work_dir)
        mknod = _try(lambda: os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0),
                                      dir_fd=work_dir))
        if mknod:
            os.unlink(name, dir_fd=work_dir)
        fmt = choose_format(whiteout_format, trusted, mknod, user_xattrs, init_ns)
    return Profile(trusted, mknod, CAP_CHOWN in caps, init_ns, fmt, user_xattrs,
                   CAP_DAC_OVERRIDE in caps, CAP_SYS_ADMIN in caps)
