"""The local job queue: per-webhook limits, turns, give-back and close, on real threads;
and how much the dispatcher claims ahead for each webhook."""

from __future__ import annotations

import threading
import time

from dispatcher.config import Settings
from dispatcher.delivery import Job
from dispatcher.scheduler import Scheduler, start_senders
from tests.jobs import make_job, make_outcome, stepped_dispatcher


def job(webhook_id: int, n: int) -> Job:
    return make_job(delivery_id=f"{webhook_id}-{n}", webhook_id=webhook_id, object_id=n)


def test_per_webhook_limit_fifo_and_turns() -> None:
    s = Scheduler(per_webhook=2)
    s.add([job(1, n) for n in range(4)] + [job(2, n) for n in range(2)])
    taken = [s.take() for _ in range(4)]
    assert [j.delivery_id for j in taken if j] == ["1-0", "2-0", "1-1", "2-1"]
    assert s.queued == 2
    # Webhook 1 has 2 running: its next job waits until one finishes.
    got: list[Job | None] = []
    t = threading.Thread(target=lambda: got.append(s.take()))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got
    s.finished(taken[0])
    t.join(5)
    assert [j.delivery_id for j in got if j] == ["1-2"]
    assert [j.delivery_id for j in s.unstarted()] == ["1-3"]
    assert s.queued == 0


def test_close_wakes_waiting_takers() -> None:
    s = Scheduler(per_webhook=1)
    got: list[Job | None] = []
    threads = [threading.Thread(target=lambda: got.append(s.take())) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    s.close()
    for t in threads:
        t.join(5)
    assert got == [None, None, None]


def test_senders_never_exceed_the_limit_per_webhook() -> None:
    s = Scheduler(per_webhook=3)
    lock = threading.Lock()
    running: dict[int, int] = {}
    peak: dict[int, int] = {}
    done = threading.Semaphore(0)

    def send(j: Job) -> None:
        with lock:
            running[j.webhook_id] = running.get(j.webhook_id, 0) + 1
            peak[j.webhook_id] = max(peak.get(j.webhook_id, 0), running[j.webhook_id])
        time.sleep(0.002)
        with lock:
            running[j.webhook_id] -= 1
        done.release()

    threads = start_senders(10, s, send)
    s.add([job(w, n) for n in range(40) for w in (1, 2)])
    for _ in range(80):
        assert done.acquire(timeout=30)
    s.close()
    for t in threads:
        t.join(5)
    assert peak == {1: 3, 2: 3}
    assert not any(t.is_alive() for t in threads)


def test_one_job_at_a_time_goes_to_the_sender_that_went_idle_last() -> None:
    # At light load the same sender, with its warm keep-alive connection,
    # sends every request; waking the longest-idle one would rotate through
    # all of them (and each would open a connection to the receiver).
    s = Scheduler(per_webhook=4)
    senders: list[str] = []
    done = threading.Semaphore(0)

    def send(j: Job) -> None:
        senders.append(threading.current_thread().name)
        done.release()

    threads = start_senders(4, s, send)
    deadline = time.monotonic() + 30
    for n in range(12):
        while s.waiting < 4:  # every sender is idle again
            assert time.monotonic() < deadline
            time.sleep(0.001)
        s.add([job(1, n)])
        assert done.acquire(timeout=30)
    s.close()
    for t in threads:
        t.join(5)
    assert len(senders) == 12
    assert len(set(senders)) == 1, senders


def test_claims_ahead_for_a_quick_webhook_and_forgets_webhooks_that_hold_nothing() -> None:
    with stepped_dispatcher(Settings(dsn="", per_webhook_concurrency=4, batch_size=200)) as d:
        quick = [make_job(delivery_id=f"q{i}", webhook_id=1) for i in range(3)]
        others = [make_job(delivery_id=f"o{i}", webhook_id=100 + i) for i in range(1000)]
        for job in quick + others:
            d.held[job.webhook_id] += 1
            d.claimed[job.delivery_id] = job
        assert d._webhook_room()[1] == 2 * 4 - 3  # not heard from yet: twice its concurrency
        d.results.put(make_outcome(quick[0], duration_ms=2.0))
        for job in others:
            d.results.put(make_outcome(job, duration_ms=2.0))
        d._collect()
        # 2 ms a request: its 4 senders start 500 in a quarter of a second; the cap is 200.
        assert d._webhook_room() == {1: 200 - 2}
        assert set(d.duration) == {1}  # nothing kept for the 1,000 that hold nothing now
