"""Users and groups of the container: `-u` (or an image's User) to uid, gid and groups.

The spec is docker's: `USER[:GROUP]`, each part a number or a name. Numbers
need nothing; a name, or a user without a group, needs the container's own
`/etc/passwd` and `/etc/group`, read through the mounted root once it is
mounted (so they are what the container will see: every layer, whiteouts
and the container's upper). They are opened with openat2(RESOLVE_IN_ROOT):
a symlink in the image (`/etc/passwd -> /usr/lib/passwd`, or `-> /etc/shadow`
of the host) resolves inside the root, as it would for the container, never
outside it; only a regular file is read, and only its first MAX_FILE bytes.

Rules (docker's and runc's):
- USER by name: its uid; by number: that uid, listed or not.
- GROUP given: that gid (a name is looked up in /etc/group), no other
  groups. Not given: the user's primary gid from /etc/passwd (0 if the uid
  is not listed) and, as initgroups(3) gives them, supplementary groups: the
  primary one and those of /etc/group that list the user as a member.
- HOME, unless the environment sets it: the user's home from /etc/passwd,
  else `/`.
An unknown name is an error; so is a missing /etc/passwd when a name needs it.
"""
import os
import re

from unionfs.sys import libc

MAX_FILE = 4 << 20
MAX_ID = 2**32 - 2      # (uid_t)-1 means "unchanged" to the kernel
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?\Z")


class UserError(Exception):
    """A user or group that cannot be resolved (one line)."""


def parse_spec(spec):
    """`USER[:GROUP]` -> (user, group): each an int, a name (str) or, for a
    missing group, None. ValueError (one line) for a malformed spec."""
    user, sep, group = spec.partition(":")
    parts = [_part(user, spec)]
    parts.append(_part(group, spec) if sep else None)
    return tuple(parts)


def _part(text, spec):
    if text.isdigit():
        value = int(text)
        if value > MAX_ID:
            raise ValueError(f"bad -u {spec!r}: out of range")
        return value
    if not _NAME_RE.match(text) or len(text) > 256:
        raise ValueError(f"bad -u {spec!r}: expected UID[:GID] or NAME[:GROUP]")
    return text


def needs_lookup(user, group):
    """Only numbers on both sides need no file of the container."""
    return not (isinstance(user, int) and isinstance(group, int))


def read_in_root(root, path):
    """The text of file `path` (absolute, inside the container) under the
    directory `root`, resolved as the container would (RESOLVE_IN_ROOT);
    None if it does not exist. Never reads anything but a regular file."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = open_in_root(root_fd, path.lstrip("/").encode(), os.O_PATH)
        except OSError as e:
            if e.errno in (2, 20, 40):  # ENOENT, ENOTDIR, ELOOP: as good as absent
                return None
            raise UserError(f"cannot read {path} of the container: {e.strerror}") from None
    finally:
        os.close(root_fd)
    try:
        if not _is_regular(fd):
            raise UserError(f"{path} of the container is not a regular file")
        # an O_PATH fd is reopened through its own /proc link: the same file, now readable
        data_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(fd)
    try:
        data = os.read(data_fd, MAX_FILE)
    finally:
        os.close(data_fd)
    return data.decode("utf-8", "replace")


def open_in_root(root_fd, path, flags):
    """openat2(RESOLVE_IN_ROOT) (libc retries the kernel's EAGAIN)."""
    return libc.openat2(root_fd, path, flags,
                        resolve=libc.RESOLVE_IN_ROOT | libc.RESOLVE_NO_MAGICLINKS)


def _is_regular(fd):
    import stat
    return stat.S_ISREG(os.fstat(fd).st_mode)


def parse_passwd(text):
    """[(name, uid, gid, home)] of the well-formed lines of an /etc/passwd."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not fields[0] or fields[0].startswith(("#", "+", "-")):
            continue
        if not (fields[2].isdigit() and fields[3].isdigit()):
            continue
        entries.append((fields[0], int(fields[2]), int(fields[3]), fields[5]))
    return entries


def parse_group(text):
    """[(name, gid, members)] of the well-formed lines of an /etc/group."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not fields[0] or fields[0].startswith(("#", "+", "-")):
            continue
        if not fields[2].isdigit():
            continue
        members = tuple(m for m in fields[3].split(",") if m)
        entries.append((fields[0], int(fields[2]), members))
    return entries


def resolve(user, group, passwd_text, group_text):
    """(uid, gid, supplementary gids, home or None) from the parsed spec and
    the container's files (None: the file does not exist)."""
    passwd = parse_passwd(passwd_text or "")
    if isinstance(user, str):
        if passwd_text is None:
            raise UserError(f"unable to find user {user}: the container has no /etc/passwd")
        entry = next((e for e in passwd if e[0] == user), None)
        if entry is None:
            raise UserError(f"unable to find user {user}: no matching entry in the "
                            "container's /etc/passwd")
    else:
        entry = next((e for e in passwd if e[1] == user), None)
    uid = entry[1] if entry else user
    groups = parse_group(group_text or "")
    extra = ()
    if group is None:
        gid = entry[2] if entry else 0
        if entry is not None:     # as initgroups(3): the primary group and the memberships
            extra = tuple(dict.fromkeys([gid] + [g[1] for g in groups if entry[0] in g[2]]))
    elif isinstance(group, str):
        if group_text is None:
            raise UserError(f"unable to find group {group}: the container has no /etc/group")
        found = next((g for g in groups if g[0] == group), None)
        if found is None:
            raise UserError(f"unable to find group {group}: no matching entry in the "
                            "container's /etc/group")
        gid = found[1]
    else:
        gid = group
    return uid, gid, extra, (entry[3] or None) if entry else None


def resolve_in_root(user, group, root):
    """resolve() with the files read from the mounted container root."""
    passwd_text = read_in_root(root, "/etc/passwd")
    group_text = read_in_root(root, "/etc/group") if group is None or isinstance(
        group, str) else None
    return resolve(user, group, passwd_text, group_text)
