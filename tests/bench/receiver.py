"""A fast keep-alive HTTP receiver for the benchmark, run in its own process.

asyncio with a hand-rolled HTTP/1.1 parser (the standard library server is
slower than the clients it has to measure). Paths:
  /slow/<ms>   answer after <ms> milliseconds (without blocking others)
  /hang        never answer
  /stats       GET: JSON {path: [[object_id, received_at], ...]} and resets it
  anything     answer 200 at once
For each POST it records the body's object_id and the arrival time.

    python -m tests.bench.receiver PORT
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import defaultdict

OBJECT_ID = re.compile(rb'"object_id"\s*:\s*(-?\d+)')
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

received: dict[str, list[tuple[int, float]]] = defaultdict(list)


class Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end]
            length = 0
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if m:
                length = int(m.group(1))
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body = self.buf[head_end + 4 : end]
            self.buf = self.buf[end:]
            method, path = head.split(b" ", 2)[:2]
            self.handle(method, path.decode(), body)

    def handle(self, method: bytes, path: str, body: bytes) -> None:
        now = time.time()
        if method == b"GET" and path == "/stats":
            payload = json.dumps(received).encode()
            received.clear()
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
            )
            return
        m = OBJECT_ID.search(body)
        received[path].append((int(m.group(1)) if m else -1, now))
        if path == "/hang":
            return
        if path.startswith("/slow/"):
            asyncio.get_running_loop().call_later(
                int(path[6:]) / 1000.0,
                lambda: self.transport.is_closing() or self.transport.write(OK),  # type: ignore[attr-defined]
            )
            return
        self.transport.write(OK)  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Http, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
