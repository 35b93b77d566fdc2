"""The control API's routes (docs/api.md): mounts, stats, provenance, events.

Every route answers for the caller (SO_PEERCRED): root sees and controls
every mount, anyone else only their own; a mount someone may not see is
answered as if it did not exist (404). Stats and provenance come from the
server itself, over its control socket (serve.control), so the numbers are
the server's own and the daemon keeps none.
"""
import json
import os
import sys
import urllib.parse

import trio

from .http import Response

CONTROL_TIMEOUT = 10.0
UNMOUNT_TIMEOUT = 10.0


async def control_request(mount, request: dict, timeout=CONTROL_TIMEOUT) -> dict:
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(mount.control)
        async with stream:
            await stream.send_all((json.dumps(request) + "\n").encode())
            buffer = b""
            while not buffer.endswith(b"\n"):
                data = await stream.receive_some(65536)
                if not data:
                    raise OSError("the server closed its control socket")
                buffer += data
    return json.loads(buffer)


def _not_found(what="no such mount"):
    return Response(404, {"error": what})


async def handle(request, daemon) -> Response:
    path, _, query = request.target.partition("?")
    params = urllib.parse.parse_qs(query)
    parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
    uid = request.peer[1]
    if parts[:1] != ["v1"]:
        return _not_found("no such endpoint (the API is under /v1)")
    parts = parts[1:]
    method = request.method
    if parts == ["info"] and method == "GET":
        return Response(200, daemon.info())
    if parts == ["events"] and method == "GET":
        return Response(200, stream=daemon.events.stream(uid))
    if parts == ["mounts"]:
        if method == "GET":
            return Response(200, [m.public() for m in daemon.registry.visible_to(uid)])
        if method == "POST":
            return await _create(request, daemon)
        return Response(405, {"error": "use GET or POST"})
    if len(parts) >= 2 and parts[0] == "mounts":
        mount = daemon.registry.mounts.get(parts[1])
        if mount is None or (uid != 0 and mount.owner_uid != uid):
            return _not_found()
        rest = parts[2:]
        try:
            if rest == [] and method == "GET":
                return Response(200, mount.public())
            if rest == [] and method == "DELETE":
                return await _unmount(mount, daemon)
            if rest == ["stats"] and method == "GET":
                return Response(200, await control_request(mount, {"op": "stats"}))
            if rest == ["which"] and method == "GET":
                target = params.get("path", [""])[0]
                answer = await control_request(mount, {"op": "which", "path": target})
                return Response(404 if "error" in answer else 200, answer)
        except (OSError, ValueError, trio.TooSlowError) as e:
            return Response(502, {"error": f"the server of mount {mount.id} did not answer: {e}"})
    return _not_found("no such endpoint")


async def _unmount(mount, daemon) -> Response:
    answer = await control_request(mount, {"op": "unmount"})
    if "error" in answer:
        return Response(409, answer)
    with trio.move_on_after(UNMOUNT_TIMEOUT):
        while mount.id in daemon.registry.mounts:
            await trio.sleep(0.01)
    return Response(200, {"unmounted": mount.id, "server_exited": mount.id not in
                          daemon.registry.mounts})


async def _create(request, daemon) -> Response:
    """POST /v1/mounts: a mount in the daemon's own mount namespace, made by a
    client process running with the caller's credentials (so the layers are
    opened with the caller's rights, never the daemon's)."""
    try:
        body = request.json()
        lowers, mountpoint = body["lowers"], body["mountpoint"]
        if not isinstance(lowers, list) or not lowers or not isinstance(mountpoint, str):
            raise ValueError("lowers (a list) and mountpoint are required")
    except (ValueError, KeyError, TypeError) as e:
        return Response(400, {"error": f"bad request: {e}"})
    argv = [sys.executable, "-m", "unionfs.daemon.client", "--socket", daemon.api_socket]
    for lower in lowers:
        argv += ["--lower", str(lower)]
    if body.get("upper"):
        argv += ["--upper", str(body["upper"]), "--work", str(body.get("work", ""))]
    for option in body.get("options", []):
        argv += ["-o", str(option)]
    argv.append(mountpoint)
    pid, uid, gid = request.peer
    extra = {}
    if uid != os.getuid():
        extra = {"user": uid, "group": gid, "extra_groups": _groups(pid)}
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                    **extra)
    if result.returncode != 0:
        return Response(400, {"error": result.stderr.decode(errors="replace").strip()})
    answer = json.loads(result.stdout)
    mount = daemon.registry.mounts.get(answer.get("id"))
    return Response(201, mount.public() if mount else answer)


def _groups(pid):
    from .mounting import _groups_of
    return _groups_of(pid)
