"""Real registries for the image tests and the benchmark, started by them.

- `Registry`: Debian's docker-registry on a free loopback port, plain, with
  basic auth (an htpasswd file hashed with PyPI's bcrypt) or with token auth;
  ready when /v2/ answers (~55 ms), stopped by its PID.
- `TokenServer`: the bearer-token half of token auth: checks basic
  credentials, grants scopes by a per-user policy and signs JWTs (ES256,
  PyJWT) with a test key whose certificate is the registry's rootcertbundle.
- images: layer tars (tarbuild's), OCI layouts with any mix of compressions,
  indexes, skopeo and umoci; rootfs comparison is treecmp's.
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


def _get(host: str, path: str, headers=None, tls=False):
    if tls:
        import ssl
        conn = http.client.HTTPSConnection(host, timeout=5,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(host, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class Registry:
    """docker-registry serving root/data on 127.0.0.1:PORT.

    auth: None, ("basic", {user: password}) or ("token", TokenServer);
    tls: serve HTTPS with a self-signed certificate for 127.0.0.1 (cert_path)."""

    def __init__(self, root, auth=None, tls=False):
        self.root = str(root)
        self.tls = tls
        self.cert_path = os.path.join(self.root, "registry-cert.pem")
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
        if self.tls:
            key_path = self._self_signed()
            lines[3] = lines[3][:-1] + (f", tls: {{certificate: {self.cert_path}, "
                                        f"key: {key_path}}}}}")
        path = os.path.join(self.root, "config.yml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _self_signed(self) -> str:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .sign(key, hashes.SHA256()))
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        key_path = os.path.join(self.root, "registry-key.pem")
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return key_path

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
                status, _, _ = _get(self.host, "/v2/", tls=self.tls)
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

        os.makedirs(str(root), exist_ok=True)
        self.users, self.grants = users, grants
        self.service, self.issuer = service, issuer
        self.requests = []          # (user or None, [scopes]) per token request
        self.broken = False         # answer 200 with something that is not a token
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
        if self.broken:
            handler.send_response(200)
            handler.send_header("Content-Length", "9")
            handler.end_headers()
            handler.wfile.write(b"<html>hi!")
            return
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
    slows down blob bodies; `log` holds [method, path, Range header, bytes
    sent, start time, end time] per request."""

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
        entry = [h.command, h.path, h.headers.get("Range"), 0, time.monotonic(), None]
        self.log.append(entry)
        try:
            self._answer(h, body, entry)
        finally:
            entry[5] = time.monotonic()

    def _answer(self, h, body, entry):
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
            # header by header: clients send Accept several times, and each counts
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.upstream)
            for k, v in h.headers.items():
                if k.lower() not in ("host", "content-length"):
                    conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
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


# -- images: layers made with tarfile (a writer here), OCI layouts, real tools --

def tar_entries(entries) -> bytes:
    """A layer tar (tarbuild's) from (kind, name, props) tuples: kind is file,
    dir, symlink, hardlink, fifo, chardev; props: data, mode, uid, gid,
    target, xattrs, major, minor."""
    from tarbuild import entry, make_tar
    kinds = {"chardev": "char"}
    return make_tar([entry(name, kinds.get(kind, kind), props.get("data", b""),
                           mode=props.get("mode"), uid=props.get("uid", 0),
                           gid=props.get("gid", 0), link=props.get("target", ""),
                           xattrs=props.get("xattrs"),
                           dev=(props.get("major", 0), props.get("minor", 0)))
                     for kind, name, props in entries])


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        import gzip
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


LAYER_TYPES = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
               "none": "application/vnd.oci.image.layer.v1.tar"}


def _put_blob(layout: str, data: bytes) -> dict:
    import hashlib
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest[7:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def oci_image(layout: str, layers, arch: str = "amd64") -> dict:
    """Write an image (layers: [(tar bytes, compression)]) into an OCI layout;
    returns its manifest descriptor (not yet named in index.json)."""
    import hashlib
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    descs, diff_ids = [], []
    for tar, compression in layers:
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        descs.append({"mediaType": LAYER_TYPES[compression],
                      **_put_blob(layout, compress(tar, compression))})
    config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    cfg = _put_blob(layout, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
                "layers": descs}
    return {"mediaType": manifest["mediaType"],
            **_put_blob(layout, json.dumps(manifest).encode()),
            "platform": {"architecture": arch, "os": "linux"}}


def name_in_layout(layout: str, tag: str, desc: dict) -> None:
    """Point tag at desc in the layout's index.json (replacing an older one)."""
    path = os.path.join(layout, "index.json")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        index = {"schemaVersion": 2, "manifests": []}
    key = "org.opencontainers.image.ref.name"
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get(key) != tag]
    index["manifests"].append({**desc, "annotations": {key: tag}})
    with open(path, "w") as f:
        json.dump(index, f)


def oci_index(layout: str, manifests) -> dict:
    """A multi-platform image index blob over manifest descriptors."""
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": manifests}
    return {"mediaType": index["mediaType"], **_put_blob(layout, json.dumps(index).encode())}


def skopeo(*args, check=True):
    """Run skopeo (insecure loopback registries); returns the CompletedProcess."""
    proc = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def skopeo_push(layout: str, tag: str, dest: str, *extra):
    """oci:layout:tag -> docker://dest over plain HTTP."""
    return skopeo("copy", "-q", "--dest-tls-verify=false", *extra, f"oci:{layout}:{tag}",
                  f"docker://{dest}")


def umoci_unpack(layout: str, tag: str, dest: str) -> str:
    """umoci's own flattening of an image: the oracle for what a pull unpacks."""
    proc = subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", dest],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"umoci unpack: {proc.stderr.strip()}")
    return os.path.join(dest, "rootfs")


def sample_layers(seed: int = 0):
    """The interop image: a base layer with every entry kind, owners, modes
    with setuid/setgid/sticky, xattrs, absolute and relative symlinks, a
    hard-link set, a device and a FIFO; then a layer with whiteouts (a file,
    a directory) and an opaque directory; then a small top layer."""
    import random
    rnd = random.Random(seed)
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    big = rnd.randbytes(3 << 20)        # incompressible: a pull worth interrupting
    base = [
        ("dir", "bin", {}), ("file", "bin/busybox", {"data": busybox, "mode": 0o755}),
        ("symlink", "bin/sh", {"target": "busybox"}),
        ("dir", "etc", {}), ("file", "etc/passwd", {"data": b"root:x:0:0::/root:/bin/sh\n"}),
        ("symlink", "etc/localtime", {"target": "/usr/share/zoneinfo/UTC"}),
        ("dir", "tmp", {"mode": 0o1777}), ("fifo", "tmp/fifo", {"mode": 0o600}),
        ("dir", "dev", {}), ("chardev", "dev/null", {"mode": 0o666, "major": 1, "minor": 3}),
        ("dir", "data", {"mode": 0o750, "uid": 1000, "gid": 1000}),
        ("file", "data/file", {"data": b"owned\n", "mode": 0o640, "uid": 1000, "gid": 1000,
                               "xattrs": {"user.comment": "hello"}}),
        ("file", "data/setuid", {"data": b"#!/bin/sh\n", "mode": 0o4755}),
        ("file", "data/setgid", {"data": b"#!/bin/sh\n", "mode": 0o2755, "gid": 50}),
        ("file", "data/empty", {}),
        ("file", "data/big", {"data": big}),
        ("file", "data/h1", {"data": b"linked\n", "uid": 1001}),
        ("hardlink", "data/h2", {"target": "data/h1"}),
        ("hardlink", "data/h3", {"target": "data/h1"}),
        ("file", "data/gone", {"data": b"deleted above\n"}),
        ("dir", "data/gonedir", {}), ("file", "data/gonedir/x", {"data": b"x"}),
        ("dir", "opaque", {}), ("file", "opaque/a", {"data": b"a"}),
        ("dir", "opaque/sub", {}), ("file", "opaque/sub/c", {"data": b"c"}),
    ]
    upper = [
        ("dir", "data", {"mode": 0o750, "uid": 1000, "gid": 1000}),
        ("file", "data/.wh.gone", {}), ("file", "data/.wh.gonedir", {}),
        ("file", "data/file", {"data": b"changed\n", "mode": 0o600, "uid": 1000,
                               "gid": 1000, "xattrs": {"user.comment": "again"}}),
        ("dir", "opaque", {"mode": 0o700}), ("file", "opaque/.wh..wh..opq", {}),
        ("file", "opaque/new", {"data": b"new"}),
        ("file", "etc/passwd", {"data": b"root:x:0:0::/root:/bin/sh\nu:x:1000:1000::/:/\n"}),
    ]
    top = [("file", "top.txt", {"data": b"top %d\n" % seed, "xattrs": {"user.k": "v"}}),
           ("symlink", "dangling", {"target": "../nowhere"})]
    return [tar_entries(base), tar_entries(upper), tar_entries(top)]
