"""What the server may do on disk, found out once at mount by trying it.

uid 0 is not root everywhere: in a user namespace (podman rootless,
`unshare -Ur`) `geteuid()` says 0 while `trusted.*` xattrs and device nodes
are refused. So the profile is never derived from the uid: the server tries
each privilege where it will use it (in the workdir) and reads its
capabilities, and the result decides the marker format it writes, the
namespace of its bookkeeping xattrs and which FUSE mount options it may ask
for. The profile is plain data, carried with the mount's configuration.
"""
import errno
import os
import stat
from dataclasses import dataclass

from ..sys.capabilities import (
    CAP_CHOWN,
    CAP_SYS_ADMIN,
    effective_capabilities,
    in_init_user_namespace,
)
from .whiteout import FORMAT_KERNEL, FORMAT_OCI


@dataclass(frozen=True)
class Profile:
    trusted_xattrs: bool = False    # trusted.* can be set (CAP_SYS_ADMIN over the fs)
    mknod_whiteouts: bool = False   # a char 0/0 device can be made
    may_chown: bool = False         # CAP_CHOWN: copies keep their owners
    init_userns: bool = False       # not inside a user namespace
    whiteout_format: str = FORMAT_OCI   # the marker format written in the upper

    @property
    def xattr_ns(self) -> str:
        """Namespace of the server's own xattrs (origin, metacopy)."""
        return "trusted" if self.trusted_xattrs else "user"

    @property
    def privileged_mount(self) -> bool:
        """May the mount be allow_other with dev and suid (real root)?"""
        return self.init_userns and CAP_SYS_ADMIN in effective_capabilities()


ROOT_PROFILE = Profile(True, True, True, True, FORMAT_KERNEL)
UNPRIVILEGED_PROFILE = Profile()


def _try(fn) -> bool:
    try:
        fn()
        return True
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EINVAL, errno.EROFS):
            return False
        raise


def probe(work_dir: int | None, whiteout_format: str | None = None) -> Profile:
    """The profile of this process on the workdir's filesystem (an fd of the
    workdir's scratch directory; None for a read-only union, where only
    reading matters and capabilities decide). `whiteout_format` forces a
    marker format (-o whiteout=); else the kernel's when it can be written."""
    caps = effective_capabilities()
    init_ns = in_init_user_namespace()
    if work_dir is None:
        trusted = mknod = init_ns and CAP_SYS_ADMIN in caps
    else:
        name = b"#uf-probe-" + os.urandom(6).hex().encode()
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=work_dir))
        try:
            path = b"/proc/self/fd/%d/%s" % (work_dir, name)
            trusted = _try(lambda: os.setxattr(path, b"trusted.unionfs.probe", b"y"))
        finally:
            os.unlink(name, dir_fd=work_dir)
        mknod = _try(lambda: os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0),
                                      dir_fd=work_dir))
        if mknod:
            os.unlink(name, dir_fd=work_dir)
    if whiteout_format is None:
        whiteout_format = FORMAT_KERNEL if trusted and mknod else FORMAT_OCI
    return Profile(trusted, mknod, CAP_CHOWN in caps, init_ns, whiteout_format)
