"""The request ledger: which FUSE requests a workload caused, and how long each took.

The kernel's own tracepoints (`fuse:fuse_request_send`, `fuse:fuse_request_end`,
Linux 6.13 and later) see every request of every FUSE server alike, so the
ledger is the same for unionfs, the pyfuse3 floor and fuse-overlayfs. A
trace instance of our own (`/sys/kernel/tracing/instances/unionfs-bench-PID`,
the global buffer is left alone) records the two events of one connection
(the mount's st_dev minor) while a workload runs; afterwards its per-CPU
binary buffers (`trace_pipe_raw`) are read and each request's send is joined
with its end by the request's unique id. Per opcode: the count, the errors,
and the mean round trip the kernel saw (queued to answered: the server's
time for that request, scheduling included).

FORGET and BATCH_FORGET are sent without an answer (counted, no time).
A buffer that overflowed makes the ledger `complete: False`; nothing is
guessed. Where tracefs or the events are missing `Ledger.available()` says
why and the bench records no ledger.
"""
import os
import struct

TRACEFS = "/sys/kernel/tracing"
EVENTS = ("fuse_request_send", "fuse_request_end")
BUFFER_KIB_PER_CPU = 32 << 10

# enum fuse_opcode (include/uapi/linux/fuse.h)
OPCODES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
    8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN",
    15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR",
    22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT",
    27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR", 31: "GETLK", 32: "SETLK",
    33: "SETLKW", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT", 37: "BMAP", 38: "DESTROY",
    39: "IOCTL", 40: "POLL", 41: "NOTIFY_REPLY", 42: "BATCH_FORGET", 43: "FALLOCATE",
    44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 47: "COPY_FILE_RANGE", 50: "SYNCFS",
    51: "TMPFILE", 52: "STATX",
}
NO_REPLY = {"FORGET", "BATCH_FORGET", "INTERRUPT"}

# ring buffer event header (events/header_event)
_PADDING, _TIME_EXTEND, _TIME_STAMP = 29, 30, 31
_u32 = struct.Struct("<I")
_page_head = struct.Struct("<QQ")
# fuse_request_send: common (8), connection u32 @8, unique u64 @16, opcode u32 @24
_send = struct.Struct("<H6xI4xQI")
# fuse_request_end: common (8), connection u32 @8, unique u64 @16, len u32 @24, error i32 @28
_end = struct.Struct("<H6xI4xQIi")
_COMMIT_MASK = (1 << 27) - 1     # the page's data size; the bits above are flags


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _read(path):
    with open(path) as f:
        return f.read()


def connection_of(mountpoint) -> int:
    """The FUSE connection id the tracepoints report: the mount's anonymous
    device minor."""
    return os.minor(os.stat(mountpoint).st_dev)


def parse_page(page: bytes, ids: tuple, on_send, on_end) -> None:
    """Call on_send(conn, unique, opcode, ts) / on_end(conn, unique, error, ts)
    for the events of one ring-buffer page."""
    send_id, end_id = ids
    ts, commit = _page_head.unpack_from(page, 0)
    size = commit & _COMMIT_MASK
    pos, end = 16, 16 + size
    while pos + 4 <= end:
        header = _u32.unpack_from(page, pos)[0]
        type_len, delta = header & 0x1F, header >> 5
        if type_len == _PADDING:
            if delta == 0:
                break
            pos += 4 + _u32.unpack_from(page, pos + 4)[0]
            continue
        if type_len == _TIME_EXTEND:
            ts += (_u32.unpack_from(page, pos + 4)[0] << 27) | delta
            pos += 8
            continue
        if type_len == _TIME_STAMP:
            stamp = (_u32.unpack_from(page, pos + 4)[0] << 27) | delta
            ts = (ts & ~((1 << 59) - 1)) | stamp
            pos += 8
            continue
        ts += delta
        if type_len == 0:
            length = _u32.unpack_from(page, pos + 4)[0] - 4
            data = pos + 8
        else:
            length = type_len * 4
            data = pos + 4
        if length >= 32:
            common_type = struct.unpack_from("<H", page, data)[0]
            if common_type == send_id:
                _t, conn, unique, opcode = _send.unpack_from(page, data)
                on_send(conn, unique, opcode, ts)
            elif common_type == end_id:
                _t, conn, unique, _len, error = _end.unpack_from(page, data)
                on_end(conn, unique, error, ts)
        pos = data + length


class Ledger:
    """One trace instance for the whole bench; `start(conn)` / `stop()` around
    each workload run, `read()` the result."""

    def __init__(self):
        self.path = os.path.join(TRACEFS, "instances", f"unionfs-bench-{os.getpid()}")
        self.ids = None
        self.conn = None

    @staticmethod
    def available():
        """None, or why there can be no ledger here."""
        if not os.path.isdir(os.path.join(TRACEFS, "instances")):
            if not os.path.isdir(TRACEFS):
                return "no tracefs at /sys/kernel/tracing"
            try:
                import subprocess
                subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS], check=True,
                               capture_output=True)
            except (OSError, subprocess.CalledProcessError):
                return "tracefs is not mounted and cannot be"
        for event in EVENTS:
            if not os.path.exists(os.path.join(TRACEFS, "events", "fuse", event, "id")):
                return f"the kernel has no fuse:{event} tracepoint (Linux 6.13 or later has)"
        return None

    def open(self) -> None:
        if not os.path.isdir(self.path):
            os.mkdir(self.path)
        _write(os.path.join(self.path, "tracing_on"), "0")
        _write(os.path.join(self.path, "trace_clock"), "mono")
        _write(os.path.join(self.path, "buffer_size_kb"), str(BUFFER_KIB_PER_CPU))
        self.ids = tuple(int(_read(os.path.join(self.path, "events", "fuse", e, "id")))
                         for e in EVENTS)
        try:
            self.page_size = int(_read(os.path.join(self.path, "buffer_subbuf_size_kb"))) << 10
        except OSError:
            self.page_size = os.sysconf("SC_PAGE_SIZE")

    def close(self) -> None:
        if os.path.isdir(self.path):
            try:
                _write(os.path.join(self.path, "tracing_on"), "0")
                for event in EVENTS:
                    _write(os.path.join(self.path, "events", "fuse", event, "enable"), "0")
            except OSError:
                pass
            os.rmdir(self.path)

    def _cpus(self):
        return sorted(int(name[3:]) for name in os.listdir(os.path.join(self.path, "per_cpu"))
                      if name.startswith("cpu"))

    def start(self, conn: int) -> None:
        self.conn = conn
        _write(os.path.join(self.path, "tracing_on"), "0")
        _write(os.path.join(self.path, "trace"), "")        # empty every buffer
        for event in EVENTS:
            base = os.path.join(self.path, "events", "fuse", event)
            _write(os.path.join(base, "filter"), f"connection == {conn}")
            _write(os.path.join(base, "enable"), "1")
        _write(os.path.join(self.path, "tracing_on"), "1")

    def stop(self) -> dict:
        """Stop recording and return the ledger of the run since start()."""
        _write(os.path.join(self.path, "tracing_on"), "0")
        sends, ends = {}, {}
        overrun = 0

        def on_send(conn, unique, opcode, ts):
            sends[unique] = (opcode, ts)

        def on_end(conn, unique, error, ts):
            ends[unique] = (error, ts)

        for cpu in self._cpus():
            base = os.path.join(self.path, "per_cpu", f"cpu{cpu}")
            for line in _read(os.path.join(base, "stats")).splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("overrun", "dropped events"):
                    overrun += int(value.split()[0] or 0)
            fd = os.open(os.path.join(base, "trace_pipe_raw"), os.O_RDONLY | os.O_NONBLOCK)
            try:
                while True:
                    try:
                        page = os.read(fd, self.page_size)
                    except BlockingIOError:
                        break
                    if not page:
                        break
                    parse_page(page, self.ids, on_send, on_end)
            finally:
                os.close(fd)
        return summarize(sends, ends, complete=overrun == 0)


def summarize(sends: dict, ends: dict, complete=True) -> dict:
    """{"ops": {OP: {"count", "errors", "enoent", "total_us"}}, "requests",
    "complete"} from the joined events."""
    ops = {}
    for unique, (opcode, ts) in sends.items():
        name = OPCODES.get(opcode, str(opcode))
        entry = ops.get(name)
        if entry is None:
            entry = ops[name] = {"count": 0, "errors": 0, "enoent": 0, "timed": 0,
                                 "total_us": 0.0}
        entry["count"] += 1
        done = ends.get(unique)
        if done is not None:
            error, end_ts = done
            if error:
                entry["errors"] += 1
                if error == -2:
                    entry["enoent"] += 1
            entry["timed"] += 1
            entry["total_us"] += (end_ts - ts) / 1000
    return {"ops": ops, "requests": sum(e["count"] for e in ops.values()),
            "complete": complete}


def mean_us(entry) -> float | None:
    return entry["total_us"] / entry["timed"] if entry.get("timed") else None

