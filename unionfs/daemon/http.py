"""HTTP/1.1 over the daemon's UNIX socket, with h11 on trio.

h11 (the trio project's HTTP/1.1 protocol library) parses and frames; this
module only moves bytes and hands each request, with the peer's
credentials (SO_PEERCRED: who is asking, whatever the request says), to a
handler: `handler(request) -> Response`. A streamed response (the event
stream) gives an async iterator of chunks instead of a body. Keep-alive is
honoured, so `curl --unix-socket` and the CLI both work.
"""
import json
from dataclasses import dataclass, field

import h11
import trio

from . import wire

MAX_BODY = 1 << 20


@dataclass
class Request:
    method: str
    target: str
    headers: dict
    body: bytes
    peer: tuple            # (pid, uid, gid)

    def json(self):
        return json.loads(self.body or b"{}")


@dataclass
class Response:
    status: int
    body: object = None                 # JSON-able, or None
    stream: object = None               # async iterator of JSON-able chunks
    headers: list = field(default_factory=list)


async def serve_connection(stream: trio.SocketStream, handler) -> None:
    peer = wire.peer_credentials(stream.socket)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
    try:
        while True:
            request = await _read_request(stream, conn)
            if request is None:
                return
            request = Request(request[0], request[1], request[2], request[3], peer)
            try:
                response = await handler(request)
            except Exception as e:  # noqa: BLE001 - one line to the client, the daemon goes on
                response = Response(500, {"error": f"{type(e).__name__}: {e}"})
            await _send_response(stream, conn, response)
            if conn.our_state is h11.MUST_CLOSE or response.stream is not None:
                return
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _read_request(stream, conn):
    method = target = None
    headers, body = {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            method, target = event.method.decode(), event.target.decode()
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("body too large")
        elif isinstance(event, h11.EndOfMessage):
            return method, target, headers, body
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _encode(obj) -> bytes:
    return (json.dumps(obj, indent=None, separators=(",", ":")) + "\n").encode()


async def _send_response(stream, conn, response: Response) -> None:
    headers = [("content-type", "application/json"), *response.headers]
    if response.stream is None:
        body = _encode(response.body if response.body is not None else {})
        headers.append(("content-length", str(len(body))))
        await stream.send_all(conn.send(h11.Response(status_code=response.status,
                                                     headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return
    headers.append(("transfer-encoding", "chunked"))
    await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
    async for chunk in response.stream:
        await stream.send_all(conn.send(h11.Data(data=_encode(chunk))))
    await stream.send_all(conn.send(h11.EndOfMessage()))
