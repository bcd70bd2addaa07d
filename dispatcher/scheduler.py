"""The dispatcher's local queue of claimed jobs, and the sender threads that drain it.

The main thread claims deliveries a little ahead of the senders (prefetch) and
hands them to :class:`Scheduler`; each sender thread takes the next job the
moment it finishes one, so a freed sender never waits for a database round
trip. The per-webhook concurrency limit is enforced here, at send time:
claimed jobs beyond it wait in their webhook's queue, and webhooks take turns
(round robin), so one slow endpoint never holds up the others.

A new job wakes the sender that went idle last, not the one idle longest: at
light load the same thread sends one request after another, over its warm
keep-alive connection, instead of every sender in turn opening and keeping a
connection of its own to the receiver.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from dispatcher.delivery import Job


class Scheduler:
    """Per-webhook FIFO queues with at most ``per_webhook`` jobs of a webhook running.

    Thread-safe. :meth:`take` blocks until a job may run (or the scheduler is
    closed, then it returns None); :meth:`finished` must follow every job taken.
    """

    def __init__(self, per_webhook: int) -> None:
        self.per_webhook = per_webhook
        self._lock = threading.Lock()
        # One held lock per waiting take(), the last to wait last: waking
        # releases a lock popped from the end (threading.Condition would wake
        # the longest waiter).
        self._idle: list[threading.Lock] = []
        # Webhooks with queued jobs, in turn order; a webhook is moved to the
        # back when one of its jobs starts.
        self._queues: OrderedDict[int, deque[Job]] = OrderedDict()
        self._running: dict[int, int] = {}
        self._closed = False

    def add(self, jobs: Iterable[Job]) -> None:
        """Queue ``jobs`` (each webhook's in the order given)."""
        with self._lock:
            added = 0
            for job in jobs:
                self._queues.setdefault(job.webhook_id, deque()).append(job)
                added += 1
            self._wake(added)

    def _next(self) -> Job | None:
        for webhook_id, queue in self._queues.items():
            if self._running.get(webhook_id, 0) < self.per_webhook:
                job = queue.popleft()
                if queue:
                    self._queues.move_to_end(webhook_id)
                else:
                    del self._queues[webhook_id]
                self._running[webhook_id] = self._running.get(webhook_id, 0) + 1
                return job
        return None

    def _release(self, job: Job) -> None:
        left = self._running[job.webhook_id] - 1
        if left:
            self._running[job.webhook_id] = left
        else:
            del self._running[job.webhook_id]

    def _wake(self, n: int) -> None:
        for _ in range(min(n, len(self._idle))):
            self._idle.pop().release()

    def _wake_for(self, webhook_id: int) -> None:
        # A waiting thread can use the slot just freed only if this webhook
        # has jobs queued and a slot is still free once we took ours.
        if webhook_id in self._queues and self._running.get(webhook_id, 0) < self.per_webhook:
            self._wake(1)

    def take(self, after: Job | None = None) -> Job | None:
        """The next job allowed to run, waiting for one; None once closed.

        ``after``, a job this thread took before, is finished first, under the
        same lock: the thread usually takes the slot it frees itself, so no
        other thread is woken for nothing.
        """
        with self._lock:
            if after is not None:
                self._release(after)
            while not self._closed:
                job = self._next()
                if job is not None:
                    if after is not None:
                        self._wake_for(after.webhook_id)
                    return job
                waiter = threading.Lock()
                waiter.acquire()
                self._idle.append(waiter)
                self._lock.release()
                try:
                    waiter.acquire()  # until _wake() pops and releases it
                except BaseException:
                    self._lock.acquire()
                    if waiter in self._idle:  # interrupted, not woken
                        self._idle.remove(waiter)
                    raise
                self._lock.acquire()
            return None

    def finished(self, job: Job) -> None:
        """``job`` (from :meth:`take`) is done: its webhook may start another."""
        with self._lock:
            self._release(job)
            self._wake_for(job.webhook_id)

    def unstarted(self) -> list[Job]:
        """Remove and return every queued job that has not started."""
        with self._lock:
            jobs = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            return jobs

    def close(self) -> None:
        """Wake every waiting :meth:`take`, which returns None from now on."""
        with self._lock:
            self._closed = True
            self._wake(len(self._idle))

    @property
    def waiting(self) -> int:
        """Takers waiting for a job."""
        with self._lock:
            return len(self._idle)

    @property
    def queued(self) -> int:
        """Jobs waiting to start."""
        with self._lock:
            return sum(len(queue) for queue in self._queues.values())


def start_senders(
    n: int, scheduler: Scheduler, send: Callable[[Job], None]
) -> list[threading.Thread]:
    """Start ``n`` daemon threads that run ``send(job)`` for each job taken.

    ``send`` must not raise. The threads end when the scheduler is closed.
    """

    def loop() -> None:
        job = scheduler.take()
        while job is not None:
            try:
                send(job)
            except BaseException:
                scheduler.finished(job)
                raise
            job = scheduler.take(after=job)

    threads = [threading.Thread(target=loop, name=f"sender-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads
