"""A recording HTTP receiver on 127.0.0.1 for tests and the benchmark.

The path picks the behaviour:
  /status/<code>     answer <code> (``/status/301`` adds a Location header)
  /flaky/<n>/<code>  answer <code> to the first n requests of a delivery, then 200
  /retry-after/<s>   answer 429 with Retry-After: <s> the first time, then 200
  /close             close the connection without answering
  /hang              accept, read, never answer (until the server stops)
  /slow/<ms>         answer 200 after <ms> milliseconds
  /big               answer 200 with a 1 MB body
  /repeated          answer 503 with X-Multi twice and a lower-case retry-after: 7
  anything else      answer 200 with a small JSON body
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float = field(default_factory=time.time)

    def json(self) -> dict:
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(
        self, status: int, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away mid-request
            self.close_connection = True
            return
        req = Request(self.command, self.path, dict(self.headers.items()), body)
        srv = self.server
        with srv.lock:
            srv.requests.append(req)
            srv.cond.notify_all()
        parts = self.path.strip("/").split("/")
        kind = parts[0]
        if kind == "status":
            code = int(parts[1])
            headers = {"Location": "http://127.0.0.1:1/elsewhere"} if 300 <= code < 400 else {}
            self._answer(code, headers, b"status page")
        elif kind == "flaky":
            key = (self.path, self.headers.get("X-Danbyte-Delivery"))
            with srv.lock:
                srv.counts[key] += 1
                n = srv.counts[key]
            self._answer(int(parts[2]) if n <= int(parts[1]) else 200)
        elif kind == "retry-after":
            key = (self.path, self.headers.get("X-Danbyte-Delivery"))
            with srv.lock:
                srv.counts[key] += 1
                n = srv.counts[key]
            if n == 1:
                self._answer(429, {"Retry-After": parts[1]})
            else:
                self._answer(200)
        elif kind == "close":
            self.close_connection = True
            self.connection.shutdown(2)
        elif kind == "hang":
            srv.stopped.wait()
            self.close_connection = True
        elif kind == "big":
            self._answer(200, {"Content-Type": "text/plain"}, b"x" * 1_000_000)
        elif kind == "repeated":
            self.send_response(503)
            for name, value in (("X-Multi", "a"), ("X-Multi", "b"), ("retry-after", "7")):
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "slow":
            time.sleep(int(parts[1]) / 1000.0)
            self._answer(200)
        else:
            self._answer(200, {"Content-Type": "application/json"}, b'{"ok": true}')

    do_POST = do_PUT = do_PATCH = do_GET = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Like a real server's backlog: ~100 dispatcher connections open at once.
    request_queue_size = 256
    requests: list[Request]
    counts: Counter
    lock: threading.Lock
    cond: threading.Condition
    stopped: threading.Event


class Receiver:
    """A threaded HTTP(S) server recording every request."""

    def __init__(self, certfile: str | None = None, keyfile: str | None = None) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.requests = []
        self.server.counts = Counter()
        self.server.lock = threading.Lock()
        self.server.cond = threading.Condition(self.server.lock)
        self.server.stopped = threading.Event()
        self.scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Request]:
        with self.server.lock:
            return list(self.server.requests)

    def wait_for(self, n: int, timeout: float = 30.0, path: str | None = None) -> list[Request]:
        """Wait until ``n`` requests (to ``path``, if given) arrived; return them."""
        deadline = time.monotonic() + timeout
        with self.server.cond:
            while True:
                got = [r for r in self.server.requests if path is None or r.path == path]
                if len(got) >= n:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {n} requests, got {len(got)} in {timeout}s")
                self.server.cond.wait(remaining)

    def stop(self) -> None:
        self.server.stopped.set()
        self.server.shutdown()
        self.server.server_close()
