"""The client's side of the daemon: mounts through it, and its control API.

`mount(cfg)` is what `unionfs mount` and `fuse-unionfs` try first: if a
daemon answers on its mount socket, the client checks the configuration,
opens the layers and mounts /dev/fuse itself (here: the caller's mount
namespace, the caller's rights), then hands those descriptors, with its
user and mount namespaces', to the daemon, whose pre-started server serves
them; it returns once the server answered. If no daemon answers it returns
None and the caller starts its own server as before. Only the standard
library and light unionfs modules are imported on this path.

The installed fuse-unionfs is a C client that does the same without Python
(client/fuse-unionfs-client.c): the daemon's prepare op (daemon.prepare)
parses and checks for it, with layout() and mount_request() here.

`api(method, path, body)` talks to the control API (HTTP/1.1 over the UNIX
socket) for the CLI's ps/stats/which/events.
"""
import json
import os
import socket

from . import paths, wire

CONNECT_TIMEOUT = 2.0
ANSWER_TIMEOUT = 90.0


class DaemonError(Exception):
    """The daemon refused or failed (one line)."""


def _connect(path: str):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError, NotADirectoryError):
        sock.close()
        return None
    return sock


def daemon_socket(explicit=None):
    """The API socket to use, or None when there is no place for one."""
    if explicit:
        return explicit
    try:
        return paths.default_socket()
    except paths.NoRuntimeDir:
        return None


def fuse_mount_options(cfg, capabilities=None) -> tuple:
    """(mount flags, FUSE options) as the server itself would mount them, for a
    client with these effective capabilities (default: this process's) in this
    process's user namespace (the daemon's prepare op asks in the client's)."""
    from ..sys.capabilities import CAP_SYS_ADMIN, effective_capabilities, in_init_user_namespace
    caps = effective_capabilities() if capabilities is None else capabilities
    flags = [f for f in cfg.flags if f != "rw"]
    if cfg.upper is None and "ro" not in flags:
        flags.append("ro")
    options = {"default_permissions"}
    if CAP_SYS_ADMIN in caps and in_init_user_namespace():     # real root
        options.add("allow_other")
        flags = [f for f in flags if f not in ("dev", "suid")]
        if "nodev" not in flags:
            flags.append("dev")
        if "nosuid" not in flags:
            flags.append("suid")
    elif CAP_SYS_ADMIN in caps:
        options.add("allow_other")      # root of a user namespace (podman's mount program)
    return flags, options


def layout(cfg) -> tuple:
    """(paths to open O_PATH|O_DIRECTORY, in order, and the request's "fds")
    for a validated cfg: the layers, then the client's user and mount
    namespaces, then its /dev/fuse descriptor."""
    paths_ = list(cfg.lowers)
    named = {"lowers": list(range(len(cfg.lowers)))}
    if cfg.upper is not None:
        named["upper"], named["work"] = len(paths_), len(paths_) + 1
        paths_ += [cfg.upper, cfg.work]
    named["userns"], named["mntns"], named["fuse"] = (len(paths_), len(paths_) + 1,
                                                      len(paths_) + 2)
    return paths_, named


def mount_request(cfg, named, flags, options) -> dict:
    """The "mount" message for the mount socket (daemon.mounting)."""
    return {"op": "mount", "config": cfg.to_json(), "fds": named,
            "mountpoint": cfg.mountpoint, "source": cfg.source, "lowers": cfg.lowers,
            "upper": cfg.upper, "work": cfg.work, "options": sorted(options | set(flags))}


def mount(cfg, socket_path=None):
    """Mount cfg through the daemon; None if no daemon answers.

    Raises serve.validate.MountError for a bad configuration, DaemonError
    (or fusemount.FuseMountError) when the mount fails."""
    api_socket = daemon_socket(socket_path)
    if api_socket is None:
        return None
    sock = _connect(paths.mount_socket(api_socket))
    if sock is None:
        return None
    from ..serve.validate import validate
    from . import fusemount
    fds = []
    fuse_fd = None
    try:
        validate(cfg)
        layer_paths, named = layout(cfg)
        for path in layer_paths:
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        for key in ("user", "mnt"):
            fds.append(os.open(f"/proc/self/ns/{key}", os.O_RDONLY | os.O_CLOEXEC))
        flags, options = fuse_mount_options(cfg)
        fuse_fd = fusemount.mount(cfg.mountpoint, cfg.source, cfg.subtype, flags, options)
        fds.append(fuse_fd)
        request = mount_request(cfg, named, flags, options)
        sock.settimeout(ANSWER_TIMEOUT)
        wire.send_message(sock, request, fds)
        answer, extra = wire.recv_message(sock)
        for fd in extra:
            os.close(fd)
    except BaseException:
        if fuse_fd is not None:
            _undo(cfg.mountpoint)
        raise
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
    if "error" in answer:
        _undo(cfg.mountpoint)
        message = answer["error"]
        raise DaemonError(message if message.startswith("unionfs") else
                          f"unionfs daemon: {message}")
    return answer


def _undo(mountpoint):
    from ..serve.process import unmount
    try:
        unmount(mountpoint)
    except OSError:
        pass


# ---- the control API ---------------------------------------------------------------

class NoDaemon(DaemonError):
    pass


def api(method: str, path: str, body=None, socket_path=None):
    """(status, JSON answer) of one API request; NoDaemon if none answers."""
    import http.client
    api_socket = daemon_socket(socket_path)
    sock = _connect(api_socket) if api_socket else None
    if sock is None:
        raise NoDaemon(f"no unionfs daemon answers on {api_socket or '(no socket path)'}")
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    sock.settimeout(30)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"content-type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read() or b"null")
    conn.close()
    return response.status, answer


def api_stream(path: str, socket_path=None):
    """Yield the JSON chunks of a streamed API answer (the event stream)."""
    import http.client
    api_socket = daemon_socket(socket_path)
    sock = _connect(api_socket) if api_socket else None
    if sock is None:
        raise NoDaemon(f"no unionfs daemon answers on {api_socket or '(no socket path)'}")
    sock.settimeout(None)
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    conn.request("GET", path)
    response = conn.getresponse()
    while True:
        line = response.readline()
        if not line:
            return
        yield json.loads(line)


def _main(argv=None) -> int:
    """`python -m unionfs.daemon.client --socket S --lower L ... MNT`: one mount
    through the daemon, as the user running it (the API's POST /v1/mounts)."""
    import argparse
    import sys

    from ..serve.config import MountConfig, OptionError, apply_options
    from ..serve.validate import MountError
    parser = argparse.ArgumentParser(prog="unionfs-daemon-client")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--lower", action="append", default=[])
    parser.add_argument("--upper")
    parser.add_argument("--work")
    parser.add_argument("-o", action="append", default=[])
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    cfg = MountConfig(lowers=args.lower, upper=args.upper or None, work=args.work or None,
                      mountpoint=args.mountpoint)
    try:
        for text in args.o:
            apply_options(cfg, text)
        answer = mount(cfg, args.socket)
    except (OptionError, MountError, DaemonError, OSError) as e:
        print(str(e) if isinstance(e, DaemonError) else f"unionfs: {e}", file=sys.stderr)
        return 1
    if answer is None:
        print("unionfs: the daemon did not answer", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
