"""The dispatcher daemon, as a real subprocess, against real receivers."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import time
from collections import Counter

import psycopg
import pytest

from dispatcher import db
from tests.conftest import Database, wait_until
from tests.httpd import Receiver

SECRET = "s3cr3t-value-that-must-never-leak"


def add_webhook(conn: psycopg.Connection, name: str, url: str, **fields: object) -> None:
    db.add_webhook(conn, {"name": name, "payload_url": url, **fields})


def deliveries(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT webhook_name, event, state, status_code, error, attempts FROM webhooks.delivery "
        "ORDER BY seq"
    ).fetchall()


def wait_final(conn: psycopg.Connection, n: int, timeout: float = 30.0) -> list[tuple]:
    def done() -> bool:
        row = conn.execute(
            "SELECT count(*) FROM webhooks.delivery WHERE state IN ('succeeded', 'failed')"
        ).fetchone()
        return bool(row and row[0] >= n)

    wait_until(done, timeout, f"{n} finished deliveries")
    return deliveries(conn)


@pytest.fixture
def orders(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric, status text)")
    db.watch(conn, "orders", None)
    return conn


def test_create_update_delete_are_delivered_signed(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    add_webhook(
        conn,
        "signed",
        receiver.url("/signed"),
        secret=SECRET,
        additional_headers="Authorization: Bearer abc\nX-Extra: 1",
    )
    add_webhook(conn, "plain", receiver.url("/plain"), method="PUT", content_type="text/plain")
    d = daemon()
    with conn.transaction():
        conn.execute("SET LOCAL danbyte.username = 'alice'")
        conn.execute("SET LOCAL danbyte.request_id = 'r-42'")
        conn.execute("INSERT INTO orders VALUES (1, 10, 'new')")
    conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
    conn.execute("DELETE FROM orders WHERE id = 1")
    # Deliveries are sent in parallel and may arrive in any order: sort by change time.
    signed = sorted(receiver.wait_for(3, path="/signed"), key=lambda r: r.json()["timestamp"])
    plain = receiver.wait_for(3, path="/plain")
    assert [r.headers["X-Danbyte-Event"] for r in signed] == ["create", "update", "delete"]
    for r in signed:
        assert r.method == "POST"
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Authorization"] == "Bearer abc"
        assert r.headers["X-Extra"] == "1"
        assert r.headers["User-Agent"].startswith("Danbyte-Webhooks/")
        expected = "sha512=" + hmac.new(SECRET.encode(), r.body, hashlib.sha512).hexdigest()
        assert hmac.compare_digest(r.headers["X-Danbyte-Signature"], expected)
        body = r.json()
        assert body["delivery_id"] == r.headers["X-Danbyte-Delivery"]
        assert list(body)[:5] == ["event", "delivery_id", "timestamp", "object_type", "object_id"]
        assert body["object_type"] == "public.orders" and body["object_id"] == 1
        assert SECRET not in r.body.decode()
    create, update, delete = (r.json() for r in signed)
    assert create["username"] == "alice" and create["request_id"] == "r-42"
    assert create["data"] == {"id": 1, "total": 10, "status": "new"}
    assert create["snapshots"] == {"prechange": None, "postchange": create["data"]}
    assert update["snapshots"]["prechange"] == create["data"]
    assert update["data"]["status"] == "paid"
    assert delete["data"] == update["data"] and delete["snapshots"]["postchange"] is None
    assert update["username"] == "postgres" and update["db_user"] == "postgres"
    for r in plain:
        assert r.method == "PUT" and r.headers["Content-Type"] == "text/plain"
        assert "X-Danbyte-Signature" not in r.headers
    ids = [r.headers["X-Danbyte-Delivery"] for r in signed + plain]
    assert len(set(ids)) == 6
    states = wait_final(conn, 6)
    assert {s[2] for s in states} == {"succeeded"}
    log = d.output()
    assert "webhook=signed event=create" in log
    assert SECRET not in log
    logged = dict(
        conn.execute(
            "SELECT request_headers::text, webhook_name FROM webhooks.delivery_log"
        ).fetchall()
    )
    signatures = [r.headers["X-Danbyte-Signature"][7:] for r in signed]
    for headers, name in logged.items():
        assert SECRET not in headers
        assert not any(sig in headers or sig[:16] in log for sig in signatures)
        assert ('"X-Danbyte-Signature": "sha512=<redacted>"' in headers) == (name == "signed")


def test_filtering_disabled_fanout_and_rollback(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    db.watch(conn, "other", "things.other")
    add_webhook(
        conn,
        "orders-created",
        receiver.url("/a"),
        object_types=["public.orders"],
        triggers=["create"],
    )
    add_webhook(conn, "all-deletes", receiver.url("/b"), triggers=["delete"])
    add_webhook(conn, "off", receiver.url("/c"), enabled=False)
    add_webhook(conn, "other-any", receiver.url("/d"), object_types=["things.other"])
    daemon()
    with pytest.raises(ZeroDivisionError), conn.transaction():
        conn.execute("INSERT INTO orders VALUES (99, 1, 'x')")
        raise ZeroDivisionError
    conn.execute("INSERT INTO orders VALUES (1, 1, 'x')")
    conn.execute("UPDATE orders SET total = 2")
    conn.execute("DELETE FROM orders")
    conn.execute("INSERT INTO other VALUES (5)")
    conn.execute("DELETE FROM other")
    wait_final(conn, 5)
    time.sleep(0.5)  # anything extra would have arrived by now
    got = Counter((r.path, r.headers["X-Danbyte-Event"]) for r in receiver.requests)
    assert got == Counter(
        {("/a", "create"): 1, ("/b", "delete"): 2, ("/d", "create"): 1, ("/d", "delete"): 1}
    )
    assert 99 not in [r.json()["object_id"] for r in receiver.requests]


def test_enabling_later_does_not_replay_and_disabling_cancels(orders, receiver, daemon) -> None:
    conn = orders
    add_webhook(conn, "late", receiver.url("/late"), enabled=False)
    conn.execute("INSERT INTO orders VALUES (1, 1, 'before')")
    db.update_webhook(conn, "late", {"enabled": True})
    conn.execute("INSERT INTO orders VALUES (2, 1, 'after')")
    # pending deliveries of a webhook that gets disabled are cancelled
    add_webhook(conn, "doomed", receiver.url("/doomed"), object_types=["public.orders"])
    conn.execute("UPDATE orders SET total = 2 WHERE id = 2")
    db.fan_out(conn, 100)
    db.update_webhook(conn, "doomed", {"enabled": False})
    daemon()
    got = receiver.wait_for(2, path="/late")
    # deliveries run in parallel: no ordering between them
    assert sorted((r.json()["object_id"], r.json()["event"]) for r in got) == [
        (2, "create"),
        (2, "update"),
    ]
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM webhooks.outbox WHERE dispatched_at IS NULL"
            ).fetchone()
            == (0,)
        )
    )
    time.sleep(0.5)
    assert [r.path for r in receiver.requests] == ["/late", "/late"]
    assert conn.execute(
        "SELECT state, error FROM webhooks.delivery WHERE webhook_name = 'doomed'"
    ).fetchall() == [("cancelled", "webhook disabled")]


def test_failures_are_recorded_with_readable_errors(
    orders, receiver: Receiver, tls_receiver: Receiver, daemon
) -> None:
    conn = orders
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nobody listens here once closed
    cases = {
        "e500": (receiver.url("/status/500"), {}, "HTTP 500"),
        "e301": (receiver.url("/status/301"), {}, "HTTP 301: redirects are not followed"),
        "closed": (
            receiver.url("/close"),
            {},
            (
                "connection closed by the server before a complete response",
                "connection reset by the server",
            ),
        ),
        "hang": (receiver.url("/hang"), {"timeout_seconds": 1}, "no response within 1s"),
        "refused": (f"http://127.0.0.1:{dead_port}/x", {}, "connection refused"),
        "tls-verify": (
            tls_receiver.url("/tls"),
            {},
            "TLS error: certificate verify failed: self-signed certificate",
        ),
        "tls-noverify": (tls_receiver.url("/tls"), {"verify_tls": False}, None),
    }
    for name, (url, extra, _) in cases.items():
        add_webhook(conn, name, url, **extra)
    daemon()
    conn.execute("INSERT INTO orders VALUES (1, 1, 'x')")
    rows = {r[0]: r for r in wait_final(conn, len(cases), timeout=60)}
    for name, (_, _, error) in cases.items():
        _, _, state, status, err, attempts = rows[name]
        assert attempts == 1
        if error is None:
            assert (state, status, err) == ("succeeded", 200, None), name
        else:
            assert state == "failed", name
            assert err is not None and err.startswith(error), (name, err)
    assert rows["e500"][3] == 500 and rows["e301"][3] == 301
    body = conn.execute(
        "SELECT response_body FROM webhooks.delivery_log WHERE webhook_name = 'e500'"
    ).fetchone()
    assert body == ("status page",)


def test_a_hanging_endpoint_does_not_hold_back_a_healthy_one(orders, receiver, daemon) -> None:
    conn = orders
    add_webhook(conn, "stuck", receiver.url("/hang"), timeout_seconds=20)
    add_webhook(conn, "healthy", receiver.url("/ok"))
    daemon("--workers", "8", "--per-webhook-concurrency", "4")
    conn.execute("INSERT INTO orders SELECT g, g, 'x' FROM generate_series(1, 50) g")
    start = time.monotonic()
    receiver.wait_for(50, path="/ok", timeout=15)
    # All 50 arrive while the stuck webhook holds 4 workers for 20 s each.
    assert time.monotonic() - start < 15
    assert len([r for r in receiver.requests if r.path == "/hang"]) == 4


def test_a_backlog_bigger_than_a_claim_is_claimed_again_without_waiting_for_a_poll(
    orders, receiver, daemon
) -> None:
    # A dispatcher holds at most --batch-size claimed deliveries and claims
    # again when half of them are done. Nothing else would wake it here: the
    # backlog was committed before it started, and its poll backstop (30 s,
    # the longest allowed) is longer than the whole test may take.
    conn = orders
    add_webhook(conn, "w", receiver.url("/w"))
    conn.execute("INSERT INTO orders SELECT g, g, 'x' FROM generate_series(1, 120) g")
    daemon(
        "--workers", "2", "--per-webhook-concurrency", "1", "--batch-size", "20",
        "--poll-interval", "30",
    )  # fmt: skip
    receiver.wait_for(120, path="/w", timeout=25)


def test_changes_made_while_no_dispatcher_runs_are_delivered(orders, receiver, daemon) -> None:
    conn = orders
    add_webhook(conn, "w", receiver.url("/w"))
    conn.execute("INSERT INTO orders SELECT g, g, 'x' FROM generate_series(1, 20) g")
    daemon()
    receiver.wait_for(20, path="/w")


def test_three_dispatchers_deliver_each_change_exactly_once(
    orders, receiver: Receiver, daemon
) -> None:
    conn = orders
    add_webhook(conn, "a", receiver.url("/a"))
    add_webhook(conn, "b", receiver.url("/b"), triggers=["create"])
    for _ in range(3):
        daemon("--batch-size", "50")
    wait_until(
        lambda: conn.execute("SELECT count(*) FROM webhooks.dispatcher").fetchone() == (3,),
        60,
        "three dispatchers to start",
    )
    n = 2000
    for start in range(0, n, 100):
        conn.execute(
            "INSERT INTO orders SELECT g, g, 'x' FROM generate_series(%s::int, %s::int) g",
            (start + 1, start + 100),
        )
    wait_final(conn, 2 * n, timeout=120)
    problems = conn.execute(
        "SELECT state, error, count(*) FROM webhooks.delivery WHERE state <> 'succeeded' "
        "GROUP BY 1, 2"
    ).fetchall()
    assert problems == []
    receiver.wait_for(2 * n, timeout=10)
    time.sleep(1.0)
    reqs = receiver.requests
    assert len(reqs) == 2 * n
    keys = Counter((r.path, r.json()["object_id"]) for r in reqs)
    assert set(keys.values()) == {1}
    assert len({r.headers["X-Danbyte-Delivery"] for r in reqs}) == 2 * n
    workers = conn.execute(
        "SELECT count(DISTINCT dispatcher) FROM webhooks.delivery_attempt"
    ).fetchone()
    assert workers == (3,)


def test_kill_9_mid_delivery_loses_nothing(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    # The lease is at least the request timeout + 5 s, so a 1 s timeout
    # lets the dead dispatcher's leases expire within seconds.
    add_webhook(conn, "slow", receiver.url("/slow/400"), timeout_seconds=1)
    first = daemon("--lease-time", "1", "--workers", "4")
    conn.execute("INSERT INTO orders SELECT g, g, 'x' FROM generate_series(1, 30) g")
    receiver.wait_for(5, path="/slow/400")
    first.signal(signal.SIGKILL)
    first.wait()
    assert conn.execute(
        "SELECT count(*) FROM webhooks.delivery WHERE state = 'sending'"
    ).fetchone() != (0,)
    daemon("--lease-time", "1", "--workers", "4")
    wait_final(conn, 30, timeout=60)
    reqs = receiver.requests
    per_object = Counter(r.json()["object_id"] for r in reqs)
    assert set(per_object) == set(range(1, 31))
    # any duplicate carries the same delivery id
    ids_per_object: dict[int, set[str]] = {}
    for r in reqs:
        ids_per_object.setdefault(r.json()["object_id"], set()).add(r.headers["X-Danbyte-Delivery"])
    assert all(len(ids) == 1 for ids in ids_per_object.values())


def test_sigterm_finishes_the_request_in_flight(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    add_webhook(conn, "slow", receiver.url("/slow/1500"))
    d = daemon()
    conn.execute("INSERT INTO orders VALUES (1, 1, 'x')")
    receiver.wait_for(1, path="/slow/1500")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    assert deliveries(conn) == [("slow", "create", "succeeded", 200, None, 1)]
    assert conn.execute("SELECT count(*) FROM webhooks.dispatcher").fetchone() == (0,)
    # Log lines are written by a thread of their own: the last ones, logged
    # just before the exit, are written all the same.
    lines = d.output().splitlines()
    stopping = next(i for i, line in enumerate(lines) if "stopping: finishing 1 requests" in line)
    assert any("webhook=slow event=create" in x and "status=200" in x for x in lines[stopping:])
    assert lines[-1].endswith(" stopped")


def test_sigterm_gives_back_claimed_deliveries_not_yet_started(
    orders, receiver: Receiver, daemon
) -> None:
    conn = orders
    add_webhook(conn, "slow", receiver.url("/slow/1500"))
    # One at a time, two claimed: the second waits in the local queue.
    d = daemon("--workers", "1", "--per-webhook-concurrency", "1")
    conn.execute("INSERT INTO orders SELECT g, g, 'x' FROM generate_series(1, 3) g")
    receiver.wait_for(1, path="/slow/1500")
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    states = Counter(r[2] for r in deliveries(conn))
    assert states == {"succeeded": 1, "pending": 2}
    assert conn.execute(
        "SELECT count(*) FROM webhooks.delivery WHERE claimed_by IS NOT NULL"
    ).fetchone() == (0,)


def test_a_claimed_job_whose_lease_would_run_out_is_given_back_unsent(
    orders, receiver: Receiver, daemon
) -> None:
    conn = orders
    # Lease = timeout + 5 s = 9 s; a job must start within 9 - 4 - 2 = 3 s of
    # its claim. The second job waits 3.5 s behind the first: too long.
    add_webhook(conn, "slow", receiver.url("/slow/3500"), timeout_seconds=4)
    d = daemon("--workers", "1", "--per-webhook-concurrency", "1", "--lease-time", "1")
    conn.execute("INSERT INTO orders SELECT g, g, 'x' FROM generate_series(1, 2) g")
    final = wait_final(conn, 2, timeout=60)
    assert [r[2:] for r in final] == [("succeeded", 200, None, 1)] * 2
    reqs = receiver.requests
    assert len(reqs) == 2
    assert len({r.headers["X-Danbyte-Delivery"] for r in reqs}) == 2
    assert "given back unsent" in d.output()


def test_listener_killed_and_server_restarted(
    pg_server, database: Database, orders, receiver: Receiver, daemon
) -> None:
    if pg_server.cluster is None:
        pytest.skip("needs the harness's own cluster to restart it")
    conn = orders
    add_webhook(conn, "w", receiver.url("/w"))
    d = daemon()
    conn.execute("INSERT INTO orders VALUES (1, 1, 'x')")
    receiver.wait_for(1)
    killed = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'danbyte-webhooks listener' AND datname = current_database()"
    ).fetchall()
    assert killed == [(True,)]
    conn.execute("INSERT INTO orders VALUES (2, 1, 'x')")
    receiver.wait_for(2, timeout=15)
    conn.close()
    pg_server.cluster.restart()
    with database.connect() as c2:
        c2.execute("INSERT INTO orders VALUES (3, 1, 'x')")
        receiver.wait_for(3, timeout=30)
        # the listener is back too: a change while idle arrives quickly
        wait_until(
            lambda: (
                c2.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'danbyte-webhooks listener'"
                ).fetchone()
                == (1,)
            ),
            15,
            "listener reconnect",
        )
        c2.execute("INSERT INTO orders VALUES (4, 1, 'x')")
        receiver.wait_for(4, timeout=15)
    assert "reconnecting" in d.output()
    assert sorted(r.json()["object_id"] for r in receiver.requests) == [1, 2, 3, 4]


def test_notify_only_when_a_dispatcher_is_idle(orders) -> None:
    conn = orders
    add_webhook(conn, "w", "http://127.0.0.1:9/")  # else the writes capture nothing
    listener = psycopg.connect(conn.info.dsn, autocommit=True)
    listener.execute("LISTEN danbyte_webhooks")
    conn.execute("INSERT INTO orders VALUES (1, 1, 'x')")
    assert list(listener.notifies(timeout=0.3)) == []  # no dispatcher: no NOTIFY
    db.register_dispatcher(conn, "t", "h", 1, "v")
    db.heartbeat(conn, "t", idle=True)
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (2, 1, 'x')")
        conn.execute("UPDATE orders SET total = 5")
        conn.execute("DELETE FROM orders WHERE id = 1")
    got = list(listener.notifies(timeout=0.3))
    assert len(got) == 1 and got[0].payload == ""  # one per transaction
    db.heartbeat(conn, "t", idle=False)  # busy: writers pay no NOTIFY
    conn.execute("INSERT INTO orders VALUES (3, 1, 'x')")
    assert list(listener.notifies(timeout=0.3)) == []
    # One idle dispatcher among several is enough; a stale or departed one is not.
    db.register_dispatcher(conn, "u", "h", 2, "v")
    db.heartbeat(conn, "u", idle=True)
    db.heartbeat(conn, "t", idle=False)
    conn.execute("INSERT INTO orders VALUES (4, 1, 'x')")
    assert len(list(listener.notifies(timeout=0.3))) == 1
    conn.execute("UPDATE webhooks.dispatcher SET seen_at = now() - interval '61 seconds'")
    conn.execute("INSERT INTO orders VALUES (5, 1, 'x')")
    assert list(listener.notifies(timeout=0.3)) == []
    db.heartbeat(conn, "u", idle=True)
    conn.execute("INSERT INTO orders VALUES (6, 1, 'x')")
    assert len(list(listener.notifies(timeout=0.3))) == 1
    db.unregister_dispatcher(conn, "u")
    conn.execute("INSERT INTO orders VALUES (7, 1, 'x')")
    assert list(listener.notifies(timeout=0.3)) == []
    # An idle dispatcher not heard from for a minute no longer counts, even
    # if nothing has changed in webhooks.dispatcher since.
    db.heartbeat(conn, "t", idle=True)
    conn.execute("SELECT setval('webhooks.wake', extract(epoch FROM now())::bigint - 1)")
    conn.execute("INSERT INTO orders VALUES (8, 1, 'x')")
    assert list(listener.notifies(timeout=0.3)) == []
    listener.close()


def test_body_is_json_with_documented_keys(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    add_webhook(conn, "w", receiver.url("/w"))
    daemon()
    conn.execute("INSERT INTO orders VALUES (7, 1.5, 'x')")
    (r,) = receiver.wait_for(1)
    body = json.loads(r.body.decode("utf-8"))
    assert list(body) == [
        "event",
        "delivery_id",
        "timestamp",
        "object_type",
        "object_id",
        "username",
        "db_user",
        "request_id",
        "webhook",
        "data",
        "snapshots",
    ]


def test_json_logs_and_no_proxy_from_the_environment(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    add_webhook(conn, "w", receiver.url("/w"), secret=SECRET)
    # A proxy in the environment that would swallow every request: ignored.
    d = daemon(
        "--log-format",
        "json",
        env={"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"},
    )
    conn.execute("INSERT INTO orders VALUES (1, 1, 'x')")
    (req,) = receiver.wait_for(1)
    wait_final(conn, 1)
    wait_until(lambda: "delivery " in d.output(), 10, "the delivery log line")
    lines = [json.loads(line) for line in d.output().splitlines() if line.startswith("{")]
    (entry,) = [e for e in lines if e.get("delivery_id") == req.headers["X-Danbyte-Delivery"]]
    assert entry["level"] == "info" and entry["webhook"] == "w" and entry["status_code"] == 200
    assert entry["event"] == "create" and entry["object_id"] == 1
    assert SECRET not in d.output()
    assert req.headers["X-Danbyte-Signature"][7:30] not in d.output()


def test_a_huge_response_is_cut_and_the_next_delivery_still_works(
    orders, receiver: Receiver, daemon
) -> None:
    conn = orders
    add_webhook(conn, "big", receiver.url("/big"), triggers=["create"])
    add_webhook(conn, "after", receiver.url("/after"), triggers=["update"])
    daemon("--workers", "1")
    conn.execute("INSERT INTO orders VALUES (1, 1, 'x')")
    wait_final(conn, 1)
    conn.execute("UPDATE orders SET total = 2")
    wait_final(conn, 2)
    rows = conn.execute(
        "SELECT webhook_name, outcome, status_code, length(response_body) "
        "FROM webhooks.delivery_log ORDER BY attempted_at"
    ).fetchall()
    assert rows == [("big", "succeeded", 200, 4096), ("after", "succeeded", 200, 12)]
