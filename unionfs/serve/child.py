"""The server process's own side: from its fork to its exit.

Forked by process.spawn(), it becomes a server (its own session, default
signals, no stdin, PR_SET_PDEATHSIG unless asked to detach), imports what a
server needs while its spawner goes on, then reads one mount request from
its channel: EOF means it will never get one (exit 0); otherwise it logs where
the request says, validates the config, mounts, answers {"ready": true} or
{"error": "one line"}, and serves until unmounted. Whatever happens it leaves
with os._exit: it never returns into the code of the process it was forked
from.
"""
import os
import sys

_EARLY_LOG = "unionfs-server-early"


def import_server_modules():
    """Everything a server needs; ~100 ms, almost all of it pyfuse3 and trio."""
    import json  # noqa: F401
    import logging  # noqa: F401

    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from . import server, validate  # noqa: F401


def read_line(fd):
    """Bytes up to a newline (decoded), or None at EOF before one."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks).decode(errors="surrogateescape")


class _Request:
    """The child's side of its channel: the mount request, and its one answer."""

    def __init__(self, channel):
        self.channel = channel
        self.logged = False     # stderr is a log file (else the requester's, or nothing)

    def answer(self, error=None):
        """Answer once ({"ready": true} or {"error": line}); later calls do nothing."""
        if self.channel is None:
            return
        import json
        answer = {"ready": True} if error is None else {"error": error}
        try:
            os.write(self.channel, (json.dumps(answer) + "\n").encode())
        except OSError:
            pass  # the requester is gone: it will not wait
        os.close(self.channel)
        self.channel = None


def main(channel, parent):
    status = 1
    request = _Request(channel)
    try:
        status = _server_main(request, parent)
    except BaseException as e:  # noqa: BLE001 - report it, never return into the parent's code
        line = f"unionfs server: {e!r}"
        unanswered = request.channel is not None
        request.answer(line)
        if request.logged or not unanswered:
            try:
                os.write(2, f"{line}\n".encode())
            except OSError:
                pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _become_server_process(parent):
    import signal

    from ..sys import libc
    os.setsid()  # a terminal's Ctrl-C is for its foreground job, not the server
    if parent is not None:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before the line above
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def _server_main(request, parent):
    _become_server_process(parent)
    # Until a mount says where to log, keep what the imports print.
    saved = os.dup(1), os.dup(2)
    early = os.memfd_create(_EARLY_LOG)
    os.dup2(early, 1)
    os.dup2(early, 2)
    failure = None
    try:
        import_server_modules()
    except BaseException as e:  # noqa: BLE001 - answered to the mount request
        failure = e
    line = read_line(request.channel)
    if line is None:
        return 0  # never given a mount
    import json
    message = json.loads(line)
    if message.get("log") is not None:
        out = err = os.open(message["log"], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        request.logged = True
    else:
        out, err = saved
    os.lseek(early, 0, os.SEEK_SET)
    while data := os.read(early, 65536):
        os.write(err, data)
    for fd, target in ((out, 1), (err, 2)):
        os.dup2(fd, target)
    for fd in {early, out, err, *saved}:
        os.close(fd)
    if failure is not None:
        raise failure
    from .config import MountConfig
    return _serve(MountConfig.from_json(message["config"]), request,
                  bool(message.get("detach")))


def _serve(cfg, request, detach):
    import logging

    from .server import serve
    from .validate import MountError, validate
    logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.WARNING,
                        format="unionfs: %(levelname)s %(message)s")
    if detach:
        from ..sys import libc
        libc.prctl(libc.PR_SET_PDEATHSIG, 0)  # a daemon outlives `unionfs mount`

    def ready(error):
        if request.channel is None:
            return  # answered already
        if error is not None:
            if request.logged:
                print(f"unionfs: {error}", file=sys.stderr)
            request.answer(f"unionfs: {error}")
            return
        request.answer()
        if detach:
            _detach_stdio(cfg.debug)

    try:
        validate(cfg)
        os.chdir("/")  # paths are resolved; do not pin the caller's directory
        return serve(cfg, ready)
    except MountError as e:
        ready(str(e))  # a no-op if serve() answered already
        return 1


def _detach_stdio(debug):
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if debug else (0, 1, 2):   # --debug keeps logging to stderr
        os.dup2(devnull, fd)
    os.close(devnull)
