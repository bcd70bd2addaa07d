"""The SQL schema: both migration paths, capture triggers, constraints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from dispatcher import db
from dispatcher.cli import main
from dispatcher.pgcluster import find_bindir
from tests.conftest import ROOT, Database, in_threads

BINDIR = find_bindir()


def psql_apply(dsn: str) -> subprocess.CompletedProcess[str]:
    """Apply every migration file the way a DBA would, with psql."""
    assert BINDIR is not None
    out = None
    for f in sorted((ROOT / "sql").glob("*.sql")):
        out = subprocess.run(
            [str(BINDIR / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(f)],
            capture_output=True,
            text=True,
            check=True,
        )
    assert out is not None
    return out


#: Every migration, in order: written out, so a file missing from the
#: checkout or the wheel fails the tests below.
MIGRATIONS = [
    "001_init",
    "002_operations",
    "003_capture",
    "004_dispatch",
    "005_lean_capture",
    "006_quick_turn",
    "007_statement_capture",
    "008_array_checks",
]
VERSIONS = [name[:3] for name in MIGRATIONS]


def schema_dump(dsn: str) -> str:
    assert BINDIR is not None
    out = subprocess.run(
        [str(BINDIR / "pg_dump"), "--schema-only", "--schema=webhooks", "-d", dsn],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # \restrict/\unrestrict carry a random key per dump
    return "\n".join(
        line
        for line in out.splitlines()
        if not line.startswith(("--", "\\restrict", "\\unrestrict"))
    )


def test_cli_migrate_applies_then_reports_nothing_to_do(empty_database: Database) -> None:
    runner = CliRunner()
    first = runner.invoke(main, ["migrate", "--dsn", empty_database.dsn])
    assert first.exit_code == 0, first.output
    assert first.output.split() == [word for name in MIGRATIONS for word in ("applied", name)]
    second = runner.invoke(main, ["migrate", "--dsn", empty_database.dsn])
    assert second.exit_code == 0, second.output
    assert second.output.strip() == f"nothing to do: schema is at version {VERSIONS[-1]}"


def test_psql_and_migrate_give_the_same_schema(pg_server, empty_database: Database) -> None:
    from tests.conftest import create_database, drop_database

    other = create_database(pg_server, None)
    try:
        psql_apply(empty_database.dsn)
        again = psql_apply(empty_database.dsn)  # re-applying is a no-op
        assert "already applied" in again.stderr
        with other.connect() as c:
            assert [m.version for m in db.migrate(c)] == VERSIONS
        assert schema_dump(empty_database.dsn) == schema_dump(other.dsn)
        # The paths mix: after psql, migrate has nothing to do.
        with empty_database.connect() as c:
            assert db.migrate(c) == []
            assert c.execute("SELECT count(*) FROM webhooks.schema_version").fetchone() == (
                len(VERSIONS),
            )
    finally:
        drop_database(other)


def test_concurrent_migrations_do_not_collide(empty_database: Database) -> None:
    reported: list[str] = []

    def run() -> None:
        with empty_database.connect() as c:
            reported.extend(m.version for m in db.migrate(c))

    assert not in_threads(run, 4, 60)
    # each migration is reported applied by exactly one of the four runs
    assert sorted(reported) == VERSIONS
    with empty_database.connect() as c:
        assert c.execute("SELECT version FROM webhooks.schema_version ORDER BY 1").fetchall() == [
            (v,) for v in VERSIONS
        ]


def test_upgrading_to_007_fans_out_the_changes_waiting_in_the_outbox(
    empty_database: Database,
) -> None:
    """Changes captured one row each into the outbox (001-006) and not yet fanned
    out are delivered after the upgrade; new changes get ids above theirs."""
    with empty_database.connect() as c:
        for mig in db.migrations():
            if mig.version <= "006":
                c.execute(mig.text())  # type: ignore[arg-type]
        c.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(c, "t", None)
        db.add_webhook(c, {"name": "w", "payload_url": "http://127.0.0.1:9/"})
        c.execute("INSERT INTO t SELECT g FROM generate_series(1, 3) g")
        waiting = c.execute("SELECT max(id) FROM webhooks.outbox").fetchone()
        assert waiting is not None and waiting[0] is not None
        # 008 then validates its constraints on the deliveries 007 made.
        assert [m.version for m in db.migrate(c)] == VERSIONS[VERSIONS.index("007") :]
        made = c.execute(
            "SELECT d.object_id, d.state, d.id = webhooks.delivery_uuid(o.id, d.webhook_id, "
            "o.changed_at), o.dispatched_at IS NOT NULL FROM webhooks.delivery d "
            "JOIN webhooks.outbox o ON o.id = d.outbox_id ORDER BY o.id"
        ).fetchall()
        assert made == [(i, "pending", True, True) for i in (1, 2, 3)]
        c.execute("INSERT INTO t VALUES (4)")
        (new,) = c.execute("SELECT id FROM webhooks.captured").fetchall()
        assert new[0] > waiting[0]
        assert db.fan_out_outbox(c) == 0


def test_wheel_ships_the_sql_and_migrates_from_another_folder(
    empty_database: Database, tmp_path: Path
) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("danbyte_webhooks-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        assert {f"dispatcher/sql/{name}.sql" for name in MIGRATIONS} <= set(z.namelist())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import dispatcher, sys; assert dispatcher.__file__.startswith(sys.argv[1]), "
        "dispatcher.__file__; from dispatcher.cli import main; "
        "main(['migrate', '--dsn', sys.argv[2]])"
    )
    for expected in ("applied 001_init", "nothing to do"):
        out = subprocess.run(
            [sys.executable, "-c", code, str(site), empty_database.dsn],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout


# ---------------------------------------------------------------------------
# watch / unwatch
# ---------------------------------------------------------------------------


def want_everything(conn: psycopg.Connection) -> None:
    """An enabled webhook for every event: the capture triggers skip events none wants."""
    db.add_webhook(conn, {"name": "everything", "payload_url": "http://127.0.0.1:9/"})


@pytest.fixture
def capturing(conn: psycopg.Connection) -> psycopg.Connection:
    """``conn``, in a database where some webhook wants every change."""
    want_everything(conn)
    return conn


def captured(conn: psycopg.Connection) -> list[dict]:
    """The captured changes, with the object id the fan-out will give each."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT event, object_type, object_id, prechange, postchange, db_user, username, "
            "request_id FROM webhooks.captured ORDER BY id"
        )
        return cur.fetchall()


def test_watch_is_idempotent_and_unwatch_removes(capturing: psycopg.Connection) -> None:
    conn = capturing
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
    assert db.watch(conn, "orders", None) == "public.orders"
    triggers = conn.execute(
        "SELECT oid FROM pg_trigger WHERE tgrelid = 'orders'::regclass ORDER BY oid"
    ).fetchall()
    assert len(triggers) == 3
    db.watch(conn, "orders", None)  # no-op: same triggers
    assert (
        conn.execute(
            "SELECT oid FROM pg_trigger WHERE tgrelid = 'orders'::regclass ORDER BY oid"
        ).fetchall()
        == triggers
    )
    assert db.watched(conn) == [
        {"table_name": "orders", "object_type": "public.orders", "primary_key": ["id"]}
    ]
    db.watch(conn, "orders", "shop.order")  # a new object type replaces the old one
    assert db.watched(conn)[0]["object_type"] == "shop.order"
    assert db.unwatch(conn, "orders") is True
    assert db.watched(conn) == []
    assert db.unwatch(conn, "orders") is False
    conn.execute("INSERT INTO orders VALUES (1, 2)")
    assert captured(conn) == []


def test_watch_rejects_views_and_unknown_tables(conn: psycopg.Connection) -> None:
    from dispatcher.errors import UserError

    conn.execute("CREATE VIEW v AS SELECT 1 AS x")
    with pytest.raises(UserError, match="v is not a table"):
        db.watch(conn, "v", None)
    with pytest.raises(UserError, match='relation "nope" does not exist'):
        db.watch(conn, "nope", None)


def test_outbox_rows_for_int_key(capturing: psycopg.Connection) -> None:
    conn = capturing
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric, note text)")
    db.watch(conn, "orders", None)
    conn.execute("INSERT INTO orders VALUES (1, 9.5, 'a')")
    conn.execute("UPDATE orders SET total = 10 WHERE id = 1")
    conn.execute("UPDATE orders SET total = 10 WHERE id = 1")  # changes nothing
    conn.execute("DELETE FROM orders WHERE id = 1")
    rows = captured(conn)
    new = {"id": 1, "total": 9.5, "note": "a"}
    upd = {"id": 1, "total": 10, "note": "a"}
    assert [
        (r["event"], r["object_type"], r["object_id"], r["prechange"], r["postchange"])
        for r in rows
    ] == [
        ("create", "public.orders", 1, None, new),
        ("update", "public.orders", 1, new, upd),
        ("delete", "public.orders", 1, upd, None),
    ]
    assert {r["db_user"] for r in rows} == {"postgres"}
    assert {r["username"] for r in rows} == {None}


def test_outbox_rows_for_uuid_composite_and_no_key(capturing: psycopg.Connection) -> None:
    conn = capturing
    conn.execute("CREATE TABLE u (id uuid PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE c (a int, b text, v int, PRIMARY KEY (b, a))")
    conn.execute("CREATE TABLE n (v text)")
    for t in ("u", "c", "n"):
        db.watch(conn, t, None)
    conn.execute("INSERT INTO u VALUES ('0b8f6f8e-3f0e-4a55-9d4e-3a3c6f1e2d10', 'x')")
    conn.execute("INSERT INTO c VALUES (1, 'k', 5)")
    conn.execute("UPDATE c SET a = 2")  # the key itself changes
    conn.execute("INSERT INTO n VALUES ('x')")
    conn.execute("DELETE FROM n")
    rows = [(r["event"], r["object_type"], r["object_id"]) for r in captured(conn)]
    assert rows == [
        ("create", "public.u", "0b8f6f8e-3f0e-4a55-9d4e-3a3c6f1e2d10"),
        ("create", "public.c", {"b": "k", "a": 1}),
        ("update", "public.c", {"b": "k", "a": 2}),
        ("create", "public.n", None),
        ("delete", "public.n", None),
    ]


def test_rolled_back_changes_are_not_captured(capturing: psycopg.Connection) -> None:
    conn = capturing
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.watch(conn, "t", None)
    with pytest.raises(ZeroDivisionError), conn.transaction():
        conn.execute("INSERT INTO t VALUES (1)")
        raise ZeroDivisionError
    assert captured(conn) == []
    with conn.transaction():
        conn.execute("INSERT INTO t VALUES (2)")
    assert len(captured(conn)) == 1


def test_multi_row_statements_and_awkward_column_types(capturing: psycopg.Connection) -> None:
    conn = capturing
    conn.execute(
        """
        CREATE TABLE odd (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            j json, p point, x xml, b bytea, f float8, arr int[],
            doubled int GENERATED ALWAYS AS (length(coalesce(j::text, '')) * 2) STORED
        )
        """
    )
    db.watch(conn, "odd", "odd")
    conn.execute(
        "INSERT INTO odd (j, p, x, b, f, arr) SELECT '{\"a\":1}', point(1,2), '<a/>', "
        "'\\x00ff', 'NaN', ARRAY[g] FROM generate_series(1, 100) g"
    )
    conn.execute("UPDATE odd SET p = point(3, 4) WHERE id <= 10")
    conn.execute("UPDATE odd SET j = j WHERE id <= 10")  # json has no '=': no-op still detected
    rows = captured(conn)
    assert [r["event"] for r in rows] == ["create"] * 100 + ["update"] * 10
    first = rows[0]["postchange"]
    assert first["j"] == {"a": 1} and first["p"] == "(1,2)" and first["doubled"] == 14
    assert first["f"] == "NaN" and first["b"] == "\\x00ff"


def test_multi_row_update_pairs_each_old_row_with_its_new_row(
    capturing: psycopg.Connection,
) -> None:
    conn = capturing
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("CREATE TABLE nokey (a int, b text)")
    db.watch(conn, "t", None)
    db.watch(conn, "nokey", None)
    conn.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 2000) g")
    conn.execute("INSERT INTO nokey SELECT g, 'b' || g FROM generate_series(1, 500) g")
    # Over 1,000 rows: captured 1,000 at a time, in order.
    sizes = conn.execute("SELECT changes FROM webhooks.capture ORDER BY id").fetchall()
    assert sizes == [(1000,), (1000,), (500,)]
    keys = [r["object_id"] for r in captured(conn) if r["object_type"] == "public.t"]
    assert keys == list(range(1, 2001))
    conn.execute("TRUNCATE webhooks.capture")
    # the key itself changes, rows are visited in physical order, some stay the same
    conn.execute("UPDATE t SET id = id + 100000, v = v || '!' WHERE id % 3 <> 0")
    conn.execute("UPDATE t SET v = v WHERE id % 3 = 0")  # changes nothing
    conn.execute("UPDATE nokey SET a = -a")
    sizes = conn.execute("SELECT changes FROM webhooks.capture ORDER BY id").fetchall()
    assert sizes == [(1000,), (334,), (1000,), (333,), (500,)]
    rows = captured(conn)
    assert len(rows) == 2000 - 666 + 500
    for r in rows:
        before, after = r["prechange"], r["postchange"]
        assert r["event"] == "update"
        if r["object_type"] == "public.t":
            assert after["id"] == before["id"] + 100000 and after["v"] == before["v"] + "!"
            assert r["object_id"] == after["id"]
        else:
            assert after["a"] == -before["a"] and after["b"] == before["b"]


def test_statements_are_captured_whole_up_to_1000_rows(capturing: psycopg.Connection) -> None:
    conn = capturing
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.watch(conn, "t", None)
    with conn.transaction():  # the rows a transaction changed before do not count
        conn.execute("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
        conn.execute("INSERT INTO t SELECT g FROM generate_series(1001, 2001) g")
        conn.execute("UPDATE t SET id = id WHERE false")  # no row: nothing captured
        conn.execute("DELETE FROM t WHERE id > 1000")
    sizes = conn.execute("SELECT event, changes FROM webhooks.capture ORDER BY id").fetchall()
    assert sizes == [
        ("create", 1000),
        ("create", 1000),
        ("create", 1),
        ("delete", 1000),
        ("delete", 1),
    ]
    assert [r["object_id"] for r in captured(conn)] == list(range(1, 2002)) + list(
        range(1001, 2002)
    )


def test_partitioned_table(capturing: psycopg.Connection) -> None:
    conn = capturing
    conn.execute(
        "CREATE TABLE ev (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)"
    )
    conn.execute("CREATE TABLE ev_eu PARTITION OF ev FOR VALUES IN ('eu')")
    conn.execute("CREATE TABLE ev_us PARTITION OF ev FOR VALUES IN ('us')")
    db.watch(conn, "ev", None)
    conn.execute("INSERT INTO ev VALUES (1, 'eu'), (2, 'us')")
    conn.execute("UPDATE ev SET id = 3 WHERE id = 2")
    conn.execute("UPDATE ev SET region = 'eu' WHERE id = 3")  # moves to another partition
    conn.execute("DELETE FROM ev WHERE id = 1")
    rows = captured(conn)
    assert [(r["event"], r["object_id"]) for r in rows] == [
        ("create", {"id": 1, "region": "eu"}),
        ("create", {"id": 2, "region": "us"}),
        ("update", {"id": 3, "region": "us"}),
        ("update", {"id": 3, "region": "eu"}),
        ("delete", {"id": 1, "region": "eu"}),
    ]
    assert rows[3]["prechange"] == {"id": 3, "region": "us"}


def test_application_role_needs_no_webhooks_privileges(database: Database, make_role) -> None:
    app = make_role("app")
    with database.connect() as c:
        c.execute(
            f"CREATE TABLE orders (id serial PRIMARY KEY, v text); "
            f"GRANT INSERT, UPDATE, DELETE, SELECT ON orders TO {app}; "
            f"GRANT USAGE ON SEQUENCE orders_id_seq TO {app}"
        )
        db.watch(c, "orders", None)
        want_everything(c)
    with database.connect(user=app) as c:
        assert c.execute("SELECT has_schema_privilege('webhooks', 'USAGE')").fetchone() == (False,)
        with c.transaction():
            c.execute("SET LOCAL danbyte.username = 'alice'")
            c.execute("SET LOCAL danbyte.request_id = 'req-1'")
            c.execute("INSERT INTO orders (v) VALUES ('a')")
        c.execute("UPDATE orders SET v = 'b'")
        c.execute("DELETE FROM orders")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM webhooks.outbox")
    with database.connect() as c:
        rows = captured(c)
    assert [(r["event"], r["db_user"], r["username"], r["request_id"]) for r in rows] == [
        ("create", app, "alice", "req-1"),
        ("update", app, None, None),
        ("delete", app, None, None),
    ]


# ---------------------------------------------------------------------------
# Constraints
# ---------------------------------------------------------------------------

BAD = [
    (
        {"triggers": ["create", "explode"]},
        'unknown trigger "explode": use create, update or delete',
    ),
    ({"triggers": []}, "triggers must name at least one of create, update, delete"),
    ({"method": "GET"}, 'unknown method "GET": use POST, PUT or PATCH'),
    ({"object_types": []}, "object_types is empty"),
    ({"payload_url": "ftp://example.com/x"}, "payload_url must be an absolute http:// or https://"),
    ({"payload_url": "https://"}, "payload_url must be an absolute"),
    ({"payload_url": "https://exa mple.com/"}, "payload_url must be an absolute"),
    ({"payload_url": "https://user:pw@example.com/"}, "without spaces or credentials"),
    ({"additional_headers": "NoColonHere"}, 'additional_headers line 1 is not "Name: value"'),
    ({"additional_headers": "A: 1\nBad Name: 2"}, 'line 2: header name "Bad Name" is not a valid'),
    ({"additional_headers": "X-Token: a\rb"}, 'the value of header "X-Token" contains a control'),
    ({"additional_headers": "X-Danbyte-Event: create"}, '"X-Danbyte-Event" is set by Danbyte'),
    ({"additional_headers": "Content-Length: 5"}, '"Content-Length" is set by Danbyte'),
    ({"additional_headers": "host: x"}, '"host" is set by Danbyte'),
    ({"additional_headers": "Transfer-Encoding: chunked"}, "is set by Danbyte"),
    ({"content_type": "json"}, "content_type must be a media type"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_constraints_reject_bad_definitions(conn: psycopg.Connection, change, message) -> None:
    fields = {"name": "w", "payload_url": "https://example.com/hook", **change}
    cols = ", ".join(fields)
    marks = ", ".join(["%s"] * len(fields))
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute(
            f"INSERT INTO webhooks.webhook ({cols}) VALUES ({marks})", list(fields.values())
        )
    assert message in err.value.diag.message_primary
    # header values may carry tokens: never echoed
    assert "a\rb" not in str(err.value)


#: A row for each queue table, but for the column under test.
QUEUE_ROWS = {
    "delivery": {"webhook_id": 1, "webhook_name": "w", "event": "create", "state": "pending"},
    "delivery_attempt": {
        "delivery_id": "00000000-0000-0000-0000-000000000000",
        "attempt": 1,
        "attempted_at": "2026-01-01T00:00:00Z",
        "duration_ms": 1.0,
        "dispatcher": "d",
        "outcome": "failed",
        "request_method": "POST",
        "request_url": "http://127.0.0.1/",
        "request_headers": "{}",
    },
}
QUEUE_VALUES = [
    ("delivery", "event", ["create", "update", "delete", "test"]),
    ("delivery", "state", ["pending", "sending", "succeeded", "failed", "cancelled"]),
    ("delivery_attempt", "outcome", ["succeeded", "failed", "retrying"]),
]


@pytest.mark.parametrize(
    ("table", "column", "allowed"), QUEUE_VALUES, ids=[f"{t}.{c}" for t, c, _ in QUEUE_VALUES]
)
def test_queue_tables_take_only_their_values(
    conn: psycopg.Connection, table: str, column: str, allowed: list[str]
) -> None:
    validated = conn.execute(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s",
        [f"webhooks.{table}", f"{table}_{column}_check"],
    ).fetchone()
    assert validated == (True,)

    def insert(value: str) -> None:
        row = {**QUEUE_ROWS[table], column: value}
        conn.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier("webhooks", table),
                sql.SQL(", ").join(map(sql.Identifier, row)),
                sql.SQL(", ").join(sql.Placeholder() * len(row)),
            ),
            list(row.values()),
        )

    for value in allowed:
        insert(value)
    for value in ("bogus", allowed[0].upper(), allowed[0] + " "):
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            insert(value)


def test_good_definitions_are_accepted(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO webhooks.webhook (name, payload_url, additional_headers, object_types, "
        "triggers, method, content_type) VALUES ('ok', 'http://[::1]:8080/a?b=c#d', "
        "E'Authorization: Bearer x\\nX-Custom_1: v\\tw\\n', '{public.orders}', '{delete}', "
        "'PATCH', 'application/json; charset=utf-8')"
    )
    row = conn.execute("SELECT secret_set, triggers FROM webhooks.webhook_list").fetchone()
    assert row == (False, ["delete"])


def test_json_payload_types(capturing: psycopg.Connection) -> None:
    conn = capturing
    # outbox keeps json (column order preserved)
    conn.execute("CREATE TABLE t (z int PRIMARY KEY, a text)")
    db.watch(conn, "t", None)
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    raw = conn.execute("SELECT postchange::text FROM webhooks.captured").fetchone()
    assert raw is not None and list(json.loads(raw[0])) == ["z", "a"]


def test_events_no_webhook_wants_are_not_captured(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.watch(conn, "t", None)

    def events() -> list[str]:
        found = [r["event"] for r in captured(conn)]
        conn.execute("TRUNCATE webhooks.capture")
        return found

    def refresh() -> int | None:
        row = conn.execute("SELECT webhooks.refresh_wanted()").fetchone()
        return row[0] if row else None

    def write(i: int) -> None:
        conn.execute("INSERT INTO t VALUES (%s, 'a')", (i,))
        conn.execute("UPDATE t SET v = 'b' WHERE id = %s", (i,))
        conn.execute("DELETE FROM t WHERE id = %s", (i,))

    write(1)
    assert events() == []  # no webhook: nothing
    db.add_webhook(
        conn, {"name": "w", "payload_url": "http://127.0.0.1:9/", "triggers": ["create"]}
    )
    write(2)
    assert events() == ["create"]
    db.update_webhook(conn, "w", {"triggers": ["create", "delete"]})
    write(3)
    assert events() == ["create", "delete"]
    # A disabled webhook's events are dropped once the dispatcher refreshes the
    # bits from committed state (fan-out would find no webhook for them anyway).
    db.update_webhook(conn, "w", {"enabled": False})
    assert refresh() == 0
    write(4)
    assert events() == []
    # Enabling raises the bits at once, before the change commits; a refresh
    # waits for that transaction rather than lower them from a state without it.
    with psycopg.connect(conn.info.dsn, autocommit=True) as other:
        with other.transaction():
            other.execute("UPDATE webhooks.webhook SET enabled = true, triggers = '{update}'")
            write(5)
            assert events() == ["update"]
            assert refresh() is None
            write(6)
            assert events() == ["update"]
        assert refresh() == 2
    # A rolled-back enable leaves the bits up only until the next refresh.
    with (
        psycopg.connect(conn.info.dsn, autocommit=True) as other,
        pytest.raises(ZeroDivisionError),
        other.transaction(),
    ):
        other.execute("UPDATE webhooks.webhook SET triggers = '{create,update,delete}'")
        raise ZeroDivisionError
    write(7)
    assert events() == ["create", "update", "delete"]
    assert refresh() == 2
    write(8)
    assert events() == ["update"]
