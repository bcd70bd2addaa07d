"""Operating: delivery log, retries, redelivery, retention, status."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from dispatcher import db
from tests.conftest import Database, wait_until
from tests.httpd import Receiver
from tests.test_management import Cli

SECRET = "op-secret-9d1e2f"


@pytest.fixture
def orders(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, v text)")
    db.watch(conn, "orders", None)
    return conn


@pytest.fixture
def cli(database: Database) -> Cli:
    return Cli(database.dsn)


def attempts(conn: psycopg.Connection, webhook: str) -> list[tuple]:
    return conn.execute(
        "SELECT delivery_id::text, attempt, outcome, status_code, attempted_at "
        "FROM webhooks.delivery_log WHERE webhook_name = %s ORDER BY attempted_at",
        (webhook,),
    ).fetchall()


def final(conn: psycopg.Connection, webhook: str) -> tuple:
    def done() -> tuple | None:
        row = conn.execute(
            "SELECT state, attempts, status_code, error FROM webhooks.delivery "
            "WHERE webhook_name = %s AND state IN ('succeeded', 'failed')",
            (webhook,),
        ).fetchone()
        return row

    wait_until(done, 30, f"a final delivery for {webhook}")
    row = done()
    assert row is not None
    return row


def test_retries_with_backoff_keep_the_delivery_id(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    db.add_webhook(
        conn, {"name": "flaky", "payload_url": receiver.url("/flaky/2/500"), "max_attempts": 3}
    )
    daemon("--retry-base", "0.4")
    conn.execute("INSERT INTO orders VALUES (1, 'x')")
    assert final(conn, "flaky") == ("succeeded", 3, 200, None)
    reqs = receiver.wait_for(3)
    assert len({r.headers["X-Danbyte-Delivery"] for r in reqs}) == 1
    log = attempts(conn, "flaky")
    assert [(a[1], a[2], a[3]) for a in log] == [
        (1, "retrying", 500),
        (2, "retrying", 500),
        (3, "succeeded", 200),
    ]
    # backoff: at least half of base * 2**(attempt-1) between attempts
    gaps = [(log[i + 1][4] - log[i][4]).total_seconds() for i in range(2)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps


def test_retry_after_is_honoured(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    db.add_webhook(
        conn, {"name": "busy", "payload_url": receiver.url("/retry-after/2"), "max_attempts": 2}
    )
    daemon("--retry-base", "0.05")
    conn.execute("INSERT INTO orders VALUES (1, 'x')")
    assert final(conn, "busy")[:3] == ("succeeded", 2, 200)
    log = attempts(conn, "busy")
    assert log[0][3] == 429
    assert (log[1][4] - log[0][4]).total_seconds() >= 1.9


def test_410_disables_and_4xx_is_not_retried_unless_asked(
    orders, receiver: Receiver, daemon
) -> None:
    conn = orders
    db.add_webhook(
        conn, {"name": "gone", "payload_url": receiver.url("/status/410"), "max_attempts": 5}
    )
    db.add_webhook(
        conn, {"name": "e404", "payload_url": receiver.url("/status/404"), "max_attempts": 3}
    )
    db.add_webhook(
        conn,
        {
            "name": "e404-retry",
            "payload_url": receiver.url("/status/404"),
            "max_attempts": 2,
            "retry_on_4xx": True,
        },
    )
    daemon("--retry-base", "0.05")
    conn.execute("INSERT INTO orders VALUES (1, 'x')")
    assert final(conn, "gone")[:3] == ("failed", 1, 410)
    assert final(conn, "e404")[:3] == ("failed", 1, 404)
    assert final(conn, "e404-retry")[:3] == ("failed", 2, 404)
    hook = db.get_webhook(conn, "gone")
    assert hook["enabled"] is False
    assert hook["disabled_reason"].startswith("the receiver answered 410 Gone (at ")
    (entry, *_) = db.changelog(conn, "gone")
    assert entry["action"] == "update" and entry["after"]["enabled"] is False
    conn.execute("INSERT INTO orders VALUES (2, 'x')")
    final(conn, "e404")
    time.sleep(0.5)
    assert [r.path for r in receiver.requests].count("/status/410") == 1


def test_redeliver_one_and_in_bulk(orders, receiver: Receiver, daemon, cli: Cli) -> None:
    conn = orders
    db.add_webhook(conn, {"name": "f", "payload_url": receiver.url("/flaky/1/503")})
    daemon()
    conn.execute("INSERT INTO orders VALUES (1, 'x'), (2, 'y'), (3, 'z')")
    wait_until(
        lambda: (
            conn.execute("SELECT count(*) FROM webhooks.delivery WHERE state = 'failed'").fetchone()
            == (3,)
        )
    )
    failed = json.loads(cli.ok("deliveries", "--status", "failed", "--since", "1h", "--json"))
    assert len(failed) == 3 and {f["status_code"] for f in failed} == {503}
    one = failed[0]["id"]
    assert cli.ok("delivery", "redeliver", one).strip() == f"queued delivery {one} again"
    wait_until(
        lambda: (
            conn.execute("SELECT state FROM webhooks.delivery WHERE id = %s", (one,)).fetchone()
            == ("succeeded",)
        )
    )
    assert (
        cli.ok(
            "deliveries", "redeliver", "--webhook", "f", "--status", "failed", "--since", "2h"
        ).strip()
        == "queued 2 deliveries again"
    )
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM webhooks.delivery WHERE state = 'succeeded'"
            ).fetchone()
            == (3,)
        )
    )
    ids = [r.headers["X-Danbyte-Delivery"] for r in receiver.requests]
    assert len(ids) == 6 and len(set(ids)) == 3  # a redelivery keeps its id
    shown = cli.ok("delivery", "show", one)
    assert "attempt 1" in shown and "attempt 2" in shown and "< HTTP 503" in shown
    detail = json.loads(cli.ok("delivery", "show", one, "--json"))
    assert [a["outcome"] for a in detail["attempt_log"]] == ["failed", "succeeded"]
    assert cli.fails("delivery", "redeliver", "nope") == (
        "Error: 'nope' is not a delivery id (a UUID)"
    )
    assert cli.fails("delivery", "show", "00000000-0000-0000-0000-000000000000") == (
        "Error: no delivery with id 00000000-0000-0000-0000-000000000000"
    )
    assert cli.fails("deliveries", "redeliver", "--webhook", "nope") == (
        'Error: no webhook named "nope"'
    )
    listing = cli.ok("deliveries", "--webhook", "f")
    assert listing.splitlines()[0].split()[:3] == ["DELIVERY", "CREATED", "WEBHOOK"]
    assert cli.fails("deliveries", "--since", "soon", code=2).endswith(
        "'soon' is not a duration: use a number with s, m, h, d or w, like 7d"
    )


def test_delivery_log_redacts_the_signature(orders, receiver: Receiver, daemon, cli) -> None:
    conn = orders
    db.add_webhook(conn, {"name": "s", "payload_url": receiver.url("/s"), "secret": SECRET})
    daemon()
    conn.execute("INSERT INTO orders VALUES (1, 'x')")
    final(conn, "s")
    (d,) = json.loads(cli.ok("deliveries", "--json"))
    shown = cli.ok("delivery", "show", d["id"])
    assert "> X-Danbyte-Signature: sha512=<redacted>" in shown
    assert "< HTTP 200" in shown and '< {"ok": true}' in shown
    real = receiver.requests[0].headers["X-Danbyte-Signature"]
    assert all(real[7:40] not in p and SECRET not in p for p in cli.printed)


def test_cleanup_removes_only_what_is_old(orders, cli: Cli) -> None:
    conn = orders
    db.add_webhook(conn, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
    conn.execute("INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 6) g")
    db.fan_out(conn, 100)
    # 1-2 old succeeded, 3 old failed, 4 recent failed, 5 pending (old change), 6 old cancelled
    conn.execute("""
        UPDATE webhooks.delivery d SET
          state = (ARRAY['succeeded','succeeded','failed','failed','pending','cancelled'])[o.k],
          finished_at = CASE WHEN o.k = 5 THEN NULL WHEN o.k = 4 THEN now() - interval '1 day'
                             ELSE now() - interval '8 days' END
          FROM (SELECT id, row_number() OVER (ORDER BY id) AS k FROM webhooks.outbox) o
         WHERE o.id = d.outbox_id""")
    conn.execute("UPDATE webhooks.outbox SET dispatched_at = now() - interval '9 days'")
    conn.execute("""
        INSERT INTO webhooks.delivery_attempt (delivery_id, attempt, attempted_at, duration_ms,
            dispatcher, outcome, request_method, request_url, request_headers)
        SELECT id, 1, now(), 1, 'x', 'failed', 'POST', 'http://a/', '{}' FROM webhooks.delivery""")
    assert cli.ok("cleanup", "--older-than", "7d", "--dry-run").strip() == (
        "would remove 4 deliveries, 4 attempts and 4 changes"
    )
    assert conn.execute("SELECT count(*) FROM webhooks.delivery").fetchone() == (6,)
    assert cli.ok("cleanup", "--older-than", "7d").strip() == (
        "removed 4 deliveries, 4 attempts and 4 changes"
    )
    left = conn.execute(
        "SELECT o.postchange->>'id', d.state FROM webhooks.delivery d "
        "JOIN webhooks.outbox o ON o.id = d.outbox_id ORDER BY o.id"
    ).fetchall()
    assert left == [("4", "failed"), ("5", "pending")]
    assert conn.execute("SELECT count(*) FROM webhooks.delivery_attempt").fetchone() == (2,)


def test_retention_keeps_the_tables_bounded(orders, receiver: Receiver, daemon) -> None:
    conn = orders
    db.add_webhook(conn, {"name": "w", "payload_url": receiver.url("/w")})
    daemon("--retention", "1s")
    sizes = []
    for wave in range(5):
        conn.execute(
            "INSERT INTO orders SELECT g, 'x' FROM generate_series(%s::int, %s::int) g",
            (wave * 400 + 1, wave * 400 + 400),
        )
        receiver.wait_for((wave + 1) * 400, timeout=60)
        time.sleep(1.5)
        sizes.append(
            conn.execute(
                "SELECT (SELECT count(*) FROM webhooks.outbox) + "
                "(SELECT count(*) FROM webhooks.delivery) + "
                "(SELECT count(*) FROM webhooks.delivery_attempt)"
            ).fetchone()[0]
        )
    # 2,000 changes went through; what is kept stays around one wave's worth
    assert max(sizes) <= 3 * 400, sizes
    wait_until(
        lambda: conn.execute("SELECT count(*) FROM webhooks.delivery").fetchone() == (0,),
        30,
        "retention",
    )


def test_status_exit_codes(orders, receiver: Receiver, daemon, cli: Cli) -> None:
    conn = orders
    db.add_webhook(conn, {"name": "w", "payload_url": receiver.url("/w")})
    out = cli.fails("status")
    assert "unhealthy: no dispatcher has reported in the last minute" in out
    d = daemon()
    wait_until(lambda: conn.execute("SELECT count(*) FROM webhooks.dispatcher").fetchone() == (1,))
    conn.execute("INSERT INTO orders VALUES (1, 'x')")
    receiver.wait_for(1)
    final(conn, "w")
    out = cli.ok("status")
    assert out.strip().endswith("healthy") and "1 alive" in out
    js = json.loads(cli.ok("status", "--json"))
    assert js["healthy"] is True and js["webhooks"][0]["succeeded_last_hour"] == 1
    # a stuck backlog: a statement of two changes nobody fanned out for ten
    # minutes, and one left in the outbox by the capture function of 001-006
    d.stop()
    db.register_dispatcher(conn, "stuck", "h", 1, "v")
    conn.execute(
        "INSERT INTO webhooks.capture (event, object_type, key_columns, changes, postchange, "
        "changed_at, db_user) VALUES ('create', 'x', '{}', 2, '[{}, {}]', "
        "now() - interval '10 minutes', 'u')"
    )
    conn.execute(
        "INSERT INTO webhooks.outbox (event, object_type, changed_at, db_user) "
        "VALUES ('create', 'x', now() - interval '1 minute', 'u')"
    )
    out = cli.fails("status", "--max-backlog-age", "5m")
    assert "the oldest undelivered change waits for" in out and "(more than 300s)" in out
    row = conn.execute(
        "SELECT outbox_backlog, oldest_undelivered_age_seconds > 590 FROM webhooks.status"
    ).fetchone()
    assert row == (3, True)
    unreachable = Cli("host=127.0.0.1 port=1 dbname=x user=x").fails("status")
    assert unreachable.startswith("unhealthy: cannot connect to the database:")


def test_redeliver_refuses_a_disabled_webhook(conn: psycopg.Connection, cli: Cli) -> None:
    db.add_webhook(conn, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
    row = conn.execute(
        "INSERT INTO webhooks.delivery (webhook_id, webhook_name, event, state, finished_at) "
        "SELECT id, name, 'create', 'failed', now() FROM webhooks.webhook RETURNING id::text"
    ).fetchone()
    assert row is not None
    db.update_webhook(conn, "w", {"enabled": False})
    assert cli.fails("delivery", "redeliver", row[0]) == (
        f'Error: delivery {row[0]} cannot be redelivered: webhook "w" is disabled (enable it first)'
    )
    assert conn.execute("SELECT state FROM webhooks.delivery").fetchone() == ("failed",)
