"""The dispatcher daemon: ``danbyte-webhooks run``.

One main thread owns the work connection and does all the SQL (fan-out,
claim, write-back, heartbeat); sender threads do the HTTP, taking claimed jobs
from a local queue (:mod:`dispatcher.scheduler`) that the main thread keeps
filled a little ahead of them; a listener thread owns the LISTEN connection.
The main thread sleeps on a self-pipe that three sources write to: a
notification (or a listener reconnect), a finished request, and a signal. A
poll timeout is the fourth, backstop, source.

Idle protocol (to keep NOTIFY off the application's write path): while new
changes arrive slowly, the dispatcher marks itself idle in
``webhooks.dispatcher`` and checks once more; the capture triggers only NOTIFY
while some live dispatcher is idle. Once changes arrive faster than
``DISARM_RATE`` it clears the flag and polls, so a busy dispatcher costs the
writers no NOTIFY at all, and a lightly loaded one is woken by each change at
once. The rate is measured over ``RATE_WINDOW``, not per turn: at a few
thousand changes a second each turn woken by a NOTIFY finds only two or three,
and deciding on that count kept the writers notifying.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from queue import Empty, SimpleQueue
from select import select
from types import FrameType

import psycopg

from dispatcher import __version__, db
from dispatcher.config import Settings
from dispatcher.delivery import Job, Outcome, Sender
from dispatcher.errors import UserError
from dispatcher.retry import decide
from dispatcher.scheduler import Scheduler, start_senders

log = logging.getLogger("danbyte.dispatcher")

#: Results ride along with the next turn that looks for work while polling; a
#: turn just to write them back comes at most this long after the first of them.
WRITE_BACK_DELAY = 0.05
#: Reconnect backoff is capped so delivery resumes within seconds of recovery.
MAX_BACKOFF = 5.0
#: Above this many new changes a second, stop the writers' NOTIFYs (each one
#: serialises commits) and poll every ``busy_poll_interval`` (5 ms) instead.
DISARM_RATE = 500.0
#: Below this many, be woken by NOTIFY again (apart from DISARM_RATE, so that a
#: load near the limit does not switch at every window).
ARM_RATE = 250.0
#: The rate of new changes is measured over windows at least this long.
RATE_WINDOW = 0.05
#: Claim up to this many times what can be sent at once (overall and per
#: webhook), so a sender that finishes starts its next job at once and each
#: turn claims a bigger batch.
PREFETCH = 2
#: For a webhook that answers quickly, claim more than that: what its senders
#: can be expected to start within this many seconds, judged from its recent
#: request times (up to ``--batch-size``). Few big turns cost the database and
#: the interpreter lock much less than many small ones.
AHEAD = 0.25
#: Weight of the newest request time in a webhook's moving average.
DURATION_WEIGHT = 0.2


class Listener(threading.Thread):
    """Keeps a LISTEN connection open and reports notifications.

    ``on_wake`` is called for every notification except probes, and after
    every (re)connect, since notifications may have been missed meanwhile.
    """

    def __init__(self, dsn: str, on_wake: Callable[[], None]) -> None:
        super().__init__(name="listener", daemon=True)
        self.dsn = dsn
        self.on_wake = on_wake
        self.last_heard = time.monotonic()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._restart = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def restart(self) -> None:
        """Drop the connection and open a new one (it looks dead)."""
        self._restart.set()

    def run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            conn = None
            try:
                conn = db.connect(self.dsn, application_name="danbyte-webhooks listener")
                conn.execute(f"LISTEN {db.CHANNEL}")
                self._restart.clear()
                self.connected.set()
                self.last_heard = time.monotonic()
                log.info("listening on channel %s", db.CHANNEL)
                backoff = 0.1
                self.on_wake()  # catch up on what was missed while disconnected
                while not self._stop.is_set() and not self._restart.is_set():
                    # A timeout lets the loop notice stop/restart requests; a
                    # dead socket either raises here or is caught by the probe.
                    for notify in conn.notifies(timeout=0.5):
                        self.last_heard = time.monotonic()
                        if not notify.payload.startswith("probe:"):
                            self.on_wake()
                if self._restart.is_set():
                    log.warning("listener connection looks dead: reconnecting")
            except (psycopg.Error, UserError) as exc:
                self.connected.clear()
                if self._stop.is_set():
                    break
                log.warning(
                    "listener connection lost (%s); reconnecting in %.1fs",
                    db.one_line(exc),
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            finally:
                self.connected.clear()
                if conn is not None:
                    try:
                        conn.close()
                    except psycopg.Error:
                        pass


class Dispatcher:
    """The daemon. ``run()`` returns the process exit code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ident = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.sender = Sender(proxy=settings.proxy)
        self.scheduler = Scheduler(settings.per_webhook_concurrency)
        self.capacity = max(PREFETCH * settings.workers, settings.batch_size)
        self.results: SimpleQueue[Outcome] = SimpleQueue()
        self.expired: SimpleQueue[Job] = SimpleQueue()  # taken too late to send
        self.held: dict[int, int] = defaultdict(int)  # claimed, per webhook
        # Recent request time in seconds, per webhook holding claimed jobs: kept
        # no longer, so what each turn sends for its claim stays bounded by
        # what is held, however many webhooks there are.
        self.duration: dict[int, float] = {}
        self.claimed: dict[str, Job] = {}  # by delivery id, until recorded or released
        self.conn: psycopg.Connection | None = None
        self.listener = Listener(settings.dsn, self._on_wake)
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._notified = threading.Event()
        self._reported = False  # a sender has woken the main thread for results
        self.stopping = False
        self.signals = 0
        self.armed = False
        self.window_start = 0.0  # the first window ends at the first turn
        self.window_changes = 0
        self.recheck = True  # sweep at start-up
        self.more = False  # the last turn's fan-out left changes behind: look again
        self.behind = False  # the last fan-out there was left changes behind
        self.capped: set[int] = set()  # webhooks whose last claim reached their cap
        self.room_filled = False  # the last claim took all the room there was
        self.refill = False  # room has come free where a claim was cut short
        self.last_look = 0.0
        self.next_maintenance = 0.0
        self.next_cleanup = 0.0
        self.probe_sent_at: float | None = None
        self.first_result_at: float | None = None
        self.pending: list[Outcome] = []

    # -- wake-up sources ----------------------------------------------------

    def _poke(self) -> None:
        try:
            os.write(self._wfd, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the main loop is awake anyway

    def _on_wake(self) -> None:
        self._notified.set()
        self._poke()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: only set flags and poke.
        self.signals += 1
        if self.signals == 1:
            self.stopping = True
            self._poke()
        else:
            # No logging here: the interrupted code may hold the logging lock.
            os.write(
                2,
                b"second signal: exiting now; deliveries in flight are sent again "
                b"once their lease expires\n",
            )
            os._exit(1)

    def _wait(self, timeout: float) -> None:
        if timeout > 0:
            try:
                select([self._rfd], [], [], timeout)
            except InterruptedError:
                pass
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass

    # -- sending (sender threads) ---------------------------------------------

    def _send(self, job: Job) -> None:
        if time.monotonic() > job.send_by:
            # Waited so long in the local queue that the lease would run out
            # mid-request: give it back unsent rather than risk a duplicate.
            self.expired.put(job)
            self._report()
            return
        try:
            outcome = self.sender.send(job)
        except Exception as exc:  # a bug must not lose the delivery: record it as failed
            log.exception("unexpected error sending delivery %s", job.delivery_id)
            outcome = Outcome(
                job=job,
                ok=False,
                status_code=None,
                error=f"internal error: {type(exc).__name__}",
                duration_ms=0.0,
                attempted_at=datetime.now(timezone.utc),
                request_headers={},
            )
        self.results.put(outcome)
        self._report()

    def _report(self) -> None:
        # One wake-up per batch of results, not one per result: the main
        # thread lowers the flag before it empties the queues, so a result
        # put after that finds the flag down and wakes it again.
        if not self._reported:
            self._reported = True
            self._poke()

    # -- database steps (main thread) ----------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = db.connect(
                self.settings.dsn, application_name="danbyte-webhooks dispatcher"
            )
            db.register_dispatcher(
                self.conn, self.ident, socket.gethostname(), os.getpid(), __version__
            )
            self.armed = False
            self.recheck = True  # catch up after every reconnect
        return self.conn

    def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def _cap(self, webhook_id: int) -> int:
        """How many of a webhook's deliveries to hold claimed (sending or queued) at most."""
        per_webhook = self.settings.per_webhook_concurrency
        least = PREFETCH * per_webhook
        took = self.duration.get(webhook_id)
        if took is None:
            return least
        ahead = per_webhook + int(per_webhook * AHEAD / max(took, 0.001))
        return max(least, min(self.capacity, ahead))

    # Claims refill at half: a turn claims nothing for a webhook holding more
    # than half its cap, or at all while more than half the capacity is held.
    # Claiming again for every finished request (or at every busy poll) would
    # make many small turns, each costing the database and the interpreter lock.

    def _room(self) -> int:
        """How many deliveries the next turn may claim in all."""
        if len(self.claimed) > self.capacity // 2:
            return 0
        return min(self.capacity - len(self.claimed), self.settings.batch_size)

    def _webhook_room(self) -> dict[int, int]:
        """How many the next turn may claim for each webhook holding claimed jobs
        (any other: twice its concurrency)."""
        room = {}
        for webhook_id, held in self.held.items():
            cap = self._cap(webhook_id)
            room[webhook_id] = cap - held if held <= cap // 2 else 0
        return room

    def _forget(self, job: Job) -> None:
        self.claimed.pop(job.delivery_id, None)
        webhook_id = job.webhook_id
        left = self.held[webhook_id] - 1
        # Where the last claim took everything due, new work is found by
        # notification or poll instead.
        if webhook_id in self.capped and left <= self._cap(webhook_id) // 2:
            self.capped.discard(webhook_id)
            self.refill = True
        if left > 0:
            self.held[webhook_id] = left
        else:
            del self.held[webhook_id]
            self.duration.pop(webhook_id, None)
        if self.room_filled and len(self.claimed) <= self.capacity // 2:
            self.room_filled = False
            self.refill = True

    def _collect(self) -> None:
        """Move finished requests into ``pending``, give back expired jobs, free their room."""
        self._reported = False
        while True:
            try:
                outcome = self.results.get_nowait()
            except Empty:
                break
            if self.first_result_at is None:
                self.first_result_at = time.monotonic()
            self.pending.append(outcome)
            took = self.duration.get(outcome.job.webhook_id)
            latest = outcome.duration_ms / 1000.0
            self.duration[outcome.job.webhook_id] = (
                latest if took is None else took + DURATION_WEIGHT * (latest - took)
            )
            self._forget(outcome.job)
            self._log_outcome(outcome)
        expired: list[Job] = []
        while True:
            try:
                expired.append(self.expired.get_nowait())
            except Empty:
                break
        if expired:
            log.warning(
                "%d claimed deliveries waited too long for a free sender: given back unsent",
                len(expired),
            )
            self._release(expired)

    def _release(self, jobs: list[Job]) -> None:
        """Give back claimed jobs that were never sent (else their leases expire)."""
        for job in jobs:
            self._forget(job)
        try:
            db.release(self._connection(), self.ident, [j.delivery_id for j in jobs])
        except (psycopg.OperationalError, UserError):
            pass  # their leases expire instead

    def _log_outcome(self, outcome: Outcome) -> None:
        job = outcome.job
        level = logging.INFO if outcome.ok else logging.WARNING
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "delivery %s webhook=%s event=%s object=%s:%s attempt=%d status=%s duration=%.1fms%s",
            job.delivery_id,
            job.webhook_name,
            job.event,
            job.object_type,
            job.object_id,
            job.attempt,
            outcome.status_code if outcome.status_code else "-",
            outcome.duration_ms,
            f" error={outcome.error}" if outcome.error else "",
            extra={
                "delivery_id": job.delivery_id,
                "webhook": job.webhook_name,
                "event": job.event,
                "object_type": job.object_type,
                "object_id": job.object_id,
                "attempt": job.attempt,
                "status_code": outcome.status_code,
                "duration_ms": round(outcome.duration_ms, 2),
                "error": outcome.error,
                "ok": outcome.ok,
            },
        )

    def _write_due(self, now: float) -> bool:
        if not self.pending:
            return False
        waited = now - (self.first_result_at or now)
        return (
            self.stopping
            or len(self.pending) >= self.settings.batch_size
            or waited >= WRITE_BACK_DELAY
        )

    def _again(self) -> bool:
        """Whether to look again at once rather than wait for a wake-up."""
        return self.recheck or self.more or self.refill

    def _look_due(self, now: float) -> bool:
        """Whether to look for new changes and deliveries now."""
        # With no room, a turn could neither claim nor fan out (new changes
        # wait in the outbox rather than become pending deliveries): wait for
        # the refill at half (see _forget). A notification meanwhile stays set.
        if self.stopping or not self._room():
            return False
        if self._notified.is_set():
            self._notified.clear()
            return True
        if self._again():
            return True
        # Not armed: writers do not wake us, so look every busy-poll interval.
        return not self.armed and now - self.last_look >= self.settings.busy_poll_interval

    def _maintenance(self) -> None:
        conn = self._connection()
        s = self.settings
        db.heartbeat(conn, self.ident, self.armed)
        expired = db.expire_leases(conn)
        if expired:
            log.warning(
                "%d deliveries had an expired lease (a dispatcher died?): queued again", expired
            )
        db.forget_stale_dispatchers(conn, max(60.0, 10 * s.poll_interval))
        db.refresh_wanted(conn)
        # A write that was already inside the capture function of 001-006
        # when migration 007 was applied put its changes in the outbox.
        legacy = db.fan_out_outbox(conn)
        if legacy:
            log.info("fanned out %d changes captured before migration 007", legacy)
        # Listener self-check: our own probe must come back within two intervals.
        now = time.monotonic()
        if (
            self.probe_sent_at is not None
            and self.listener.last_heard < self.probe_sent_at
            and now - self.probe_sent_at > 2 * s.poll_interval
        ):
            self.listener.restart()
            self.probe_sent_at = None
        if self.listener.connected.is_set():
            if self.probe_sent_at is None or self.listener.last_heard >= self.probe_sent_at:
                self.probe_sent_at = now
            db.notify_probe(conn, f"probe:{self.ident}")
        if s.retention > 0 and now >= self.next_cleanup:
            # A few small batches per round keep each pause short; a large
            # backlog of old rows is worked off over the next rounds.
            r = db.cleanup(conn, s.retention, batch_size=1000, max_batches=5)
            if r.deliveries or r.changes:
                log.info(
                    "retention: removed %d deliveries, %d attempts, %d changes",
                    r.deliveries,
                    r.attempts,
                    r.changes,
                )
            self.next_cleanup = now + (0.0 if not r.finished else min(60.0, max(1.0, s.retention)))
        self.recheck = True  # the poll backstop
        self.next_maintenance = now + s.poll_interval

    def _step(self) -> None:
        """One turn: write back, fan out and claim as due, in one round trip."""
        self._collect()
        now = time.monotonic()
        if now >= self.next_maintenance:
            self._maintenance()
        look = self._look_due(now)
        # Armed (changes come slowly, each wakes us): a look is on the way from
        # a change to its request, so results wait for a turn of their own,
        # which falls between changes (at 200 changes/s, p50 commit to request
        # 3.5 ms instead of 4.4 over six alternating runs). Polling under load,
        # they ride along with the look: fewer turns.
        write = bool(self.pending) and ((look and not self.armed) or self._write_due(now))
        if not write and not look:
            return
        s = self.settings
        results = [(o, decide(o, base=s.retry_base)) for o in self.pending] if write else []
        room = self._room() if look else 0
        # No webhook is asked for more than the turn may claim in all: the
        # claim locks what each webhook is asked for before the overall limit
        # applies, and a row locked but not claimed is a wasted WAL record.
        default_room = min(PREFETCH * s.per_webhook_concurrency, room)
        webhook_room = {w: min(n, room) for w, n in self._webhook_room().items()}
        found = db.cycle(
            self._connection(),
            me=self.ident,
            results=results,
            fan_out_limit=s.batch_size if look else 0,
            claim_limit=room,
            per_webhook=default_room,
            room=webhook_room,
            lease=s.lease_time,
            default_timeout=s.default_timeout,
        )
        if write:
            for outcome, decision in results:
                if decision.disable_reason:
                    log.warning(
                        "webhook %s disabled: %s", outcome.job.webhook_name, decision.disable_reason
                    )
            self.pending = []
            self.first_result_at = None
        if not look:
            return
        self.last_look = now
        self.recheck = self.refill = False
        took: dict[int, int] = defaultdict(int)
        for job in found.jobs:
            self.held[job.webhook_id] += 1
            self.claimed[job.delivery_id] = job
            took[job.webhook_id] += 1
        self.scheduler.add(found.jobs)
        # A claim cut short by our own limits may have left due deliveries
        # behind: claim again once the room is back to half (see _forget).
        # (A look always has room: see _look_due.)
        self.room_filled = len(found.jobs) >= room
        # Every webhook holding jobs, not only those capped before: one whose
        # refill came at a slightly higher cap (its request times moved) may be
        # asked for nothing now, and must be refilled later.
        for webhook_id in took.keys() | webhook_room.keys():
            asked = webhook_room.get(webhook_id, default_room)
            if took[webhook_id] >= asked:
                self.capped.add(webhook_id)  # asked == 0 too: not looked at
            else:
                self.capped.discard(webhook_id)  # took all that was due
        self.more = bool(found.more)
        if found.more is not None:
            self.behind = found.more
        self.window_changes += found.changes
        elapsed = now - self.window_start
        if not self.behind and elapsed < RATE_WINDOW:
            return
        # Changes left in the outbox count as a rate above any limit: turns
        # that fan out nothing (their claim took all the room) must not make
        # a backlog look quiet.
        rate = self.window_changes / elapsed if not self.behind else float("inf")
        self.window_start, self.window_changes = now, 0
        if rate > DISARM_RATE and self.armed:
            # Stop the writers' NOTIFYs and poll instead.
            db.heartbeat(self._connection(), self.ident, idle=False)
            self.armed = False
        elif rate < ARM_RATE and not self.armed:
            # Ask the triggers to wake us, then look once more for a change
            # that committed before the flag was visible.
            db.heartbeat(self._connection(), self.ident, idle=True)
            self.armed = True
            self.recheck = True

    def _timeout(self) -> float:
        now = time.monotonic()
        timeout = max(0.0, self.next_maintenance - now)
        if self.pending:
            timeout = min(timeout, max(0.0, (self.first_result_at or now) + WRITE_BACK_DELAY - now))
        if not self._room():
            return timeout  # looks wait for room (see _look_due)
        if not self.armed:
            timeout = min(
                timeout, max(0.0, self.last_look + self.settings.busy_poll_interval - now)
            )
        if self._again():
            timeout = 0.0
        return timeout

    # -- lifecycle ---------------------------------------------------------------

    def run(self) -> int:
        """Deliver until SIGTERM/SIGINT; return the exit code."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info(
            "dispatcher %s starting (version %s, %d workers)",
            self.ident,
            __version__,
            self.settings.workers,
        )
        self.listener.start()
        start_senders(self.settings.workers, self.scheduler, self._send)
        backoff = 0.1
        while True:
            if self.stopping and (self._drained() or self._shutdown_expired()):
                break
            try:
                self._step()
                backoff = 0.1
            except (psycopg.OperationalError, UserError) as exc:
                log.warning(
                    "database connection lost (%s); reconnecting in %.1fs",
                    db.one_line(exc),
                    backoff,
                )
                self._drop_connection()
                self._wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            self._wait(self._timeout() if not self.stopping else 0.05)
        return self._shutdown()

    _stop_started: float | None = None

    def _drained(self) -> bool:
        if self._stop_started is None:
            self._stop_started = time.monotonic()
            log.info(
                "stopping: finishing %d requests in flight (up to %.0fs); "
                "signal again to quit at once",
                len(self.claimed) - self.scheduler.queued,
                self.settings.shutdown_timeout,
            )
            # Claimed but not started: give them back now rather than at lease expiry.
            unstarted = self.scheduler.unstarted()
            if unstarted:
                self._release(unstarted)
        self._collect()  # also gives back jobs that expired meanwhile
        # Finished requests leave self.claimed when their result is collected.
        return not self.claimed and not self.pending

    def _shutdown_expired(self) -> bool:
        assert self._stop_started is not None
        return time.monotonic() - self._stop_started > self.settings.shutdown_timeout

    def _shutdown(self) -> int:
        self._collect()
        try:
            if self.pending:
                db.record_outcomes(
                    self._connection(),
                    self.ident,
                    [(o, decide(o, base=self.settings.retry_base)) for o in self.pending],
                )
                self.pending = []
        except (psycopg.OperationalError, UserError) as exc:
            log.error(
                "could not record %d results (%s): those deliveries will be retried "
                "after their lease expires",
                len(self.pending),
                db.one_line(exc),
            )
        self.scheduler.close()
        unfinished = list(self.claimed)
        if unfinished:
            log.warning(
                "%d requests still in flight after %.0fs: their deliveries are retried "
                "after their lease expires",
                len(unfinished),
                self.settings.shutdown_timeout,
            )
        try:
            if self.conn is not None and not self.conn.closed:
                db.unregister_dispatcher(self.conn, self.ident)
        except psycopg.Error:
            pass
        self.listener.stop()
        self._drop_connection()
        log.info("dispatcher %s stopped", self.ident)
        logging.shutdown()
        if unfinished:
            os._exit(0)  # sender threads are stuck in requests; do not wait for them
        return 0
