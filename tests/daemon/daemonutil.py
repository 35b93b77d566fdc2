"""Helpers for the daemon tier: a real `unionfs daemon` on a socket of the
test's own (tests/daemon/conftest.py has the fixtures that stop it)."""
import json
import os
import re
import signal
import socket
import subprocess

from mountutil import VENV_BIN, wait_for

UNIONFS = os.path.join(VENV_BIN, "unionfs")


class Daemon:
    def __init__(self, root, pool=2, group=None):
        self.root = root
        self.socket = os.path.join(root, "api.sock")
        self.log_path = os.path.join(root, "daemon.log")
        self.pool = pool
        self.group = group
        self.proc = None

    @property
    def env(self):
        return {**os.environ, "UNIONFS_SOCKET": self.socket}

    def start(self):
        argv = [UNIONFS, "daemon", "--socket", self.socket, "--pool", str(self.pool)]
        if self.group:
            argv += ["--group", self.group]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.socket + ".mount") or self.proc.poll() is not None,
                 what="daemon socket")
        assert self.proc.poll() is None, open(self.log_path).read()
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def api(self, method, path, body=None, user=None):
        """(status, JSON) of an API request, as root or as `user` (via curl)."""
        argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket", self.socket,
                "-X", method, f"http://unionfs{path}"]
        if body is not None:
            argv += ["-H", "content-type: application/json", "-d", json.dumps(body)]
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        text, _, status = out.rpartition("\n")
        return int(status), json.loads(text) if text.strip() else None

    def mounts(self):
        return self.api("GET", "/v1/mounts")[1]

    def pooled_pids(self):
        # this install's pooled servers only: another install's test run on
        # the same machine has its own
        pattern = f"^{re.escape(VENV_BIN)}/python[0-9.]* -m unionfs.serve.pooled"
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True,
                             text=True).stdout
        return {int(p) for p in out.split()}

    def mount(self, lowers, upper=None, work=None, mnt=None, extra=(), env=None, user=None):
        argv = [UNIONFS, "mount"]
        for low in lowers:
            argv += ["--lower", str(low)]
        if upper is not None:
            argv += ["--upper", str(upper), "--work", str(work)]
        argv += [*extra, str(mnt)]
        if user is not None:
            argv = ["runuser", "-u", user, "--", "env", f"UNIONFS_SOCKET={self.socket}", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env=env or self.env)


def wait_listed(d, count, timeout=10):
    wait_for(lambda: len(d.mounts()) == count, timeout=timeout, what=f"{count} mounts listed")


def connect_ok(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
