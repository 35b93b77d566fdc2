"""The OCI distribution client: image references, auth, manifests, blobs, uploads.

Owns: the auth challenge (basic, and the bearer-token flow with tokens cached per
scope); manifest GET/HEAD/PUT (both OCI and Docker Accept types: a registry
answers 404 for an OCI manifest without the OCI type and rewrites a Docker v2
manifest to schema1 without its type); blob GETs that resume with Range;
HEAD, cross-repository mount and monolithic or chunked uploads.

Whatever a registry answers is hostile input: reads are capped before they
start, digests are checked against a strict grammar before they name
anything, credentials go only to the registry's own origin, and every failure
is a RegistryError carrying one printable line. httpx (~140 ms to import) is
imported when a Client opens, so `unionfs run` and `mount` never load it.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass

from .formats import INDEX_TYPES, MANIFEST_TYPES

MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

MAX_MANIFEST = 4 << 20      # the OCI spec lets registries refuse bigger ones
MAX_TOKEN_ANSWER = 1 << 20
READ_SIZE = 4 << 20         # httpcore reads 64 KiB at a time: ~250-350 MB/s here; 4 MiB: ~700

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

DIGEST_RE = re.compile(r"(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})\Z")


class RegistryError(Exception):
    """A registry problem, as one line for the user; status: the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def printable(text: object, limit: int = 200) -> str:
    """A server-provided string made safe for one terminal line."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[:limit] + "..."


def check_digest(digest: object, what: str = "digest") -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise RegistryError(f"invalid {what}: {printable(digest, 80)!r}")
    return digest


def hasher(digest: str):
    """A fresh hash object for digest's algorithm (sha256 or sha512)."""
    return hashlib.new(check_digest(digest).split(":", 1)[0])


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...})."""
    scheme, _, params = header.strip().partition(" ")
    found = {}
    for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))',
                         params):
        found[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return scheme.lower(), found


def error_line(status: int, body: bytes) -> str:
    """The registry's own error codes and messages when it sent them."""
    try:
        errors = json.loads(body)["errors"]
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") for e in errors]
        return printable(f"HTTP {status} ({'; '.join(parts)})")
    except Exception:  # noqa: BLE001 - any shape of body: fall back to the status
        return f"HTTP {status}"


def pull_scope(repo: str) -> str:
    return f"repository:{repo}:pull"


def push_scope(repo: str) -> str:
    return f"repository:{repo}:pull,push"


@dataclass
class FetchedManifest:
    """A manifest or index as the registry sent it, digest-checked."""
    media_type: str         # the Content-Type the registry answered
    data: bytes
    digest: str


def _reason(e: BaseException | None) -> str:
    """The first non-empty message along an exception's causes (httpx wraps
    ssl's and the socket's errors, sometimes with an empty message)."""
    seen = 0
    while e is not None and seen < 5:
        text = str(e)
        if text:
            return printable(text)
        e, seen = e.__cause__ or e.__context__, seen + 1
    return "connection failed"


def _tune_httpcore() -> None:
    # The lean path for blob bytes: httpcore reads 64 KiB per receive, which caps
    # a loopback pull at ~300 MB/s; 4 MiB reads double that (measured here).
    from httpcore._async.http11 import AsyncHTTP11Connection
    AsyncHTTP11Connection.READ_NUM_BYTES = max(AsyncHTTP11Connection.READ_NUM_BYTES, READ_SIZE)


class Client:
    """One registry, under trio: `async with Client(host, ...) as c`."""

    def __init__(self, registry: str, *, tls_verify: bool = True,
                 creds: tuple[str, str] | None = None, timeout: float = 60.0):
        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.tls_verify = tls_verify
        self.creds = creds
        self.timeout = timeout
        self.base = None            # "https://host" or "http://host", found by ping()
        self._scheme = None         # "basic" / "bearer" / None: the challenge seen
        self._challenge: dict[str, str] = {}
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._token_lock = None
        self._http = None

    async def __aenter__(self) -> Client:
        import httpx
        import trio
        _tune_httpcore()
        self._token_lock = trio.Lock()
        self._http = httpx.AsyncClient(
            verify=self.tls_verify, follow_redirects=True, max_redirects=5,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 15.0)),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            headers={"User-Agent": "unionfs"})
        try:
            await self.ping()
        except BaseException:
            await self._http.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    # -- transport -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _errors(self, what: str):
        import httpx
        try:
            yield
        except httpx.TooManyRedirects:
            raise RegistryError(f"{what}: too many redirects") from None
        except httpx.UnsupportedProtocol as e:
            raise RegistryError(f"{what}: redirected to an unsupported URL ({printable(e)})") \
                from None
        except httpx.TimeoutException:
            raise RegistryError(f"{what}: the registry timed out") from None
        except httpx.HTTPError as e:
            raise RegistryError(f"{what}: {_reason(e)}") from None

    async def ping(self) -> None:
        """GET /v2/: finds the scheme (https, or http when TLS is not verified) and the
        challenge, so that the first real request already carries credentials."""
        import httpx
        schemes = ["https"] if self.tls_verify else ["https", "http"]
        last = None
        for scheme in schemes:
            try:
                async with self._http.stream("GET", f"{scheme}://{self.host}/v2/",
                                             follow_redirects=False) as resp:
                    body = await self._read_capped(resp, 1 << 16, "/v2/ answer")
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError) as e:
                last = e
                continue
            except httpx.HTTPError as e:
                raise RegistryError(f"{self.registry}: {printable(e)}") from None
            self.base = f"{scheme}://{self.host}"
            if resp.status_code == 401:
                self._learn(resp.headers.get("www-authenticate", ""))
            elif resp.status_code >= 400:
                raise RegistryError(f"{self.registry}: /v2/ answered "
                                    f"{error_line(resp.status_code, body)} (not a registry?)",
                                    resp.status_code)
            return
        reason = _reason(last)
        hint = "" if not self.tls_verify or "CERTIFICATE" in reason else \
            " (plain HTTP needs --tls-verify=false)"
        raise RegistryError(f"{self.registry}: cannot connect: {reason}{hint}")

    def _learn(self, header: str) -> None:
        scheme, params = parse_challenge(header)
        if scheme not in ("basic", "bearer"):
            raise RegistryError(f"{self.registry}: unsupported auth challenge "
                                f"{printable(header, 80)!r}")
        if scheme == "bearer":
            realm = params.get("realm", "")
            if not realm.startswith(("https://", "http://")):
                raise RegistryError(f"{self.registry}: bearer challenge without a usable realm")
        self._scheme, self._challenge = scheme, params

    def _basic(self) -> str:
        user, password = self.creds
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    async def _authorization(self, scopes: tuple[str, ...]) -> str | None:
        if self._scheme == "basic":
            if self.creds is None:
                raise RegistryError(f"{self.registry}: authentication required "
                                    "(pass --creds USER:PASS)")
            return self._basic()
        if self._scheme == "bearer":
            return "Bearer " + await self._token(scopes)
        return None

    async def _token(self, scopes: tuple[str, ...]) -> str:
        async with self._token_lock:
            cached = self._tokens.get(scopes)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            params = [("scope", s) for s in scopes]
            if "service" in self._challenge:
                params.append(("service", self._challenge["service"]))
            headers = {"Authorization": self._basic()} if self.creds else {}
            realm = self._challenge["realm"]
            async with self._errors(f"{self.registry}: token from {printable(realm, 80)}"):
                async with self._http.stream("GET", realm, params=params,
                                             headers=headers) as resp:
                    body = await self._read_capped(resp, MAX_TOKEN_ANSWER, "token answer")
            if resp.status_code in (401, 403):
                raise RegistryError(f"{self.registry}: the token server refused "
                                    f"{'the credentials' if self.creds else 'anonymous access'}"
                                    f" ({error_line(resp.status_code, body)})")
            if resp.status_code != 200:
                raise RegistryError(f"{self.registry}: token server: "
                                    f"{error_line(resp.status_code, body)}")
            try:
                answer = json.loads(body)
                token = answer.get("token") or answer.get("access_token")
                lifetime = float(answer.get("expires_in") or 60)
            except (ValueError, AttributeError, TypeError):
                raise RegistryError(f"{self.registry}: the token server's answer is not "
                                    "a token") from None
            if not isinstance(token, str) or not token or not token.isprintable():
                raise RegistryError(f"{self.registry}: the token server sent no token")
            # Expire a little early: the token must outlive the request it is sent with.
            self._tokens[scopes] = (token, time.monotonic() + max(lifetime - 10, 1))
            return token

    def _same_origin(self, url) -> bool:
        import httpx
        u = httpx.URL(url)
        return f"{u.scheme}://{u.netloc.decode()}" == self.base

    async def send(self, method: str, url: str, scopes: tuple[str, ...], *,
                   headers: dict | None = None, body=None, params=None):
        """A streamed response (the caller closes it) after the auth dance.

        body: None, bytes, or a function returning a fresh async iterator of
        bytes (a 401 makes us send it again)."""
        url = url if url.startswith(("http://", "https://")) else self.base + url
        for attempt in (1, 2):
            h = dict(headers or {})
            if self._same_origin(url):
                auth = await self._authorization(scopes)
                if auth:
                    h["Authorization"] = auth
            content = body() if callable(body) else body
            req = self._http.build_request(method, url, headers=h, content=content, params=params)
            resp = await self._http.send(req, stream=True)
            if resp.status_code == 401 and attempt == 1:
                header = resp.headers.get("www-authenticate", "")
                await resp.aclose()
                scheme, _ = parse_challenge(header)
                if (self._scheme == "basic" and scheme == "basic") or not header:
                    raise RegistryError(f"{self.registry}: authentication failed"
                                        + ("" if self.creds else " (pass --creds USER:PASS)"))
                self._learn(header)
                self._tokens.pop(scopes, None)
                continue
            if resp.status_code == 401:
                await resp.aclose()
                raise RegistryError(f"{self.registry}: not authorized for "
                                    f"{', '.join(scopes)}")
            return resp
        raise AssertionError("unreachable")

    async def _read_capped(self, resp, limit: int, what: str) -> bytes:
        if resp.request.method == "HEAD":
            return b""
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RegistryError(f"{what} too big: {int(length)} bytes (at most {limit})")
        chunks, n = [], 0
        async for chunk in resp.aiter_raw():
            n += len(chunk)
            if n > limit:
                raise RegistryError(f"{what} too big: more than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _simple(self, method, url, scopes, what, *, ok, limit=1 << 16, **kw):
        """Send, read a small body, raise on a status outside ok."""
        async with self._errors(what):
            resp = await self.send(method, url, scopes, **kw)
            try:
                body = await self._read_capped(resp, limit, what)
            finally:
                await resp.aclose()
        if resp.status_code not in ok:
            raise RegistryError(f"{what}: {error_line(resp.status_code, body)}",
                                resp.status_code)
        return resp, body

    # -- manifests -----------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str) -> FetchedManifest:
        what = f"{self.registry}/{repo}:{printable(reference, 80)}"
        by_digest = DIGEST_RE.match(reference) is not None
        resp, body = await self._simple(
            "GET", f"/v2/{repo}/manifests/{reference}", (pull_scope(repo),),
            f"manifest {what}", ok=(200,), limit=MAX_MANIFEST,
            headers={"Accept": MANIFEST_ACCEPT})
        digest = (digest_of(body, reference.split(":")[0]) if by_digest
                  else digest_of(body))
        if by_digest and digest != reference:
            raise RegistryError(f"manifest {what}: the registry sent content with "
                                f"digest {digest}")
        announced = resp.headers.get("docker-content-digest")
        if not by_digest and announced and DIGEST_RE.match(announced) and \
                announced.startswith("sha256:") and announced != digest:
            raise RegistryError(f"manifest {what}: content does not match the registry's "
                                f"Docker-Content-Digest {announced}")
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        return FetchedManifest(media_type, body, digest)

    async def head_manifest(self, repo: str, reference: str, scopes=None) -> str | None:
        """The digest the registry has under reference, or None."""
        resp, _ = await self._simple(
            "HEAD", f"/v2/{repo}/manifests/{reference}", scopes or (pull_scope(repo),),
            f"manifest {self.registry}/{repo}:{reference}", ok=(200, 404),
            headers={"Accept": MANIFEST_ACCEPT})
        digest = resp.headers.get("docker-content-digest")
        return digest if resp.status_code == 200 and digest and DIGEST_RE.match(digest) else None

    async def put_manifest(self, repo: str, reference: str, media_type: str,
                           data: bytes) -> str:
        digest = digest_of(data)
        resp, _ = await self._simple(
            "PUT", f"/v2/{repo}/manifests/{reference}", (push_scope(repo),),
            f"put manifest {self.registry}/{repo}:{reference}", ok=(200, 201),
            headers={"Content-Type": media_type}, body=data)
        answered = resp.headers.get("docker-content-digest")
        if answered and answered != digest:
            raise RegistryError(f"put manifest {repo}:{reference}: the registry stored "
                                f"{printable(answered, 80)}, not {digest}")
        return digest

    # -- blobs ---------------------------------------------------------------

    async def get_small_blob(self, repo: str, digest: str, size: int, limit: int) -> bytes:
        """A whole blob in memory (a config), size- and digest-checked."""
        check_digest(digest)
        if size > limit:
            raise RegistryError(f"blob {digest}: {size} bytes is too big (at most {limit})")
        _, body = await self._simple("GET", f"/v2/{repo}/blobs/{digest}", (pull_scope(repo),),
                                     f"blob {digest}", ok=(200,), limit=limit,
                                     headers={"Accept-Encoding": "identity"})
        if len(body) != size:
            raise RegistryError(f"blob {digest}: got {len(body)} bytes, expected {size}")
        h = hasher(digest)
        h.update(body)
        if f"{digest.split(':')[0]}:{h.hexdigest()}" != digest:
            raise RegistryError(f"blob {digest}: content does not match its digest")
        return body

    @contextlib.asynccontextmanager
    async def open_blob(self, repo: str, digest: str, size: int, offset: int = 0):
        """Yields (start, chunks): the bytes of the blob from start (offset if the
        registry honoured the Range, else 0) to exactly size, or RegistryError.
        Nothing beyond size is ever read; a short body is an error."""
        check_digest(digest)
        what = f"blob {digest}"
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        async with self._errors(what):
            resp = await self.send("GET", f"/v2/{repo}/blobs/{digest}", (pull_scope(repo),),
                                   headers=headers)
            try:
                if resp.status_code == 416 and offset == size:
                    start = size
                elif resp.status_code == 206 and offset:
                    m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)\Z",
                                 resp.headers.get("content-range", ""))
                    if not m or int(m.group(1)) != offset or \
                            (m.group(3) != "*" and int(m.group(3)) != size):
                        raise RegistryError(f"{what}: the registry answered another range "
                                            f"({printable(resp.headers.get('content-range'))})")
                    start = offset
                elif resp.status_code == 200:
                    start = 0
                else:
                    body = await self._read_capped(resp, 1 << 16, what)
                    raise RegistryError(f"{what}: {error_line(resp.status_code, body)}")
                length = resp.headers.get("content-length")
                if start < size and length is not None and \
                        (not length.isdigit() or int(length) != size - start):
                    raise RegistryError(f"{what}: the registry announces {printable(length, 30)}"
                                        f" bytes from {start}, the manifest says {size} in all")
                yield start, self._exactly(resp, size - start if start < size else 0, what,
                                           start)
            finally:
                await resp.aclose()

    async def _exactly(self, resp, want: int, what: str, start: int):
        got = 0
        if want:
            async for chunk in resp.aiter_raw():
                got += len(chunk)
                if got > want:
                    raise RegistryError(f"{what}: the registry sent more than the manifest's "
                                        f"{start + want} bytes")
                yield chunk
        if got < want:
            raise RegistryError(f"{what}: truncated at {start + got} of {start + want} bytes")

    async def blob_size(self, repo: str, digest: str, scopes=None) -> int | None:
        """HEAD: the blob's size if the registry has it in repo, else None."""
        resp, _ = await self._simple("HEAD", f"/v2/{repo}/blobs/{check_digest(digest)}",
                                     scopes or (pull_scope(repo),), f"blob {digest}",
                                     ok=(200, 404))
        length = resp.headers.get("content-length", "")
        return int(length) if resp.status_code == 200 and length.isdigit() else None

    # -- uploads -------------------------------------------------------------

    def _location(self, resp, what: str) -> str:
        location = resp.headers.get("location")
        if not location:
            raise RegistryError(f"{what}: the registry gave no upload location")
        url = resp.url.join(location)
        if url.scheme not in ("http", "https"):
            raise RegistryError(f"{what}: unusable upload location")
        return str(url)

    async def start_upload(self, repo: str, digest: str, mount_from: str | None = None):
        """POST an upload; with mount_from, ask to mount the blob from that repository.

        Returns (None, None) when mounted, else (location, minimum chunk size)."""
        scopes = (push_scope(repo),) + ((pull_scope(mount_from),) if mount_from else ())
        params = {"mount": digest, "from": mount_from} if mount_from else None
        what = f"upload {digest} to {repo}"
        resp, _ = await self._simple("POST", f"/v2/{repo}/blobs/uploads/", scopes, what,
                                     ok=(201, 202), params=params,
                                     headers={"Content-Length": "0"})
        if resp.status_code == 201 and mount_from:
            return None, None
        minimum = resp.headers.get("oci-chunk-min-length", "")
        return self._location(resp, what), int(minimum) if minimum.isdigit() else 0

    async def upload(self, repo: str, digest: str, size: int, location: str, read,
                     chunk_size: int | None = None, on_sent=None) -> None:
        """Send a blob to an upload location: one PUT, or PATCH chunks then a PUT.

        read(offset, length) returns a fresh async iterator over those bytes."""
        import httpx
        what = f"upload {digest} to {repo}"
        scopes = (push_scope(repo),)

        def counted(offset, length):
            async def gen():
                async for chunk in read(offset, length):
                    if on_sent:
                        on_sent(len(chunk))
                    yield chunk
            return gen

        final_body, final_len = None, 0
        if chunk_size and size > chunk_size:
            offset = 0
            while offset < size:
                n = min(chunk_size, size - offset)
                resp, _ = await self._simple(
                    "PATCH", location, scopes, what, ok=(202,), body=counted(offset, n),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Length": str(n),
                             "Content-Range": f"{offset}-{offset + n - 1}"})
                location = self._location(resp, what)
                offset += n
        else:
            final_body, final_len = counted(0, size), size
        url = httpx.URL(location)
        url = url.copy_merge_params({"digest": digest})
        resp, _ = await self._simple(
            "PUT", str(url), scopes, what, ok=(201,), body=final_body,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(final_len)})
        answered = resp.headers.get("docker-content-digest")
        if answered and answered != digest:
            raise RegistryError(f"{what}: the registry stored {printable(answered, 80)}")
