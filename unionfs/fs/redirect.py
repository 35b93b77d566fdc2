"""Directory redirects, as the kernel's overlayfs writes and reads them.

With ``redirect_dir=on`` a directory that comes from a lower layer can be
renamed: it is copied up alone and its upper copy records where its lower
contents are, in the redirect xattr ``trusted.overlay.redirect``. The
userxattr format takes no redirects (``user.overlay.redirect`` is only
recognised, to be refused: refused_with()); the OCI format has none.
The value is the old name alone (relative: looked up in the parent's
directory of each lower layer) when the directory stays in its parent, else
a path from the layer root starting with "/" (absolute). Lookups that follow
redirects (``on``, ``follow``) continue in each lower layer at the
redirected path; ``nofollow`` refuses a lookup that meets one (EPERM, as
the kernel's); ``off`` is the kernel's default meaning: ``follow`` in the
kernel's format, ``nofollow`` in the userxattr one (effective()).

Pure rules: values, their checks, the value a rename writes. Reading and
writing the xattr on disk is fs.lookup's and fs.namespace's.
"""
from . import whiteout

MODE_ON = "on"
MODE_FOLLOW = "follow"
MODE_NOFOLLOW = "nofollow"
MODE_OFF = "off"
MODES = (MODE_ON, MODE_FOLLOW, MODE_NOFOLLOW, MODE_OFF)

XATTR_KERNEL = "trusted.overlay.redirect"
XATTR_USER = "user.overlay.redirect"

# the kernel's redirect_max (its module parameter's default): a rename that
# would write a longer value falls back to EXDEV
REDIRECT_MAX = 256


class InvalidRedirect(ValueError):
    """A redirect xattr whose value is not one the kernel would follow."""


def effective(mode: str, fmt: str) -> str:
    """What "off" means: the kernel's redirect_dir=off is "follow" when its
    redirect_always_follow is set (its Kconfig default) and "nofollow" with
    userxattr (which forces nofollow unless a mode is given). The other
    modes are what they say."""
    if mode != MODE_OFF:
        return mode
    return MODE_FOLLOW if fmt == whiteout.FORMAT_KERNEL else MODE_NOFOLLOW


def creates(mode: str) -> bool:
    """Does a rename of a lower or merged directory write a redirect?"""
    return mode == MODE_ON


def follows(mode: str) -> bool:
    """Do lookups continue in the lower layers at a redirected path?"""
    return mode in (MODE_ON, MODE_FOLLOW)


def refused_with(mode: str, fmt: str) -> str | None:
    """Why a mode cannot be used with a marker format (one line), or None.

    Redirects are followed only where no plain user can set them: the
    kernel refuses redirect_dir=on and follow with userxattr, since anyone
    who owns an upper directory may set user.* xattrs on it, and a redirect
    would then show a lower directory without the permission checks of its
    ancestors. unionfs refuses the same (the OCI format has no redirects)."""
    if fmt == whiteout.FORMAT_USERXATTR and mode in (MODE_ON, MODE_FOLLOW):
        return (f"redirect_dir={mode} cannot be used with the userxattr format (user.* "
                "redirects can be set by any owner of an upper directory; the kernel "
                "refuses it too)")
    if fmt == whiteout.FORMAT_OCI and mode == MODE_ON:
        return ("redirect_dir=on needs a format with xattrs: the OCI whiteout format has "
                "no redirects")
    return None


def xattr_name(fmt: str) -> str | None:
    """The redirect xattr of a marker format (fs.whiteout), None for OCI."""
    if fmt == whiteout.FORMAT_KERNEL:
        return XATTR_KERNEL
    if fmt == whiteout.FORMAT_USERXATTR:
        return XATTR_USER
    return None


def is_absolute(value: bytes) -> bool:
    return value.startswith(b"/")


def parse(value: bytes) -> tuple:
    """The components of a redirect value, as a tuple of names; a relative
    redirect is one name. InvalidRedirect for what the kernel refuses (an
    empty value, a relative one holding "/", an absolute one with an empty
    component) and for "." and ".." (never a real name)."""
    if not value or b"\0" in value:
        raise InvalidRedirect(value)
    if is_absolute(value):
        parts = tuple(value[1:].split(b"/"))
    else:
        parts = (value,)
        if b"/" in value:
            raise InvalidRedirect(value)
    if any(p in (b"", b".", b"..") for p in parts):
        raise InvalidRedirect(value)
    return parts


def redirected_path(current: tuple, value: bytes) -> tuple:
    """Where the lookup goes on in the layers below one whose directory at
    path `current` (components from the layer root) holds `value`: an
    absolute value replaces the path, a relative one its last name."""
    parts = parse(value)
    if is_absolute(value):
        return parts
    return current[:-1] + parts


def value_for_rename(existing: bytes | None, same_dir: bool, old_name: bytes,
                     ancestry) -> bytes | None:
    """The redirect a rename of a lower or merged directory writes, or None
    when the one it has already says the right thing (the kernel keeps a
    redirect on a rename in the same directory, and keeps an absolute one
    always).

    ancestry: (name, redirect-or-None) of the directory and each of its
    ancestors below the root, nearest first, at the old place (only used
    for an absolute value): each component is the ancestor's own redirect
    if it has one, and an absolute one ends the walk."""
    if existing is not None and (same_dir or is_absolute(existing)):
        return None
    if same_dir:
        return old_name
    parts = []
    for name, redirect in ancestry:
        part = redirect if redirect is not None else name
        parts.append(part)
        if is_absolute(part):
            break
    else:
        parts.append(b"")       # the root: the path starts with "/"
    value = b"/".join(reversed(parts))
    if len(value) > REDIRECT_MAX:
        raise InvalidRedirect(value)
    return value
