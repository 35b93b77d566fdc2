"""A pre-started server: imported ahead of need, given its mount by the daemon.

`python -m unionfs.serve.pooled FD` is what the daemon's pool starts: a
process of its own (own session, so it outlives the daemon), which imports
everything a server needs and says so on its channel (FD, a UNIX socket to
the daemon), then waits. The daemon claims it with one message carrying the
mount: the configuration (layers given as descriptors, opened by the client
in its own namespaces with its own rights), the client's /dev/fuse
descriptor (the client mounted it already), whom to act as, and where to
log and answer control requests. The server then takes on the client's
identity (its user namespace, ids and groups), serves the descriptor, and
answers {"ready": true} or {"error": "one line"}. After that the daemon is
only its client: the server lives until its mount goes away, whatever
happens to the daemon.
"""
import os
import sys


def take_identity(creds, userns_fd):
    """Act as the client: join its user namespace if it is another one (this
    process is single-threaded yet), then its groups, gid and uid."""
    from ..sys import libc
    if userns_fd is not None:
        libc.setns(userns_fd, libc.CLONE_NEWUSER)
    groups = creds.get("groups")
    if groups is not None and os.getuid() == 0:
        try:
            os.setgroups(groups)
        except PermissionError:     # a user namespace with setgroups denied
            pass
    gid, uid = creds["gid"], creds["uid"]
    if os.getresgid() != (gid, gid, gid):
        os.setresgid(gid, gid, gid)
    if os.getresuid() != (uid, uid, uid):
        os.setresuid(uid, uid, uid)


def claim_config(message, fds):
    """The MountConfig of a claim, with its layers as this process's descriptors."""
    from .config import MountConfig
    cfg = MountConfig.from_json(message["config"])
    named = message["fds"]

    def path_of(index):
        return f"/proc/self/fd/{fds[index]}"
    cfg.lowers = [path_of(i) for i in named["lowers"]]
    if named.get("upper") is not None:
        cfg.upper, cfg.work = path_of(named["upper"]), path_of(named["work"])
    return cfg


def main(channel_fd: int) -> int:
    import signal
    import socket

    from ..daemon import wire
    os.chdir("/")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    from .child import import_server_modules
    import_server_modules()
    from . import control
    channel = socket.socket(fileno=channel_fd)
    wire.send_message(channel, {"imported": True, "pid": os.getpid()})
    try:
        message, fds = wire.recv_message(channel)
    except wire.WireError:
        return 0        # never claimed: the daemon let us go
    named = message["fds"]
    log_fd = fds[named["log"]] if named.get("log") is not None else None
    if log_fd is not None:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)

    def ready(error):
        answer = {"ready": True} if error is None else {"error": f"unionfs: {error}"}
        try:
            wire.send_message(channel, answer)
        except OSError:
            pass
        channel.close()

    try:
        take_identity(message["creds"], fds[named["userns"]]
                      if named.get("userns") is not None else None)
        cfg = claim_config(message, fds)
    except (OSError, ValueError) as e:
        ready(f"cannot take the mount: {e}")
        return 1
    import logging

    from .server import serve
    from .validate import MountError
    logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.WARNING,
                        format="unionfs: %(levelname)s %(message)s")
    companion = control.companion(fds[named["control"]] if named.get("control") is not None
                                  else None, message.get("info", {}),
                                  fds[named["mntns"]] if named.get("mntns") is not None
                                  else None)
    try:
        return serve(cfg, ready, fuse_fd=fds[named["fuse"]], companion=companion)
    except MountError as e:
        ready(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
