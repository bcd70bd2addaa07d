"""A debug receiver for trying webhooks locally (``danbyte-webhooks receive``).

Standard-library HTTP server: prints each request's method, path, Danbyte
headers, whether the signature verifies, and the pretty-printed body, and
answers with a chosen status.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dispatcher.delivery import verify_signature


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool | None  # None: no secret configured

    @property
    def event(self) -> str:
        return self.headers.get("X-Danbyte-Event", "-")

    @property
    def delivery_id(self) -> str:
        return self.headers.get("X-Danbyte-Delivery", "-")

    def describe(self) -> str:
        """Several lines: request line, Danbyte headers, verification, body."""
        lines = [f"{self.method} {self.path}"]
        for name in ("X-Danbyte-Event", "X-Danbyte-Delivery", "X-Danbyte-Signature"):
            if name in self.headers:
                value = self.headers[name]
                if name == "X-Danbyte-Signature":
                    value = value[:23] + "..."  # enough to recognise, not to reuse
                lines.append(f"  {name}: {value}")
        if self.verified is None:
            lines.append("  signature: not checked (no secret given)")
        else:
            lines.append(f"  signature verified: {'yes' if self.verified else 'NO'}")
        try:
            pretty = json.dumps(json.loads(self.body), indent=2)
        except ValueError:
            pretty = self.body.decode("utf-8", "replace")
        lines.extend("  " + line for line in pretty.splitlines())
        return "\n".join(lines)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default (5) refuses bursts of new connections


class DebugReceiver:
    """Serves on ``host:port`` in a background thread until :meth:`stop`."""

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        secret: str | None = None,
        status: int = 200,
        on_request: Callable[[Received], None] | None = None,
    ) -> None:
        receiver = self
        self.secret = secret
        self.status = status
        self.on_request = on_request
        self.received: list[Received] = []
        self._lock = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers.items())
                verified = (
                    None
                    if receiver.secret is None
                    else verify_signature(body, headers.get("X-Danbyte-Signature"), receiver.secret)
                )
                item = Received(self.command, self.path, headers, body, verified)
                with receiver._lock:
                    receiver.received.append(item)
                    receiver._lock.notify_all()
                if receiver.on_request:
                    receiver.on_request(item)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_PATCH = _handle

        self.server = _Server((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> DebugReceiver:
        self._thread.start()
        return self

    def wait_for(self, n: int, timeout: float) -> list[Received]:
        """The first ``n`` requests, waiting up to ``timeout`` seconds; fewer if it ran out."""
        with self._lock:
            self._lock.wait_for(lambda: len(self.received) >= n, timeout)
            return list(self.received[:n])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
