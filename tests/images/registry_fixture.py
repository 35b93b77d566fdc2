"""Real registries for the image tests and the benchmark, started by them.

- `Registry`: Debian's docker-registry on a free loopback port, plain, with
  basic auth (an htpasswd file hashed with PyPI's bcrypt) or with token auth;
  ready when /v2/ answers (~55 ms), stopped by its PID.
- `TokenServer`: the bearer-token half of token auth: checks basic
  credentials, grants scopes by a per-user policy and signs JWTs (ES256,
  PyJWT) with a test key whose certificate is the registry's rootcertbundle.
- `Proxy`: a loopback HTTP proxy in front of a registry that logs every
  request and lets a test rewrite answers (wrong digests, truncated blobs,
  non-JSON manifests, huge sizes, redirects) or slow them down.
"""
import base64
import contextlib
import http.client
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(host: str, path: str, headers=None):
    conn = http.client.HTTPConnection(host, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class Registry:
    """docker-registry serving root/data on 127.0.0.1:PORT.

    auth: None, ("basic", {user: password}) or ("token", TokenServer)."""

    def __init__(self, root, auth=None):
        self.root = str(root)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.data = os.path.join(self.root, "data")
        self.auth = auth
        self.proc = None

    def _config(self) -> str:
        lines = ["version: 0.1",
                 "log: {level: warn, accesslog: {disabled: true}}",
                 f"storage: {{filesystem: {{rootdirectory: {self.data}}}, "
                 "delete: {enabled: true}}",
                 f"http: {{addr: {self.host}, secret: {secrets.token_hex(16)}}}"]
        if self.auth and self.auth[0] == "basic":
            import bcrypt
            path = os.path.join(self.root, "htpasswd")
            with open(path, "w") as f:
                for user, password in self.auth[1].items():
                    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
                    f.write(f"{user}:{hashed.decode()}\n")
            lines.append(f"auth: {{htpasswd: {{realm: test-realm, path: {path}}}}}")
        elif self.auth and self.auth[0] == "token":
            ts = self.auth[1]
            lines.append(f"auth: {{token: {{realm: '{ts.realm}', service: {ts.service}, "
                         f"issuer: {ts.issuer}, rootcertbundle: {ts.cert_path}}}}}")
        path = os.path.join(self.root, "config.yml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self) -> "Registry":
        os.makedirs(self.data, exist_ok=True)
        config = self._config()
        self.log = open(os.path.join(self.root, "registry.log"), "wb")
        self.proc = subprocess.Popen([DOCKER_REGISTRY, "serve", config], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_text()}")
            try:
                status, _, _ = _get(self.host, "/v2/")
                if status in (200, 401):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer: {self.log_text()}")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc:
            self.log.close()

    def log_text(self) -> str:
        self.log.flush()
        with open(os.path.join(self.root, "registry.log"), errors="replace") as f:
            return f.read()[-2000:]

    def blob_file(self, digest: str) -> str:
        """Where the registry keeps a blob's bytes (tests corrupt it there)."""
        algo, hexpart = digest.split(":")
        return os.path.join(self.data, "docker/registry/v2/blobs", algo, hexpart[:2], hexpart,
                            "data")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass    # a client hanging up on a throttled or hostile answer is expected


class TokenServer:
    """Issues registry tokens. users: {name: password}; grants: {name or None
    (anonymous): {repository: "pull" | "pull,push"}} ("*" matches any repo)."""

    def __init__(self, root, users, grants, service="test-registry", issuer="test-issuer"):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users, self.grants = users, grants
        self.service, self.issuer = service, issuer
        self.requests = []          # (user or None, [scopes]) per token request
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unionfs test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.cert_path = os.path.join(str(root), "token-signer.pem")
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server._answer(self)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _user(self, handler):
        header = handler.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None, True
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user, self.users.get(user) == password

    def _answer(self, handler):
        import jwt
        query = urllib.parse.parse_qs(urllib.parse.urlparse(handler.path).query)
        user, ok = self._user(handler)
        scopes = query.get("scope", [])
        self.requests.append((user, scopes))
        if not ok:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
            handler.send_response(401)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        granted = self.grants.get(user, {})
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            allowed = set((granted.get(repo) or granted.get("*") or "").split(","))
            ok_actions = [a for a in actions.split(",") if a in allowed]
            if kind == "repository" and ok_actions:
                access.append({"type": "repository", "name": repo, "actions": ok_actions})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service,
                  "exp": now + 300, "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8),
                  "access": access}
        token = jwt.encode(claims, self.key, algorithm="ES256",
                           headers={"x5c": [base64.b64encode(self.cert_der).decode()]})
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class Proxy:
    """A loopback proxy to upstream (host:port) that logs and may rewrite.

    rewrite(method, path, headers) may return None (forward as is) or a
    tuple (status, headers, body bytes); `throttle` (bytes per second)
    slows down blob bodies; `log` holds (method, path, Range header, bytes
    sent) per request."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.rewrite = None
        self.throttle = None
        self.log = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                proxy._handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handle(self, h):
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        entry = [h.command, h.path, h.headers.get("Range"), 0]
        self.log.append(entry)
        answer = self.rewrite(h.command, h.path, h.headers) if self.rewrite else None
        if answer is not None:
            status, headers, data = answer
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            if "Content-Length" not in headers:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
                entry[3] = len(data)
            h.wfile.flush()
            if headers.get("Connection") == "close":
                h.close_connection = True
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() != "host"}
            headers["Host"] = self.upstream
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() == "location":
                    v = v.replace(self.upstream, self.host)
                if k.lower() not in ("transfer-encoding", "connection"):
                    h.send_header(k, v)
            data = resp.read()
            if resp.getheader("Content-Length") is None and h.command != "HEAD":
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command == "HEAD":
                return
            step = 64 << 10
            for i in range(0, len(data), step):
                if self.throttle and "/blobs/sha256:" in h.path and h.command == "GET":
                    time.sleep(step / self.throttle)
                h.wfile.write(data[i:i + step])
                entry[3] += len(data[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        finally:
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def token_registry(root, users, grants):
    """A registry with token auth and its token server; yields (registry, tokens)."""
    with TokenServer(root, users, grants) as tokens, \
            Registry(root, auth=("token", tokens)) as reg:
        yield reg, tokens
