"""What a server counts while it serves, read on demand: requests by operation
(count and latency histogram), errors by errno, copy-ups by kind (count,
bytes, time); and the events it announces (copy-ups, internal errors) to
whoever listens (the server's control socket, and through it the daemon).

Counting must not slow requests: a request costs two clock reads and a few
integer increments; percentiles are computed only when someone asks.
Events are built only while someone listens.
"""
import errno as errno_mod
import time

# latency buckets: bucket i holds requests that took [2^i, 2^(i+1)) microseconds
BUCKETS = 24


class Counters:
    def __init__(self):
        self.started = time.time()
        self.requests: dict = {}        # op -> [count, [bucket counts]]
        self.errors: dict = {}          # errno -> count
        self.copyups: dict = {}         # kind -> [count, bytes, seconds]

    def request(self, op: str, elapsed_ns: int, error: int | None) -> None:
        entry = self.requests.get(op)
        if entry is None:
            entry = self.requests[op] = [0, [0] * BUCKETS]
        entry[0] += 1
        bucket = (elapsed_ns // 1000).bit_length()
        entry[1][bucket if bucket < BUCKETS else BUCKETS - 1] += 1
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1

    def copyup(self, kind: str, nbytes: int, seconds: float) -> None:
        entry = self.copyups.get(kind)
        if entry is None:
            entry = self.copyups[kind] = [0, 0, 0.0]
        entry[0] += 1
        entry[1] += nbytes
        entry[2] += seconds

    def snapshot(self) -> dict:
        return {
            "since": self.started,
            "requests": {op: {"count": count, **percentiles(buckets)}
                         for op, (count, buckets) in sorted(self.requests.items())},
            "errors": {errno_mod.errorcode.get(e, str(e)): n
                       for e, n in sorted(self.errors.items())},
            "copyups": {kind: {"count": c, "bytes": b, "seconds": round(s, 6)}
                        for kind, (c, b, s) in sorted(self.copyups.items())},
        }


def percentiles(buckets) -> dict:
    """p50/p90/p99 latencies in microseconds (each a bucket's upper bound)."""
    total = sum(buckets)
    out = {}
    for name, q in (("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99)):
        rank, seen = q * total, 0
        for i, n in enumerate(buckets):
            seen += n
            if n and seen >= rank:
                out[name] = 1 << i
                break
        else:
            out[name] = 0
    return out


class Events:
    """Listeners (callables taking an event dict); `publish` calls each, and a
    listener that raises is dropped."""

    def __init__(self):
        self.listeners: list = []

    def __bool__(self):
        return bool(self.listeners)

    def publish(self, event: dict) -> None:
        event.setdefault("time", time.time())
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:    # noqa: BLE001 - a broken listener must not hurt requests
                self.listeners.remove(listener)
