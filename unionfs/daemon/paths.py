"""Where a daemon lives: its sockets and its state, for root and for a user.

Real root (uid 0 in the initial user namespace) uses /run/unionfs; anyone
else $XDG_RUNTIME_DIR/unionfs (a user's daemon serves that user). A daemon
started with `--socket PATH` puts everything beside PATH instead, and
clients find it with UNIONFS_SOCKET=PATH. Next to the API socket:

    PATH            the control API (HTTP/1.1 + JSON)
    PATH.mount      mount requests with their file descriptors (daemon.wire)
    PATH.state/     one record per server the daemon started (JSON), and
                    each server's own control socket: a restarted daemon
                    finds its servers there

Standard library only (clients import it on every mount). The C client
(client/fuse-unionfs-client.c) repeats default_socket's rule.
"""
import os

SOCKET_ENV = "UNIONFS_SOCKET"
ROOT_DIR = "/run/unionfs"


class NoRuntimeDir(Exception):
    """No place for a user's daemon (XDG_RUNTIME_DIR unset)."""


def _is_real_root() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def default_socket() -> str:
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    if _is_real_root():
        return os.path.join(ROOT_DIR, "unionfs.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise NoRuntimeDir("XDG_RUNTIME_DIR is not set: no place for a user's daemon "
                           "(use --socket PATH)")
    return os.path.join(runtime, "unionfs", "unionfs.sock")


def mount_socket(api_socket: str) -> str:
    return api_socket + ".mount"


def state_dir(api_socket: str) -> str:
    return api_socket + ".state"
