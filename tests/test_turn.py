"""The dispatcher's turn (webhooks.dispatch_turn) at the SQL level."""

from __future__ import annotations

import time

import psycopg

from dispatcher import db
from dispatcher.config import Settings
from dispatcher.daemon import RATE_WINDOW, WRITE_BACK_DELAY
from dispatcher.delivery import Outcome
from dispatcher.retry import decide
from tests.conftest import Database, in_threads
from tests.jobs import make_job, make_outcome, stepped_dispatcher


def rows_read(conn: psycopg.Connection) -> dict[str, int]:
    """Rows read so far from the queue tables, by sequential and index scans."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")  # the backend flushes its statistics when next idle
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) "
        "FROM pg_stat_user_tables WHERE schemaname = 'webhooks' "
        "AND relname IN ('delivery', 'outbox', 'capture')"
    ).fetchall()
    return {name: int(n) for name, n in rows}


def turn(conn: psycopg.Connection, results: list[Outcome], claim: int) -> db.Cycle:
    return db.cycle(
        conn,
        me="me",
        results=[(o, decide(o)) for o in results],
        fan_out_limit=200,
        claim_limit=claim,
        per_webhook=claim,
        lease=60.0,
        default_timeout=10.0,
    )


def succeeded(found: db.Cycle) -> list[Outcome]:
    return [make_outcome(j) for j in found.jobs]


def test_turns_read_only_the_rows_they_need(database: Database) -> None:
    """Plans cached while the tables were small must not read them whole once they are big."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        db.add_webhook(owner, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        conn = db.connect(database.dsn)
        db.register_dispatcher(conn, "me", "h", 1, "v")
        # Ten turns on near-empty tables: the function's plans get cached now.
        for i in range(10):
            owner.execute("INSERT INTO t VALUES (%s)", (i,))
            found = turn(conn, [], 5)
            turn(conn, succeeded(found), 0)
        owner.execute("INSERT INTO t SELECT g FROM generate_series(100, 20099) g")
        before = rows_read(conn)
        while db.fan_out(conn, 2000):
            pass
        fanned = rows_read(conn)
        # Each of the 20,000 changes is read a few times (queue index, update,
        # insert); a plan that scanned a table per row would read millions.
        assert fanned["outbox"] - before["outbox"] < 100_000, (before, fanned)
        assert fanned["delivery"] - before["delivery"] < 100_000, (before, fanned)
        # The 20,000 changes came in 20 captured statements (of 1,000 changes).
        assert fanned["capture"] - before["capture"] < 5000, (before, fanned)
        before = fanned
        pending: list[Outcome] = []
        for _ in range(10):
            found = turn(conn, pending, 20)
            assert len(found.jobs) == 20
            pending = succeeded(found)
        turn(conn, pending, 0)
        after = rows_read(conn)
        # 200 deliveries claimed and recorded out of 20,000: a turn that read
        # either table whole would read 20,000 rows each time.
        assert after["delivery"] - before["delivery"] < 5000, (before, after)
        assert after["outbox"] - before["outbox"] < 5000, (before, after)
        assert after["capture"] - before["capture"] < 5000, (before, after)
        done = owner.execute(
            "SELECT count(*) FROM webhooks.delivery WHERE state = 'succeeded'"
        ).fetchone()
        assert done == (210,)
        conn.close()


def test_writers_notify_while_changes_arrive_slowly_and_not_while_they_pour_in(
    database: Database,
) -> None:
    """The idle flag follows the rate of new changes, not how many one turn finds."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        db.add_webhook(owner, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        settings = Settings(dsn=database.dsn, batch_size=5000, retention=0)
        with database.connect() as listener, stepped_dispatcher(settings) as d:
            listener.execute(f"LISTEN {db.CHANNEL}")

            def notified() -> bool:
                return any(
                    not n.payload.startswith("probe:") for n in listener.notifies(timeout=0.2)
                )

            def step_after_window() -> None:
                time.sleep(RATE_WINDOW * 1.2)  # a slow machine only lowers the rate
                d._on_wake()  # as the listener thread does for a NOTIFY
                d._step()

            step_after_window()
            assert d.armed
            owner.execute("INSERT INTO t SELECT g FROM generate_series(1, 5) g")
            assert notified()
            # Five changes in a turn, but about a hundred a second: stay woken by NOTIFY.
            step_after_window()
            assert d.armed
            owner.execute("INSERT INTO t SELECT g FROM generate_series(100, 1099) g")
            assert notified()  # still armed when it committed
            step_after_window()
            assert not d.armed  # a thousand in a window: poll instead
            owner.execute("INSERT INTO t VALUES (2000)")
            assert not notified()
            step_after_window()
            assert d.armed  # quiet again
            owner.execute("INSERT INTO t VALUES (2001)")
            assert notified()


def test_a_backlog_left_in_the_outbox_keeps_the_writers_quiet(database: Database) -> None:
    """Turns that fan out nothing, because the claim filled the room, must not
    make a backlog look quiet."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        db.add_webhook(owner, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        for i in range(10):  # ten statements: the fan-out takes whole statements
            owner.execute(
                "INSERT INTO t SELECT g FROM generate_series(%s::int, %s::int) g",
                (i * 100 + 1, i * 100 + 100),
            )
        settings = Settings(
            dsn=database.dsn, batch_size=200, per_webhook_concurrency=100, retention=0
        )
        with stepped_dispatcher(settings) as d, db.connect(database.dsn) as other:
            d._on_wake()
            d._step()
            assert d.more and not d.armed  # 200 of 1,000 fanned out and leased
            # 150 still held, over half the capacity: no room. No turn,
            # however woken, and no busy loop; the notification waits.
            for delivery_id in list(d.claimed)[:50]:
                del d.claimed[delivery_id]
            assert not d._room()
            looked = d.last_look
            d._on_wake()
            d._step()
            assert d.last_look == looked and d._notified.is_set()
            assert d._timeout() > 0
            # Another dispatcher makes pending deliveries of 300 more; ours
            # is done with its jobs (as if they were sent).
            assert db.fan_out(other, 300) == 300
            d.claimed.clear()
            d.held.clear()
            time.sleep(RATE_WINDOW * 1.2)
            d._on_wake()
            d._step()
            assert len(d.claimed) == 200  # all from the pending deliveries
            assert not d.more
            assert not d.armed  # the 500 in the outbox still count as a high rate


def test_fan_out_sets_object_ids_and_drops_changes_no_webhook_wants(database: Database) -> None:
    with database.connect() as owner:
        owner.execute("CREATE TABLE i (id int PRIMARY KEY, v text)")
        owner.execute("CREATE TABLE c (a int, b text, PRIMARY KEY (b, a))")
        owner.execute("CREATE TABLE n (v text)")
        owner.execute("CREATE TABLE x (id int PRIMARY KEY)")
        for t in ("i", "c", "n", "x"):
            db.watch(owner, t, None)
        db.add_webhook(
            owner,
            {
                "name": "w",
                "payload_url": "http://127.0.0.1:9/",
                "triggers": ["create", "update"],
                "object_types": ["public.i", "public.c", "public.n", "public.old"],
            },
        )
        # A change captured before migration 005, with its object id set by the
        # trigger, and left in the outbox: migration 007 fans it out on its own.
        owner.execute(
            "INSERT INTO webhooks.outbox (event, object_type, object_id, postchange, changed_at, "
            "db_user) VALUES ('create', 'public.old', '7', '{\"id\": 8}', now(), 'x')"
        )
        owner.execute("INSERT INTO i VALUES (1, 'a')")
        owner.execute("INSERT INTO x VALUES (1)")  # captured (a create), wanted by no webhook
        owner.execute("INSERT INTO c VALUES (1, 'k')")
        owner.execute("UPDATE c SET a = 2")  # the key itself changes
        owner.execute("INSERT INTO n VALUES ('x')")
        owner.execute("DELETE FROM i")  # no webhook wants deletes: not even captured
        assert owner.execute("SELECT count(*) FROM webhooks.captured").fetchone() == (5,)
        with db.connect(database.dsn) as conn:
            assert db.fan_out_outbox(conn) == 1
            assert db.fan_out_outbox(conn) == 0
            assert turn(conn, [], 0).changes == 5
        assert owner.execute("SELECT count(*) FROM webhooks.capture").fetchone() == (0,)
        kept = owner.execute(
            "SELECT object_type, object_id, key_columns, dispatched_at IS NOT NULL "
            "FROM webhooks.outbox ORDER BY id"
        ).fetchall()
        assert kept == [
            ("public.old", 7, None, True),
            ("public.i", 1, None, True),
            ("public.c", {"b": "k", "a": 1}, None, True),
            ("public.c", {"b": "k", "a": 2}, None, True),
            ("public.n", None, None, True),
        ]
        sent = owner.execute(
            "SELECT d.object_type, d.object_id FROM webhooks.delivery d ORDER BY d.seq"
        ).fetchall()
        assert sent == [(t, i) for t, i, _, _ in kept]


def test_a_webhook_asked_for_nothing_is_refilled_once_half_its_jobs_are_done(
    database: Database,
) -> None:
    """Its cap moves with its request times: a refill that came at a higher cap
    may find it above half the new one. It must be refilled later all the same."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        webhook = db.add_webhook(owner, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        owner.execute("INSERT INTO t SELECT g FROM generate_series(1, 300) g")
        settings = Settings(
            dsn=database.dsn, per_webhook_concurrency=8, batch_size=200, retention=0
        )
        with stepped_dispatcher(settings) as d:
            d._on_wake()
            d._step()  # fans out, claims twice the concurrency
            assert d.held[webhook] == 16 and d.capped == {webhook}
            # 24.6 ms a request: the cap is 8 + 8 * 0.25 / 0.0246 = 89; hold 45 of them.
            d.duration[webhook] = 0.0246
            claimed = list(d.claimed.values())
            for i in range(29):
                job = make_job(delivery_id=f"x{i}", webhook_id=webhook)
                d.claimed[job.delivery_id] = job
                d.held[webhook] += 1
            assert d._cap(webhook) == 89
            # As if a refill had fired at a cap of 90 (half: 45) just before.
            d.capped.clear()
            d.refill = True
            d._step()
            assert d.held[webhook] == 45  # above half of 89: asked for nothing
            assert d.capped == {webhook}
            d.results.put(make_outcome(claimed[0], duration_ms=24.6))
            d._collect()  # 44 held: half of 89
            assert d.refill


def delivery_states(owner: psycopg.Connection) -> list[tuple[int, int, str]]:
    """(object id, webhook id, state) of every delivery, oldest change first."""
    return [
        (int(oid), int(wid), state)
        for oid, wid, state in owner.execute(
            "SELECT object_id, webhook_id, state FROM webhooks.delivery "
            "ORDER BY outbox_id, webhook_id"
        )
    ]


def delivery_updates(conn: psycopg.Connection) -> int:
    """Delivery rows updated so far, counting those ``conn`` updated."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")  # the backend flushes its statistics when next idle
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'webhooks.delivery'::regclass"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_new_deliveries_are_leased_as_they_are_made_where_their_webhook_has_room(
    database: Database,
) -> None:
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        a = db.add_webhook(owner, {"name": "a", "payload_url": "http://127.0.0.1:9/a"})
        b = db.add_webhook(owner, {"name": "b", "payload_url": "http://127.0.0.1:9/b"})
        owner.execute("INSERT INTO t VALUES (1)")
        with db.connect(database.dsn) as conn:
            # Made pending: this turn may lease nothing.
            assert db.fan_out(conn, 200) == 1
            assert delivery_states(owner) == [(1, a, "pending"), (1, b, "pending")]
            for i in range(2, 6):
                owner.execute("INSERT INTO t VALUES (%s)", (i,))
            updates = delivery_updates(conn)

            def cycle(claim_limit: int, **room: int) -> db.Cycle:
                ids = {"a": a, "b": b}
                return db.cycle(
                    conn,
                    me="me",
                    fan_out_limit=200,
                    claim_limit=claim_limit,
                    per_webhook=2,
                    room={ids[name]: n for name, n in room.items()},
                    lease=60.0,
                    default_timeout=10.0,
                )

            # Three in all: the older deliveries first, then only as many
            # changes as are left room for, oldest first.
            found = cycle(3)
            assert (found.changes, found.more) == (1, True)
            assert [(j.webhook_id, j.object_id) for j in found.jobs] == [(a, 1), (b, 1), (a, 2)]
            assert delivery_states(owner) == [
                (1, a, "sending"),
                (1, b, "sending"),
                (2, a, "sending"),
                (2, b, "pending"),  # over the turn's limit
            ]
            # Only the two older deliveries were updated to lease them.
            assert delivery_updates(conn) - updates == 2
            leases = owner.execute(
                "SELECT DISTINCT claimed_by, lease_until > now() + interval '59 seconds' "
                "FROM webhooks.delivery WHERE state = 'sending'"
            ).fetchall()
            assert leases == [("me", True)]
            # A full webhook gets nothing, and one with room its older
            # delivery first, then new ones up to its room.
            found = cycle(3, a=0, b=2)
            assert (found.changes, found.more) == (2, True)
            assert [(j.webhook_id, j.object_id) for j in found.jobs] == [(b, 2), (b, 3)]
            assert delivery_states(owner)[4:] == [
                (3, a, "pending"),
                (3, b, "sending"),
                (4, a, "pending"),
                (4, b, "pending"),
            ]
            # A claim that fills the room leaves the new changes captured.
            found = cycle(2)
            assert (found.changes, found.more) == (0, None)
            assert [(j.webhook_id, j.object_id) for j in found.jobs] == [(a, 3), (a, 4)]
            assert owner.execute(
                "SELECT object_type, postchange FROM webhooks.captured"
            ).fetchall() == [("public.t", {"id": 5})]
            # A statement is fanned out in part when the room is smaller: its
            # first changes now, the rest in the next turns.
            assert cycle(1, a=0, b=0).changes == 1
            owner.execute("INSERT INTO t SELECT g FROM generate_series(6, 8) g")
            found = cycle(1, a=0, b=0)
            assert (found.changes, found.more, found.jobs) == (1, True, [])
            waiting = "SELECT postchange->>'id' FROM webhooks.captured ORDER BY id"
            assert owner.execute(waiting).fetchall() == [("7",), ("8",)]
            assert owner.execute("SELECT outbox_backlog FROM webhooks.status").fetchone() == (2,)
            found = cycle(3, a=0, b=0)
            assert (found.changes, found.more) == (2, False)
            assert owner.execute(waiting).fetchall() == []
            assert delivery_states(owner)[8:] == [
                (g, w, "pending") for g in range(5, 9) for w in (a, b)
            ]


def test_a_fan_out_that_is_lost_makes_the_same_delivery_ids_again(database: Database) -> None:
    """A turn rolled back (or lost in a crash before its WAL was flushed) is
    done again under the same ids: a request already sent for it and the one
    sent again carry the same X-Danbyte-Delivery."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        db.add_webhook(owner, {"name": "a", "payload_url": "http://127.0.0.1:9/a"})
        db.add_webhook(owner, {"name": "b", "payload_url": "http://127.0.0.1:9/b"})
        owner.execute("INSERT INTO t SELECT g FROM generate_series(1, 3) g")
        with db.connect(database.dsn) as conn:
            # (The test server itself runs without synchronous commits.)
            conn.execute("SET synchronous_commit = on")
            with conn.transaction(force_rollback=True):
                first = turn(conn, [], 10).jobs
                # The turn does not wait for its WAL flush, and only the turn.
                assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
            again = turn(conn, [], 10).jobs
        assert len(first) == 6
        assert [j.delivery_id for j in again] == [j.delivery_id for j in first]
        assert len({j.delivery_id for j in first}) == 6
        ids = owner.execute(
            "SELECT d.id = webhooks.delivery_uuid(d.outbox_id, d.webhook_id, o.changed_at), "
            "substr(d.id::text, 15, 1), substr(d.id::text, 20, 1) IN ('8', '9', 'a', 'b') "
            "FROM webhooks.delivery d JOIN webhooks.outbox o "
            "ON o.id = d.outbox_id"
        ).fetchall()
        assert ids == [(True, "3", True)] * 6  # version 3, RFC 4122 variant


def test_results_ride_along_with_a_look_only_while_polling(database: Database) -> None:
    """Woken by each change (armed), a look is on that change's way to its
    request: results wait for a turn of their own. Polling, they ride along."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        db.add_webhook(owner, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        settings = Settings(dsn=database.dsn, retention=0)
        with stepped_dispatcher(settings) as d:
            for armed in (True, False):
                owner.execute("INSERT INTO t VALUES (%s)", (int(armed),))
                d._on_wake()
                d._step()
                (job,) = d.claimed.values()
                d.armed = armed
                d.results.put(make_outcome(job))
                owner.execute("INSERT INTO t VALUES (%s)", (10 + int(armed),))
                d._on_wake()
                d._step()  # the look: it claims the new change
                assert len(d.claimed) == 1
                assert [o.job.delivery_id for o in d.pending] == (
                    [job.delivery_id] if armed else []
                )
                d.first_result_at = (d.first_result_at or 0.0) - WRITE_BACK_DELAY
                d._step()  # written back now whichever way
                assert not d.pending
                state = owner.execute(
                    "SELECT state FROM webhooks.delivery WHERE id = %s", (job.delivery_id,)
                ).fetchone()
                assert state == ("succeeded",)
                d.claimed.clear()
                d.held.clear()


def test_dispatchers_taking_parts_of_the_same_statements_fan_each_change_out_once(
    database: Database,
) -> None:
    """A turn whose snapshot predates another's partial take of a statement must
    start where that take ended (its lock returns the latest row, its reads the
    older one): else the same changes are fanned out twice."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        db.add_webhook(owner, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        owner.execute("INSERT INTO t SELECT g FROM generate_series(1, 3000) g")
    taken: list[int] = []

    def work() -> None:
        with db.connect(database.dsn) as conn:
            while found := db.cycle(conn, me="me", fan_out_limit=3).changes:
                taken.append(found)

    assert in_threads(work, 4, 120) == [] and sum(taken) == 3000
    with database.connect() as owner:
        made = owner.execute(
            "SELECT count(*), count(DISTINCT object_id::text) FROM webhooks.delivery"
        ).fetchone()
        assert made == (3000, 3000)


def test_a_turn_locks_only_the_statements_it_takes(database: Database) -> None:
    """Another dispatcher's turn takes the next statement while the first one's
    turn is still open."""
    with database.connect() as owner:
        owner.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(owner, "t", None)
        db.add_webhook(owner, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        for i in range(3):
            owner.execute(
                "INSERT INTO t SELECT g FROM generate_series(%s::int, %s::int) g",
                (i * 10 + 1, i * 10 + 10),
            )
    with db.connect(database.dsn) as first, db.connect(database.dsn) as second:
        with first.transaction():  # its turn's row locks are held until this ends
            assert db.cycle(first, me="a", fan_out_limit=5).changes == 5
            assert db.cycle(second, me="b", fan_out_limit=5).changes == 5
        taken = second.execute(
            "SELECT (SELECT count(*) FROM webhooks.outbox), "
            "(SELECT array_agg(fanned ORDER BY id) FROM webhooks.capture)"
        ).fetchone()
        assert taken == (10, [5, 5, 0])
