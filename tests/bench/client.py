"""Baselines without the database: signed bodies sent straight to the receiver.

    python -m tests.bench.client URL N                      -> deliveries per second
    python -m tests.bench.client URL N --threads 8          -> the same, 8 threads
    python -m tests.bench.client URL N --threads 16 --sender

The default is a bare ``requests`` loop (Session with trust_env=False,
prepared requests, keep-alive): the client's own ceiling, which the
dispatcher's throughput is compared against. ``--threads`` runs that loop in
several threads at once (each with its own Session). ``--sender`` sends with
the dispatcher's own :class:`~dispatcher.delivery.Sender` from its sender
threads and local queue instead, with no database work at all: the ceiling of
the dispatcher's sending path in one Python process.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid

import requests

from dispatcher.delivery import Job, Sender, sign
from dispatcher.scheduler import Scheduler, start_senders
from tests.jobs import make_job

SECRET = "bench-secret"


def bodies(n: int) -> list[tuple[str, bytes]]:
    out = []
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
        out.append((delivery, body))
    return out


def bare_loop(url: str, work: list[tuple[str, bytes]]) -> None:
    session = requests.Session()
    session.trust_env = False
    for delivery, body in work:
        req = requests.Request(
            "POST",
            url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-Danbyte-Event": "create",
                "X-Danbyte-Delivery": delivery,
                "X-Danbyte-Signature": sign(SECRET, body),
            },
        ).prepare()
        resp = session.send(req, timeout=10, allow_redirects=False)
        resp.raise_for_status()


def bare(url: str, n: int, threads: int) -> float:
    work = bodies(n)
    parts = [work[k::threads] for k in range(threads)]
    runners = [threading.Thread(target=bare_loop, args=(url, part)) for part in parts]
    start = time.perf_counter()
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    return n / (time.perf_counter() - start)


def with_sender(url: str, n: int, threads: int) -> float:
    jobs = [
        make_job(
            delivery_id=delivery,
            webhook_name="bench",
            object_type="public.bench",
            object_id=i,
            url=url,
            secret=SECRET,
            body=body,
        )
        for i, (delivery, body) in enumerate(bodies(n))
    ]
    sender = Sender()
    done = threading.Semaphore(0)
    failed: list[str] = []

    def send(job: Job) -> None:
        outcome = sender.send(job)
        if not outcome.ok:
            failed.append(outcome.error or "?")
        done.release()

    scheduler = Scheduler(per_webhook=threads)
    start = time.perf_counter()
    start_senders(threads, scheduler, send)
    scheduler.add(jobs)
    for _ in range(n):
        done.acquire()
    elapsed = time.perf_counter() - start
    scheduler.close()
    if failed:
        raise SystemExit(f"{len(failed)} requests failed: {failed[0]}")
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.client")
    parser.add_argument("url")
    parser.add_argument("n", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sender", action="store_true", help="use the dispatcher's Sender")
    args = parser.parse_args()
    run = with_sender if args.sender else bare
    print(f"{run(args.url, args.n, args.threads):.1f}")


if __name__ == "__main__":
    main()
