"""`unionfs daemon`, `unionfs stats`, `unionfs which`, `unionfs events`.

stats and which work without a daemon too: a mount's server answers them
itself through hidden xattrs of the mount (`user.unionfs.stats` on its root,
`user.unionfs.which` on any path), so they see mounts started by hand and
mounts in the caller's own namespaces. events needs the daemon (it gathers
the servers' events); without one it says so.
"""
import json
import os
import sys
import time

import click

STATS_XATTR = "user.unionfs.stats"
WHICH_XATTR = "user.unionfs.which"


def fail(message, status=1):
    click.echo(message, err=True)
    sys.exit(status)


@click.command("daemon")
@click.option("--socket", "socket_path", metavar="PATH",
              help="API socket (default /run/unionfs/unionfs.sock as root, "
                   "$XDG_RUNTIME_DIR/unionfs/unionfs.sock otherwise).")
@click.option("--pool", "pool_size", default=2, show_default=True, type=click.IntRange(0, 64),
              help="Servers kept started ahead.")
@click.option("--group", metavar="GROUP",
              help="Make the sockets 0660 for this group (its members get mounts of their own).")
def daemon(socket_path, pool_size, group):
    """Run the daemon in the foreground: pre-started servers and the control API."""
    from ..daemon import main, paths
    try:
        sys.exit(main.run(socket_path, pool_size, group))
    except paths.NoRuntimeDir as e:
        fail(f"unionfs daemon: {e}", 2)
    except (OSError, KeyError) as e:
        fail(f"unionfs daemon: {e}")


def _mount_stats(mountpoint):
    try:
        return json.loads(os.getxattr(mountpoint, STATS_XATTR))
    except OSError:
        return None


def _daemon_stats(socket_path):
    from ..daemon import client
    status, mounts = client.api("GET", "/v1/mounts", socket_path=socket_path)
    rows = []
    for m in mounts:
        status, stats = client.api("GET", f"/v1/mounts/{m['id']}/stats", socket_path=socket_path)
        if status == 200:
            rows.append((m["mountpoint"], stats))
    return rows


def _row(mountpoint, stats, previous, interval):
    requests = sum(r["count"] for r in stats.get("requests", {}).values())
    rate = ""
    if previous is not None and interval:
        before = sum(r["count"] for r in previous.get("requests", {}).values())
        rate = f"{(requests - before) / interval:.0f}"
    copy = stats.get("copyups", {})
    return [mountpoint, str(stats.get("pid", "")), str(requests), rate,
            str(sum(c["count"] for c in copy.values())),
            _size(sum(c["bytes"] for c in copy.values())),
            str(sum(stats.get("errors", {}).values())), str(stats.get("nodes", "")),
            _size(stats.get("memory", {}).get("vmrss_kib", 0) * 1024)]


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


HEADER = ["MOUNT", "PID", "REQUESTS", "REQ/S", "COPY-UPS", "COPIED", "ERRORS", "NODES", "MEM"]


def _table(rows, header=HEADER):
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


@click.command("stats")
@click.argument("mountpoint", required=False)
@click.option("--no-stream", is_flag=True, help="Print once and exit.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--socket", "socket_path", metavar="PATH", help="The daemon's API socket.")
def stats(mountpoint, no_stream, fmt, socket_path):
    """Live counters of unionfs mounts (one, or every one the daemon knows)."""
    from ..daemon import client

    def collect():
        if mountpoint:
            s = _mount_stats(mountpoint)
            if s is None:
                fail(f"unionfs stats: {mountpoint} is not a unionfs mount")
            return [(os.path.abspath(mountpoint), s)]
        try:
            return _daemon_stats(socket_path)
        except client.NoDaemon as e:
            fail(f"unionfs stats: {e}; name a mount point to ask its server directly")
    previous, last = {}, None
    while True:
        rows = collect()
        now = time.monotonic()
        if fmt == "json":
            click.echo(json.dumps({m: s for m, s in rows}))
        else:
            interval = now - last if last else None
            table = _table([_row(m, s, previous.get(m), interval) for m, s in rows])
            click.echo(table if no_stream else "\033[H\033[J" + table)
        if no_stream:
            return
        previous, last = dict(rows), now
        time.sleep(1)


def mount_rows(socket_path=None):
    """`unionfs ps --mounts`: every unionfs mount in the caller's mount table
    (its server answers for itself) and every mount the daemon serves
    (those in other namespaces too), one row each:
    (mountpoint, pid, served by, since, layers)."""
    from ..daemon import client
    from ..serve.process import UNIONFS_TYPES
    from ..sys import mountinfo
    rows = {}
    for entry in mountinfo.mounts():
        if entry.fstype in UNIONFS_TYPES:
            stats = _mount_stats(entry.mount_point) or {}
            rows[entry.mount_point] = [entry.mount_point, str(stats.get("pid", "?")),
                                       "own server", _since(stats.get("since")), "-"]
    try:
        _, listed = client.api("GET", "/v1/mounts", socket_path=socket_path)
    except client.NoDaemon:
        listed = []
    for m in listed:
        layers = m.get("layers", {})
        shown = ":".join(layers.get("lowers", []))
        shown += f" + {layers['upper']}" if layers.get("upper") else " (read-only)"
        rows[m["mountpoint"]] = [m["mountpoint"], str(m.get("pid", "?")),
                                 f"daemon {m.get('id', '?')}", _since(m.get("since")), shown]
    return list(rows.values())


def _since(when):
    if not isinstance(when, (int, float)):
        return "?"
    seconds = max(0, int(time.time() - when))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


MOUNT_HEADER = ["MOUNT", "PID", "SERVED BY", "SINCE", "LAYERS"]


def mount_table(rows):
    return _table(rows, MOUNT_HEADER)


@click.command("which")
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def which(path, fmt):
    """Which layer serves PATH of a unionfs mount (copied up, whited out, opaque)."""
    try:
        answer = json.loads(os.getxattr(path, WHICH_XATTR, follow_symlinks=False))
    except FileNotFoundError:
        answer = _which_missing(path)
    except OSError as e:
        fail(f"unionfs which: {path}: {e.strerror} (is it on a unionfs mount?)")
    if fmt == "json":
        click.echo(json.dumps(answer, indent=1))
        return
    click.echo(_describe(answer))


def _which_missing(path):
    """A name that is not there: ask its directory's server about the entry."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        return json.loads(os.getxattr(parent, f"{WHICH_XATTR}/{name}", follow_symlinks=False))
    except OSError as e:
        fail(f"unionfs which: {path}: {e.strerror}")


def _describe(a):
    if not a.get("exists"):
        hidden = a.get("whited_out")
        if hidden:
            return f"{a['path']}: whited out in {hidden['layer']} ({hidden['layer_dir']}) " \
                   f"by {hidden['marker']}"
        return f"{a['path']}: does not exist in any layer"
    line = f"{a['path']}: {a['kind']} from {a['layer']} ({a['layer_dir']})"
    if a.get("copied_up") is True:
        line += ", copied up"
    elif a.get("copied_up") is False:
        line += ", made in the upper"
    if a.get("merged") and len(a["merged"]) > 1:
        line += f", merged from {', '.join(a['merged'])}"
    if a.get("opaque"):
        line += f", opaque in {a['opaque']}"
    if a.get("metacopy_data"):
        line += f", data still in {a['metacopy_data']['layer']}"
    return line


@click.command("events")
@click.option("--socket", "socket_path", metavar="PATH", help="The daemon's API socket.")
def events(socket_path):
    """Follow the daemon's events (mount, unmount, copy-up, error) as JSON lines."""
    from ..daemon import client
    try:
        for event in client.api_stream("/v1/events", socket_path=socket_path):
            if event.get("type") != "subscribed":
                click.echo(json.dumps(event))
    except client.NoDaemon as e:
        fail(f"unionfs events: {e} (`unionfs daemon` starts one)")
    except KeyboardInterrupt:
        pass
