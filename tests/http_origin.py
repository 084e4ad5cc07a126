"""A real HTTP file server on 127.0.0.1 for the download tests: honours `Range` (206 + Content-Range), and can
be told to misbehave the way public dataset sites do.

    origin = HttpOrigin().start()
    origin.add("dtd-r1.0.1.tar.gz", data)        # served at origin.url("dtd-r1.0.1.tar.gz") (headers= adds some)
    origin.faults.fail("x", 500, times=2)         # the next 2 requests for x get 500
    origin.faults.drop("x", after=1000)           # the next response for x stops after 1000 body bytes
    origin.faults.status["x"] = 403               # always 403 (401/403/404/410...), `headers` adds some
    origin.faults.html.add("x")                   # 200 with a login page instead of the file
    origin.faults.no_range.add("x")               # ignores Range (one stream)
    origin.faults.budget["x"] = 3                 # 3 more file responses, then 503 until the entry goes
    origin.faults.hold["x"] = 3                   # 3 more file responses, then hang until faults.release.set()
    origin.bytes_served, origin.served("x"), origin.requests   # body bytes sent; (method, path, range) log
    origin.authorizations                         # the Authorization headers received

A request whose target is an absolute URL (a client using this server as its HTTP proxy) is served by path, so
clients with a fixed endpoint (`http://localhost`) reach it through HTTP_PROXY.
"""

from __future__ import annotations

import http.server
import select
import socket
import threading
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field

HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"


@dataclass
class Faults:
    errors: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    drops: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    status: dict[str, int] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    html: set[str] = field(default_factory=set)
    no_range: set[str] = field(default_factory=set)
    budget: dict[str, int] = field(default_factory=dict)  # name -> file responses left, then 503 for good
    hold: dict[str, int] = field(default_factory=dict)  # name -> file responses left, then wait for `release`
    release: threading.Event = field(default_factory=threading.Event)


    def fail(self, name: str, code: int = 500, times: int = 1) -> None:
        self.errors[name].extend([code] * times)

    def drop(self, name: str, after: int, times: int = 1) -> None:
        self.drops[name].extend([after] * times)


class HttpOrigin:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host  # another address (0.0.0.0) lets containers of the Kubernetes tier reach it
        self.files: dict[str, bytes] = {}
        self.file_headers: dict[str, dict[str, str]] = {}
        self.faults = Faults()
        self.bytes_served = 0
        self.per_file: dict[str, int] = defaultdict(int)
        self.requests: list[tuple[str, str, str | None]] = []
        self.authorizations: list[str] = []  # the Authorization headers received
        self.lock = threading.Lock()
        self.routes: list = []  # (method, path prefix, fn(handler, path, body) -> bool) for servers built on this
        self.server: http.server.ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------------------------------------- API

    def start(self) -> HttpOrigin:
        origin = self

        class Handler(_Handler):
            pass

        Handler.origin = origin
        self.server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.endpoint}/{urllib.parse.quote(name)}"

    def add(self, name: str, data: bytes, headers: dict[str, str] | None = None) -> str:
        self.files[name] = data
        self.file_headers[name] = dict(headers or {})
        return self.url(name)

    def served(self, name: str) -> int:
        return self.per_file[name]

    def _count(self, name: str, n: int) -> None:
        with self.lock:
            self.bytes_served += n
            self.per_file[name] += n


class _Handler(http.server.BaseHTTPRequestHandler):
    origin: HttpOrigin
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _path(self) -> tuple[str, str]:
        target = self.path
        if "://" in target:  # proxy form
            parts = urllib.parse.urlsplit(target)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
        parts = urllib.parse.urlsplit(target)
        return urllib.parse.unquote(parts.path), parts.query

    def do_POST(self):
        self._serve("POST")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_GET(self):
        self._serve("GET")

    def send_simple(self, code: int, body: bytes = b"", ctype: str = "text/plain", headers=None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, method: str) -> None:
        o = self.origin
        path, query = self._path()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        rng = self.headers.get("Range")
        with o.lock:
            o.requests.append((method, path, rng))
            if self.headers.get("Authorization"):
                o.authorizations.append(self.headers["Authorization"])
        for m, prefix, fn in o.routes:
            if m == method and path.startswith(prefix) and fn(self, path, body):
                return
        name = path.lstrip("/")
        f = o.faults
        if name in f.status:
            self.send_simple(f.status[name], b"refused\n", headers=f.headers.get(name))
            return
        with o.lock:
            err = f.errors[name].pop(0) if f.errors.get(name) else None
        if err is not None:
            self.send_simple(err, b"try again\n")
            return
        with o.lock:
            left = f.budget.get(name)
            if left is not None:
                f.budget[name] = left - 1
        if left is not None and left <= 0:
            self.send_simple(503, b"overloaded\n")
            return
        with o.lock:
            held = f.hold.get(name)
            if held is not None:
                f.hold[name] = held - 1
        if held is not None and held <= 0:
            f.release.wait(120)
            if _client_gone(self.connection):  # killed while held: nothing is sent or counted
                self.close_connection = True
                return
        if name in f.html:
            self.send_simple(200, HTML_PAGE, "text/html; charset=utf-8")
            return
        if name not in o.files:
            self.send_simple(404, b"not found\n")
            return
        self.send_file(name, o.files[name], method, rng if name not in f.no_range else None, o.file_headers.get(name))

    def send_file(self, name: str, data: bytes, method: str = "GET", rng: str | None = None,
                  headers: dict | None = None) -> None:
        o = self.origin
        start, end, code = 0, len(data), 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else max(0, len(data) - int(b))
            end = min(len(data), int(b) + 1) if a and b else len(data)
            if start >= len(data):
                self.send_simple(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
                return
            code = 206
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{hash(data) & 0xFFFFFFFF:08x}"')
        if name not in o.faults.no_range:
            self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if method == "HEAD":
            return
        with o.lock:
            cut = o.faults.drops[name].pop(0) if o.faults.drops.get(name) else None
        chunk = data[start:end] if cut is None else data[start:min(end, start + cut)]
        self.wfile.write(chunk)
        o._count(name, len(chunk))
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


def _client_gone(sock: socket.socket) -> bool:
    """The client closed its end (or its process died) while its request waited: no answer is expected of us."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
