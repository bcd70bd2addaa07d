"""The baseline: a bare ``requests`` loop sending signed bodies, one at a time.

Session with trust_env=False, prepared requests, keep-alive: the client's own
ceiling, which the dispatcher's throughput is compared against.

    python -m tests.bench.client URL N  ->  prints deliveries per second
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import requests

from dispatcher.delivery import sign


def main(url: str, n: int) -> float:
    secret = "bench-secret"
    session = requests.Session()
    session.trust_env = False
    bodies = []
    for i in range(n):
        delivery = str(uuid.uuid4())
        body = json.dumps(
            {
                "event": "create",
                "delivery_id": delivery,
                "timestamp": "2026-01-01T00:00:00+00:00",
                "object_type": "public.bench",
                "object_id": i,
                "username": "postgres",
                "db_user": "postgres",
                "request_id": None,
                "webhook": "bench",
                "data": {"id": i, "v": "x"},
                "snapshots": {"prechange": None, "postchange": {"id": i, "v": "x"}},
            }
        ).encode()
        bodies.append((delivery, body))
    start = time.perf_counter()
    for delivery, body in bodies:
        req = requests.Request(
            "POST",
            url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-Danbyte-Event": "create",
                "X-Danbyte-Delivery": delivery,
                "X-Danbyte-Signature": sign(secret, body),
            },
        ).prepare()
        resp = session.send(req, timeout=10, allow_redirects=False)
        resp.raise_for_status()
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    print(f"{main(sys.argv[1], int(sys.argv[2])):.1f}")
