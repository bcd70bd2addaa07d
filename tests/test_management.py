"""Managing webhooks: CLI commands, plain SQL, roles, write-only secret, change log, tests."""

from __future__ import annotations

import json
import re
import socket

import psycopg
import pytest
from click.testing import CliRunner, Result

from dispatcher import db
from dispatcher.cli import main
from tests.conftest import Database, wait_until
from tests.httpd import Receiver

SECRET = "hunter2-but-longer-and-unique-5f1c"


class Cli:
    """Runs ``danbyte-webhooks`` in-process and keeps everything it printed."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.printed: list[str] = []

    def __call__(self, *args: str, input: str | None = None, dsn: str | None = None) -> Result:
        result = CliRunner().invoke(main, [*args, "--dsn", dsn or self.dsn], input=input)
        self.printed.append(result.output)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    def ok(self, *args: str, input: str | None = None, dsn: str | None = None) -> str:
        result = self(*args, input=input, dsn=dsn)
        assert result.exit_code == 0, result.output
        return result.output

    def fails(self, *args: str, input: str | None = None, code: int = 1) -> str:
        result = self(*args, input=input)
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        return result.output.strip()


@pytest.fixture
def cli(database: Database) -> Cli:
    return Cli(database.dsn)


def test_add_list_show_update_enable_disable_delete(cli: Cli, conn: psycopg.Connection) -> None:
    out = cli.ok(
        "webhook",
        "add",
        "--name",
        "orders",
        "--url",
        "https://example.com/h",
        "--object-type",
        "public.orders",
        "--trigger",
        "create",
        "--trigger",
        "UPDATE",
        "--method",
        "put",
        "--header",
        "Authorization: Bearer t",
        "--header",
        "X-A: 1",
        "--secret-stdin",
        "--no-verify-tls",
        "--timeout",
        "3",
        input=SECRET + "\n",
    )
    assert out.strip() == "created webhook orders"
    row = conn.execute(
        "SELECT object_types, triggers, method, secret, additional_headers, verify_tls, "
        "timeout_seconds, enabled FROM webhooks.webhook"
    ).fetchone()
    assert row == (
        ["public.orders"],
        ["create", "update"],
        "PUT",
        SECRET,
        "Authorization: Bearer t\nX-A: 1",
        False,
        3.0,
        True,
    )

    listing = cli.ok("webhook", "list")
    header, line = listing.strip().splitlines()
    assert header.split() == [
        "NAME",
        "ENABLED",
        "OBJECT",
        "TYPES",
        "TRIGGERS",
        "METHOD",
        "URL",
        "SECRET",
        "LAST",
        "DELIVERY",
    ]
    assert line.split() == [
        "orders",
        "yes",
        "public.orders",
        "create,update",
        "PUT",
        "https://example.com/h",
        "yes",
        "-",
    ]
    (item,) = json.loads(cli.ok("webhook", "list", "--json"))
    assert item["secret_set"] is True and "secret" not in item
    shown = json.loads(cli.ok("webhook", "show", "orders", "--json"))
    assert shown["additional_headers"] == "Authorization: Bearer t\nX-A: 1"
    text = cli.ok("webhook", "show", "orders")
    assert re.search(r"^secret_set +yes$", text, re.M)

    cli.ok(
        "webhook",
        "update",
        "orders",
        "--trigger",
        "delete",
        "--clear-secret",
        "--all-object-types",
        "--new-name",
        "orders2",
    )
    shown = json.loads(cli.ok("webhook", "show", "orders2", "--json"))
    assert (shown["triggers"], shown["secret_set"], shown["object_types"]) == (
        ["delete"],
        False,
        None,
    )
    assert cli.ok("webhook", "disable", "orders2").strip() == "disabled webhook orders2"
    assert json.loads(cli.ok("webhook", "show", "orders2", "--json"))["enabled"] is False
    cli.ok("webhook", "enable", "orders2")
    assert cli.ok("webhook", "delete", "orders2").strip() == "deleted webhook orders2"
    assert json.loads(cli.ok("webhook", "list", "--json")) == []
    assert all(SECRET not in p for p in cli.printed)


def test_generate_secret_prints_it_exactly_once(cli: Cli, conn: psycopg.Connection) -> None:
    out = cli.ok(
        "webhook", "add", "--name", "g", "--url", "http://127.0.0.1:9/x", "--generate-secret"
    )
    (secret,) = conn.execute("SELECT secret FROM webhooks.webhook").fetchone()
    assert out.count(secret) == 1 and len(secret) >= 40
    for args in (
        ["webhook", "list"],
        ["webhook", "show", "g"],
        ["webhook", "list", "--json"],
        ["webhook", "show", "g", "--json"],
        ["changelog"],
        ["changelog", "--json"],
    ):
        assert secret not in cli.ok(*args)


def test_error_paths_are_one_line_with_exit_codes(cli: Cli) -> None:
    cli.ok("webhook", "add", "--name", "w", "--url", "https://example.com/")
    cases = [
        (
            ["webhook", "add", "--name", "w", "--url", "https://example.com/"],
            "Error: a webhook with this name already exists: choose another name",
            1,
        ),
        (["webhook", "show", "nope"], "Error: no webhook named 'nope'", 1),
        (["webhook", "update", "nope", "--method", "POST"], "Error: no webhook named 'nope'", 1),
        (["webhook", "delete", "nope"], "Error: no webhook named 'nope'", 1),
        (["webhook", "enable", "nope"], "Error: no webhook named 'nope'", 1),
        (["webhook", "test", "nope"], "Error: no webhook named 'nope'", 1),
        (
            ["webhook", "add", "--name", "x", "--url", "ftp://example.com/"],
            "Error: payload_url must be an absolute http:// or https:// URL such as "
            "https://example.com/hooks, without spaces or credentials",
            1,
        ),
        (
            ["webhook", "add", "--name", "x"],
            "Error: --url is required: the payload URL to send deliveries to",
            1,
        ),
        (
            ["webhook", "add", "--name", "x", "--url", "https://e.com/", "--header", "NoColon"],
            'Error: --header #1 is not "Name: value"',
            1,
        ),
        (
            ["webhook", "add", "--name", "x", "--url", "https://e.com/", "--header", "X-T: a\rb"],
            'Error: additional_headers line 1: the value of header "X-T" contains a control '
            "character (CR, LF or similar)",
            1,
        ),
        (
            [
                "webhook",
                "add",
                "--name",
                "x",
                "--url",
                "https://e.com/",
                "--header",
                "X-Danbyte-Delivery: 1",
            ],
            'Error: additional_headers line 1: header "X-Danbyte-Delivery" is set by Danbyte '
            "Webhooks itself and cannot be overridden",
            1,
        ),
        (
            ["webhook", "add", "--name", "x", "--url", "https://e.com/", "--header", "Host: a"],
            'Error: additional_headers line 1: header "Host" is set by Danbyte Webhooks itself '
            "and cannot be overridden",
            1,
        ),
        (
            ["webhook", "update", "w"],
            "Error: nothing to change: give at least one option to update",
            1,
        ),
        (
            ["webhook", "update", "w", "--object-type", "a", "--all-object-types"],
            "Error: use either --object-type or --all-object-types, not both",
            1,
        ),
    ]
    for args, message, code in cases:
        assert cli.fails(*args, code=code) == message, args
    method = cli.fails(
        "webhook", "add", "--name", "x", "--url", "https://e.com/", "--method", "GET", code=2
    )
    assert "Error: Invalid value for '--method': 'GET' is not one of" in method
    trigger = cli.fails(
        "webhook", "add", "--name", "x", "--url", "https://e.com/", "--trigger", "explode", code=2
    )
    assert "Invalid value for '--trigger'" in trigger


def test_unreachable_database_and_missing_schema(empty_database: Database) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Cli(f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=3")
    out = cli.fails("webhook", "list")
    assert out.startswith("Error: cannot connect to the database: ") and "\n" not in out
    assert "Connection refused" in out
    cli = Cli(empty_database.dsn)
    assert cli.fails("webhook", "list") == (
        "Error: the webhooks schema is not installed in this database: run "
        "`danbyte-webhooks migrate`"
    )
    # A schema behind this version: the dispatcher and the commands refuse it.
    *older, newest = db.migrations()
    with empty_database.connect() as c:
        for mig in older:
            c.execute(mig.text())  # type: ignore[arg-type]
    for args in (("webhook", "list"), ("run",)):
        assert cli.fails(*args) == (
            f"Error: the webhooks schema is at version {older[-1].version} but this "
            f"danbyte-webhooks needs {newest.version}: run `danbyte-webhooks migrate`"
        )


def test_watch_commands(cli: Cli, conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    assert cli.ok("watch", "items", "--object-type", "shop.item").strip() == (
        "watching items as object type shop.item"
    )
    assert json.loads(cli.ok("watched", "--json")) == [
        {"table_name": "items", "object_type": "shop.item", "primary_key": ["id"]}
    ]
    assert "shop.item" in cli.ok("watched")
    assert cli.ok("unwatch", "items").strip() == "stopped watching items"
    assert cli.ok("unwatch", "items").strip() == "items was not watched"
    assert cli.fails("watch", "nosuch") == 'Error: relation "nosuch" does not exist'


def test_changelog_records_sql_and_cli_edits_without_the_secret(
    cli: Cli, conn: psycopg.Connection
) -> None:
    cli.ok(
        "webhook", "add", "--name", "w", "--url", "https://e.com/", "--secret-stdin", input=SECRET
    )
    with conn.transaction():
        conn.execute("SET LOCAL danbyte.username = 'alice'")
        conn.execute("UPDATE webhooks.webhook SET method = 'PATCH', secret = 'other-secret-xyz'")
    conn.execute("UPDATE webhooks.webhook SET method = 'PATCH'")  # no change: no entry
    conn.execute("DELETE FROM webhooks.webhook")
    rows = db.changelog(conn)
    assert [(r["action"], r["username"], r["secret_changed"]) for r in rows] == [
        ("delete", None, True),
        ("update", "alice", True),
        ("create", None, True),
    ]
    create = rows[-1]
    assert create["before"] is None and create["after"]["secret_set"] is True
    assert "secret" not in create["after"]
    assert rows[1]["before"]["method"] == "POST" and rows[1]["after"]["method"] == "PATCH"
    dump = conn.execute("SELECT string_agg(c::text, ' ') FROM webhooks.changelog c").fetchone()
    assert dump is not None and SECRET not in dump[0] and "other-secret-xyz" not in dump[0]
    text = cli.ok("changelog", "--webhook", "w")
    assert "method, secret" in text and "postgres (alice)" in text
    assert len(json.loads(cli.ok("changelog", "--json", "--limit", "2"))) == 2


def test_integrations_member_can_manage_but_not_read_the_secret(
    database: Database, make_role
) -> None:
    alice = make_role("alice", ("danbyte_integrations",))
    with database.connect(user=alice) as c:
        assert c.execute(
            "SELECT has_column_privilege('webhooks.webhook', 'secret', 'SELECT'), "
            "has_column_privilege('webhooks.webhook', 'secret', 'UPDATE'), "
            "has_column_privilege('webhooks.webhook', 'secret', 'INSERT')"
        ).fetchone() == (False, True, True)
        c.execute(
            "INSERT INTO webhooks.webhook (name, payload_url, secret) "
            "VALUES ('w', 'https://e.com/', %s)",
            (SECRET,),
        )
        c.execute("UPDATE webhooks.webhook SET secret = 'new-secret-value' WHERE name = 'w'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT secret FROM webhooks.webhook")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM webhooks.webhook")
        assert c.execute("SELECT name, secret_set FROM webhooks.webhook_list").fetchall() == [
            ("w", True)
        ]
        assert len(c.execute("SELECT * FROM webhooks.changelog").fetchall()) == 2
        c.execute("SELECT * FROM webhooks.delivery_log")
        delivery = c.execute("SELECT webhooks.send_test('w')").fetchone()
        assert delivery is not None
        for forbidden in (
            "DELETE FROM webhooks.changelog",
            "UPDATE webhooks.changelog SET action = 'x'",
            "SELECT * FROM webhooks.outbox",
            "SELECT secret FROM webhooks.job",  # what the dispatcher sends, secret included
            "SELECT webhooks.dispatch_turn('me', '[]', '[]', 0, 0, 1, '{}', '{}', '{}', 1, 1, 1)",
            "SELECT webhooks.watch('pg_class')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), c.transaction():
                c.execute(forbidden)
        c.execute("DELETE FROM webhooks.webhook WHERE name = 'w'")
    cli = Cli(database.dsn_as(alice))
    cli.ok(
        "webhook",
        "add",
        "--name",
        "via-cli",
        "--url",
        "https://e.com/",
        "--secret-stdin",
        input=SECRET,
    )
    assert "via-cli" in cli.ok("webhook", "list")
    assert all(SECRET not in p for p in cli.printed)


def test_plain_role_gets_nothing(database: Database, make_role) -> None:
    bob = make_role("bob")
    with database.connect(user=bob) as c:
        assert c.execute("SELECT has_schema_privilege('webhooks', 'USAGE')").fetchone() == (False,)
        for stmt in (
            "SELECT * FROM webhooks.webhook_list",
            "SELECT webhooks.send_test('w')",
            "INSERT INTO webhooks.webhook (name, payload_url) VALUES ('x', 'http://a/')",
            "SELECT * FROM webhooks.changelog",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), c.transaction():
                c.execute(stmt)
    out = Cli(database.dsn_as(bob)).fails("webhook", "list")
    assert out == (
        "Error: permission denied for schema webhooks: this needs membership in "
        "danbyte_integrations (GRANT danbyte_integrations TO <role>)"
    )


def test_dispatcher_role_runs_the_daemon_and_reads_secrets(
    database: Database, make_role, receiver: Receiver, daemon
) -> None:
    disp = make_role("disp", ("danbyte_dispatcher",))
    integ = make_role("integ", ("danbyte_integrations",))
    with database.connect() as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY)")
        db.watch(c, "t", None)
        db.add_webhook(c, {"name": "w", "payload_url": receiver.url("/w"), "secret": SECRET})
    with database.connect(user=disp) as c:
        assert c.execute("SELECT secret FROM webhooks.webhook").fetchone() == (SECRET,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM webhooks.webhook")
    daemon(dsn=database.dsn_as(disp))
    with database.connect() as c:
        c.execute("INSERT INTO t VALUES (1)")
    (req,) = receiver.wait_for(1)
    assert req.headers["X-Danbyte-Event"] == "create"
    # An Integrations member's `webhook test` is queued for the running daemon.
    out = Cli(database.dsn_as(integ)).ok("webhook", "test", "w")
    assert "queued test delivery" in out and "ok: HTTP 200" in out
    assert receiver.requests[-1].headers["X-Danbyte-Event"] == "test"


def test_hostile_role_cannot_hijack_security_definer_functions(
    database: Database, make_role
) -> None:
    evil = make_role("evil", ("danbyte_integrations",))
    with database.connect() as c:
        c.execute(
            f"CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE t2 (a int, b int, v int, "
            f"PRIMARY KEY (a, b)); GRANT INSERT, UPDATE, DELETE, SELECT ON t, t2 TO {evil}; "
            f"CREATE SCHEMA evil AUTHORIZATION {evil}"
        )
        db.watch(c, "t", None)
        db.watch(c, "t2", None)
        db.register_dispatcher(c, "d", "h", 1, "v")
        db.heartbeat(c, "d", idle=True)  # so the trigger reaches pg_notify
        # So that the trigger captures every event.
        db.add_webhook(c, {"name": "everything", "payload_url": "http://a/"})
    with database.connect(user=evil) as c:
        for fn, args in [
            ("to_json", "anyelement"),
            ("clock_timestamp", ""),
            ("current_setting", "text, boolean"),
            ("pg_notify", "text, text"),
            ("now", ""),
            ("nullif", "text, text"),
            ("unnest", "anyarray"),
            ("json_object_agg", "text, json"),
            ("row_number", ""),
            ("pg_sequence_last_value", "regclass"),
            ("date_part", "text, timestamptz"),
        ]:
            c.execute(
                f"CREATE FUNCTION evil.{fn}({args}) RETURNS text LANGUAGE plpgsql AS "
                "$$BEGIN RAISE EXCEPTION 'hijacked'; END$$"
            )
        # The capture trigger has no SET search_path (for speed): it must name
        # every operator and type it uses with its schema.
        traps = {
            "=": [("text", "text"), ("integer", "integer"), ("bigint", "bigint")],
            "<>": [("text", "text")],
            ">": [("bigint", "integer"), ("timestamptz", "timestamptz")],
            "->": [("json", "text")],
            "&": [("bigint", "bigint")],
            "-": [("timestamptz", "interval")],
        }
        for i, (op, signatures) in enumerate(traps.items()):
            for j, (left, right) in enumerate(signatures):
                fn = f"evil.trap_{i}_{j}"
                c.execute(
                    f"CREATE FUNCTION {fn}({left}, {right}) RETURNS boolean LANGUAGE plpgsql "
                    "AS $$BEGIN RAISE EXCEPTION 'hijacked'; END$$"
                )
                c.execute(
                    f"CREATE OPERATOR evil.{op} (LEFTARG = {left}, RIGHTARG = {right}, "
                    f"FUNCTION = {fn})"
                )
        for t in ("text", "int8", "timestamptz"):
            c.execute(f"CREATE DOMAIN pg_temp.{t} AS pg_catalog.{t} CHECK (false)")
        c.execute("CREATE TEMP TABLE outbox (x int)")
        c.execute("CREATE TEMP TABLE capture (x int)")
        c.execute("CREATE TEMP TABLE dispatcher (idle boolean)")
        c.execute("SET search_path = evil, pg_temp, pg_catalog")
        # The traps are live: unqualified names reach them.
        for trap in ("SELECT 'a'::pg_catalog.text = 'a'", "SELECT '{}'::json -> 'k'"):
            with pytest.raises(psycopg.errors.RaiseException, match="hijacked"):
                c.execute(trap)
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("SELECT 'a'::text")
        c.execute("INSERT INTO public.t VALUES (1)")
        c.execute("UPDATE public.t SET id = 2")
        c.execute("DELETE FROM public.t")
        c.execute("INSERT INTO public.t2 VALUES (1, 2, 0)")
        c.execute("UPDATE public.t2 SET v = 1")
        c.execute("DELETE FROM public.t2")
        c.execute("INSERT INTO webhooks.webhook (name, payload_url) VALUES ('w', 'http://a/')")
        c.execute("SELECT webhooks.send_test('w')")
        c.execute("UPDATE webhooks.webhook SET enabled = false")
    with database.connect() as c:
        assert c.execute("SELECT count(*) FROM webhooks.captured").fetchone() == (6,)
        assert c.execute("SELECT count(*) FROM webhooks.changelog").fetchone() == (4,)


def test_webhook_test_command(cli: Cli, conn, receiver: Receiver, tls_receiver: Receiver) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    hooks = {
        "ok": receiver.url("/status/204"),
        "e500": receiver.url("/status/500"),
        "refused": f"http://127.0.0.1:{dead}/",
        "tls": tls_receiver.url("/t"),
    }
    for name, url in hooks.items():
        db.add_webhook(
            conn,
            {
                "name": name,
                "payload_url": url,
                "secret": SECRET,
                "additional_headers": "X-Env: test",
            },
        )
    out = cli.ok("webhook", "test", "ok")
    assert out.startswith("ok: HTTP 204 in ") and " ms (delivery " in out
    (req,) = receiver.wait_for(1)
    assert req.headers["X-Danbyte-Event"] == "test" and req.headers["X-Env"] == "test"
    from dispatcher import verify_signature

    assert verify_signature(req.body, req.headers["X-Danbyte-Signature"], SECRET)
    assert req.json()["event"] == "test"
    assert cli.fails("webhook", "test", "e500").startswith("failed: HTTP 500 after ")
    assert cli.fails("webhook", "test", "refused").startswith("failed: connection refused after ")
    assert cli.fails("webhook", "test", "tls").startswith(
        "failed: TLS error: certificate verify failed: self-signed certificate"
    )
    db.update_webhook(conn, "tls", {"verify_tls": False})
    assert cli.ok("webhook", "test", "tls").startswith("ok: HTTP 200")
    log = conn.execute(
        "SELECT webhook_name, is_test, outcome, status_code FROM webhooks.delivery_log "
        "ORDER BY attempted_at"
    ).fetchall()
    assert log == [
        ("ok", True, "succeeded", 204),
        ("e500", True, "failed", 500),
        ("refused", True, "failed", None),
        ("tls", True, "failed", None),
        ("tls", True, "succeeded", 200),
    ]
    assert all(SECRET not in p for p in cli.printed)


def test_send_test_sql_function_is_picked_up_by_the_daemon(
    conn, receiver: Receiver, daemon
) -> None:
    db.add_webhook(conn, {"name": "w", "payload_url": receiver.url("/w"), "enabled": False})
    daemon()
    (delivery_id,) = conn.execute("SELECT webhooks.send_test('w')::text").fetchone()
    (req,) = receiver.wait_for(1)
    assert req.headers["X-Danbyte-Delivery"] == delivery_id
    wait_until(
        lambda: (
            conn.execute(
                "SELECT outcome FROM webhooks.delivery_log WHERE delivery_id = %s", (delivery_id,)
            ).fetchone()
            == ("succeeded",)
        )
    )
    with pytest.raises(psycopg.errors.NoDataFound, match='no webhook named "nope"'):
        conn.execute("SELECT webhooks.send_test('nope')")
