"""The latency baseline: a bare LISTEN loop that posts each notified id at once.

    python -m tests.bench.listener DSN URL   (prints "ready" once listening)

A row trigger on the benchmark's ``bare`` table NOTIFYs the new row's id; this
loop receives it and sends ``{"object_id": id}`` with a keep-alive requests
Session. Commit-to-arrival through it is the floor of any design that wakes
on NOTIFY and sends with requests, on this machine, in the same run.
"""

from __future__ import annotations

import json
import sys

import psycopg
import requests


def main(dsn: str, url: str) -> None:
    session = requests.Session()
    session.trust_env = False
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN bench_bare")
        print("ready", flush=True)
        for notify in conn.notifies():
            body = json.dumps({"object_id": int(notify.payload)}).encode()
            session.post(url, data=body, timeout=10).raise_for_status()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
