"""What this process may do by the kernel's rules: its capabilities and its user namespace.

uid 0 is not root everywhere (in a user namespace `geteuid()` says 0 while
the host's mounts and devices stay out of reach), so privilege is read from
/proc/self, never derived from the uid. Standard library only, and cheap:
the runner asks at start-up.
"""
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_SYS_ADMIN = 21
CAP_MKNOD = 27


def effective_capabilities(pid="self") -> frozenset:
    """The capability numbers in this process's effective set (or pid's: the
    daemon reads its client's)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return frozenset(i for i in range(64) if mask >> i & 1)
    return frozenset()


def in_init_user_namespace() -> bool:
    """The initial user namespace maps every id to itself."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def is_privileged() -> bool:
    """Real root: CAP_SYS_ADMIN in the initial user namespace (may mount anything,
    create devices, bind host device nodes and serve other users' FUSE mounts)."""
    return in_init_user_namespace() and CAP_SYS_ADMIN in effective_capabilities()
