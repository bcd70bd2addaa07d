"""Everything that talks SQL: migrations, the dispatcher's queue, management.

Functions take an open psycopg connection. Unless a function says otherwise,
the connection is in autocommit mode and each function is one transaction.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from dispatcher.delivery import Job, Outcome
from dispatcher.errors import UserError
from dispatcher.retry import Decision

CHANNEL = "danbyte_webhooks"
MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


# --------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    """A database error's text on one line (libpq spreads its reasons over several)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def connect(dsn: str, *, application_name: str = "danbyte-webhooks") -> psycopg.Connection:
    """An autocommit connection with UTC timestamps and TCP keepalives.

    Raises :class:`UserError` with the server's reason if it cannot connect.
    """
    try:
        return psycopg.connect(
            dsn,
            autocommit=True,
            application_name=application_name,
            # UTC timestamps in payloads; no JIT: these are short OLTP queries whose
            # row estimates can look big enough to pay 50+ ms of compiling each time.
            options="-c TimeZone=UTC -c jit=off",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        raise UserError(f"cannot connect to the database: {one_line(exc)}") from None


# --------------------------------------------------------------------------
# Migrations
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Traversable | Path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


def sql_dir() -> Traversable | Path:
    """The migration files: ``dispatcher/sql`` in a wheel, ``sql/`` in a checkout."""
    packaged = resources.files("dispatcher") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def migrations() -> list[Migration]:
    """All migration files, in the order they apply."""
    found = []
    for entry in sql_dir().iterdir():
        m = MIGRATION_NAME.match(entry.name)
        if m:
            found.append(Migration(m.group(1), m.group(2), entry))
    return sorted(found, key=lambda mig: mig.version)


def applied_versions(conn: psycopg.Connection) -> set[str]:
    """Versions recorded in ``webhooks.schema_version`` (empty before the first migration)."""
    exists = conn.execute("SELECT to_regclass('webhooks.schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM webhooks.schema_version")}


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply the migrations not applied yet; return those applied.

    Each file is its own transaction (BEGIN ... COMMIT inside the file) and
    takes an advisory lock, so concurrent runs wait for each other and the
    second one finds nothing to do.
    """
    done = applied_versions(conn)
    applied = []
    notices: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        notices.append(diag.message_primary or "")

    conn.add_notice_handler(collect)
    try:
        for mig in migrations():
            if mig.version in done:
                continue
            notices.clear()
            # No parameters: psycopg sends the file with the simple query
            # protocol, which runs its several statements in order.
            conn.execute(mig.text())  # type: ignore[arg-type]
            # A run that waited on the lock for another one finds the version
            # recorded and says so in a notice: it applied nothing.
            if not any("already applied" in n for n in notices):
                applied.append(mig)
    finally:
        conn.remove_notice_handler(collect)
    return applied


def schema_version(conn: psycopg.Connection) -> str | None:
    """The newest applied migration version, or None."""
    versions = applied_versions(conn)
    return max(versions) if versions else None


def require_schema(conn: psycopg.Connection) -> None:
    """Raise :class:`UserError` unless every migration of this version has been applied."""
    with friendly_errors():
        versions = applied_versions(conn)
    if not versions:
        raise UserError(
            "the webhooks schema is not installed in this database: run `danbyte-webhooks migrate`"
        )
    latest = migrations()[-1].version
    if max(versions) < latest:
        raise UserError(
            f"the webhooks schema is at version {max(versions)} but this danbyte-webhooks needs "
            f"{latest}: run `danbyte-webhooks migrate`"
        )


# --------------------------------------------------------------------------
# The dispatcher's queue
# --------------------------------------------------------------------------


def register_dispatcher(
    conn: psycopg.Connection, ident: str, host: str, pid: int, version: str
) -> None:
    conn.execute(
        "INSERT INTO webhooks.dispatcher (id, host, pid, version) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (id) DO UPDATE SET seen_at = now(), idle = false",
        (ident, host, pid, version),
    )


def heartbeat(conn: psycopg.Connection, ident: str, idle: bool) -> None:
    """Record that dispatcher ``ident`` is alive, and whether it waits for a NOTIFY."""
    cur = conn.execute(
        "UPDATE webhooks.dispatcher SET seen_at = now(), idle = %s WHERE id = %s", (idle, ident)
    )
    if cur.rowcount == 0:  # removed as stale while we were disconnected
        conn.execute(
            "INSERT INTO webhooks.dispatcher (id, host, pid, version, idle) "
            "VALUES (%s, '', 0, '', %s) ON CONFLICT (id) DO NOTHING",
            (ident, idle),
        )


def refresh_wanted(conn: psycopg.Connection) -> None:
    """Let the capture triggers skip events that no enabled webhook wants any more.

    Enabling a webhook tells the triggers at once; disabling, deleting or
    narrowing one only takes effect here, from committed state (migration 005).
    """
    conn.execute("SELECT webhooks.refresh_wanted()")


def fan_out_outbox(conn: psycopg.Connection) -> int:
    """Fan out changes that the capture function of migrations 001-006 left in the outbox
    (migration 007): into pending deliveries. Return how many were taken."""
    row = conn.execute("SELECT webhooks.fan_out_outbox()").fetchone()
    return int(row[0]) if row else 0


def unregister_dispatcher(conn: psycopg.Connection, ident: str) -> None:
    conn.execute("DELETE FROM webhooks.dispatcher WHERE id = %s", (ident,))


def forget_stale_dispatchers(conn: psycopg.Connection, older_than: float) -> int:
    cur = conn.execute(
        "DELETE FROM webhooks.dispatcher WHERE seen_at < now() - %s * interval '1 second'",
        (older_than,),
    )
    return cur.rowcount


def notify_probe(conn: psycopg.Connection, payload: str) -> None:
    """Send a notification that only dispatchers care about (listener self-check)."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def expire_leases(conn: psycopg.Connection) -> int:
    """Put deliveries whose lease ran out (their dispatcher died) back in the queue.

    Deliveries of webhooks deleted or disabled meanwhile are cancelled instead.
    """
    cur = conn.execute(
        """
        UPDATE webhooks.delivery d
           SET state = CASE WHEN d.is_test OR coalesce(w.enabled, false) THEN 'pending'
                            ELSE 'cancelled' END,
               finished_at = CASE WHEN d.is_test OR coalesce(w.enabled, false) THEN NULL
                                  ELSE now() END,
               claimed_by = NULL, lease_until = NULL
          FROM webhooks.delivery x
          LEFT JOIN webhooks.webhook w ON w.id = x.webhook_id
         WHERE x.id = d.id AND x.state = 'sending' AND x.lease_until < now()
        """
    )
    return cur.rowcount


#: A lease outlives the request timeout by at least this many seconds.
LEASE_SLACK = 5.0
#: A claimed job is not started later than this long before its lease would
#: end with the request still running (clock steps, slow round trips).
LEASE_MARGIN = 2.0


def lease_seconds(lease: float, timeout: float) -> float:
    """How long a claim lasts: ``lease``, but at least ``timeout`` plus :data:`LEASE_SLACK`."""
    return max(lease, timeout + LEASE_SLACK)


def _job(
    row: dict[str, Any],
    default_timeout: float,
    claimed_at: float | None = None,
    lease: float = 0.0,
) -> Job:
    """The job for a row of ``webhooks.job`` (as JSON); ``claimed_at``
    (``time.monotonic()`` no later than the claim) and ``lease`` set the time
    it must start by."""
    timeout = row["timeout_seconds"] or default_timeout
    send_by = math.inf
    if claimed_at is not None:
        # Start early enough for the request to end within the lease.
        send_by = claimed_at + lease_seconds(lease, timeout) - timeout - LEASE_MARGIN
    return Job(
        delivery_id=row["delivery_id"],
        webhook_id=row["webhook_id"],
        webhook_name=row["webhook_name"],
        event=row["event"],
        object_type=row["object_type"],
        object_id=row["object_id"],
        is_test=row["is_test"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        method=row["method"],
        url=row["payload_url"],
        content_type=row["content_type"],
        secret=row["secret"],
        additional_headers=row["additional_headers"],
        verify_tls=row["verify_tls"],
        timeout=timeout,
        retry_on_4xx=row["retry_on_4xx"],
        body=row["body"].encode(),
        send_by=send_by,
    )


def _result(outcome: Outcome, decision: Decision) -> dict[str, Any]:
    """One result as ``webhooks.dispatch_turn()`` reads it."""
    job = outcome.job
    return {
        "id": job.delivery_id,
        "attempt": job.attempt,
        "outcome": "retrying" if decision.state == "pending" else decision.state,
        "state": decision.state,
        "retry_in": decision.retry_in,
        "status": outcome.status_code,
        "error": outcome.error,
        "duration_ms": outcome.duration_ms,
        "attempted_at": outcome.attempted_at.isoformat(),
        "method": job.method,
        "url": job.url,
        "req_headers": outcome.request_headers,
        "resp_headers": outcome.response_headers,
        "resp_body": outcome.response_body,
    }


# One statement, so one round trip and one implicit transaction. Results go in
# and jobs come out as JSON: one json.dumps and one json.loads, both in C,
# instead of a parameter or a column decoded at a time in Python.
TURN = """
SELECT webhooks.dispatch_turn(
    %(me)s, %(results)s::jsonb, %(disable)s::jsonb, %(fan_out_limit)s, %(claim_limit)s,
    %(per_webhook)s,
    %(full)s::bigint[], %(busy_ids)s::bigint[], %(busy_room)s::int[],
    %(lease)s, %(timeout)s, %(slack)s)
"""


@dataclass
class Cycle:
    """What one :func:`cycle` found: changes fanned out, whether there may be
    more, and the jobs claimed."""

    changes: int
    more: bool | None
    jobs: list[Job]


def cycle(
    conn: psycopg.Connection,
    *,
    me: str,
    results: Sequence[tuple[Outcome, Decision]] = (),
    fan_out_limit: int = 0,
    claim_limit: int = 0,
    per_webhook: int = 1,
    room: Mapping[int, int] | None = None,
    lease: float = 0.0,
    default_timeout: float = 10.0,
) -> Cycle:
    """One dispatcher turn, in one transaction and one round trip (each step
    skipped when it has nothing to do):

    1. record ``results`` (attempts, new states; a 410 disables its webhook).
       A delivery whose lease another dispatcher took over keeps its state,
       but the attempt is still logged: it happened;
    2. lease up to ``claim_limit`` due deliveries to ``me``, at most
       ``room[w]`` for each webhook ``w`` listed there (none if it is 0 or
       less) and ``per_webhook`` for any other, for ``lease`` seconds (at
       least the request timeout plus :data:`LEASE_SLACK`);
    3. turn up to ``fan_out_limit`` captured changes into deliveries, one per
       matching webhook (a change matching none is deleted), leasing at once
       those that the room left after step 2 allows. When it claims, no more
       changes than step 2 left room for: ``more`` says it found as many as
       it looked for, so there may be others (None: no room was left, so it
       did not look).

    Jobs carry the time they must start by. The turn commits without waiting
    for its WAL flush: what a server crash takes back is done again under
    the same delivery ids.
    """
    room = room or {}
    full = [w for w, n in room.items() if n <= 0]
    busy = [(w, n) for w, n in room.items() if n > 0 and n != per_webhook]
    started = time.monotonic()  # no later than the server's now() that starts the leases
    row = conn.execute(
        TURN,
        {
            "me": me,
            "results": json.dumps([_result(o, d) for o, d in results]),
            "disable": json.dumps(
                [
                    {"webhook_id": o.job.webhook_id, "reason": d.disable_reason}
                    for o, d in results
                    if d.disable_reason
                ]
            ),
            "fan_out_limit": fan_out_limit,
            "claim_limit": claim_limit,
            "per_webhook": per_webhook,
            "full": full,
            "busy_ids": [w for w, _ in busy],
            "busy_room": [r for _, r in busy],
            "lease": lease,
            "timeout": default_timeout,
            "slack": LEASE_SLACK,
        },
    ).fetchone()
    assert row is not None
    turn = row[0]
    return Cycle(
        turn["changes"],
        turn["more"],
        [_job(r, default_timeout, started, lease) for r in turn["jobs"]],
    )


def fan_out(conn: psycopg.Connection, limit: int) -> int:
    """Turn up to ``limit`` captured changes into deliveries (step 3 of :func:`cycle`, leasing
    none); return how many were taken."""
    return cycle(conn, me="", fan_out_limit=limit).changes


def record_outcomes(
    conn: psycopg.Connection, me: str, results: Sequence[tuple[Outcome, Decision]]
) -> None:
    """Write attempts and the deliveries' new states (step 1 of :func:`cycle`)."""
    if results:
        cycle(conn, me=me, results=results)


def release(conn: psycopg.Connection, me: str, delivery_ids: Iterable[str]) -> int:
    """Give back leased deliveries that were never sent (warm shutdown)."""
    ids = list(delivery_ids)
    if not ids:
        return 0
    cur = conn.execute(
        "UPDATE webhooks.delivery SET state = 'pending', claimed_by = NULL, lease_until = NULL "
        "WHERE id = ANY(%s::uuid[]) AND state = 'sending' AND claimed_by = %s",
        (ids, me),
    )
    return cur.rowcount


def begin_test(conn: psycopg.Connection, name: str, me: str, default_timeout: float) -> Job:
    """Create a test delivery for webhook ``name``, leased to ``me``, and return its job.

    Needs a role that can read the webhook's secret (owner or danbyte_dispatcher).
    """
    with conn.transaction():
        row = conn.execute("SELECT id FROM webhooks.webhook WHERE name = %s", (name,)).fetchone()
        if row is None:
            raise UserError(f"no webhook named {name!r}")
        created = conn.execute(
            """
            INSERT INTO webhooks.delivery (webhook_id, webhook_name, event, object_type, is_test,
                                           state, claimed_by, lease_until)
            VALUES (%s, %s, 'test', 'danbyte.test', true, 'sending', %s,
                    now() + interval '10 minutes')
            RETURNING id::text
            """,
            (row[0], name, me),
        ).fetchone()
        assert created is not None
        delivery_id = created[0]
    return fetch_job(conn, delivery_id, default_timeout)


def fetch_job(conn: psycopg.Connection, delivery_id: str, default_timeout: float) -> Job:
    """The job for a delivery by id (whatever its state)."""
    row = conn.execute(
        "SELECT row_to_json(j) FROM webhooks.job j WHERE j.delivery_id = %s", (delivery_id,)
    ).fetchone()
    if row is None:
        raise UserError(f"no delivery {delivery_id}")
    return _job(row[0], default_timeout)


# --------------------------------------------------------------------------
# Management (webhooks, watched tables, change log)
# --------------------------------------------------------------------------

#: Columns a person may set on a webhook.
WEBHOOK_FIELDS = (
    "name",
    "enabled",
    "object_types",
    "triggers",
    "method",
    "payload_url",
    "content_type",
    "secret",
    "additional_headers",
    "verify_tls",
    "timeout_seconds",
    "max_attempts",
    "retry_on_4xx",
)

_CONSTRAINT_MESSAGES = {
    "webhook_name_unique": "a webhook with this name already exists: choose another name",
    "webhook_name_not_blank": "the name must not be blank and at most 200 characters",
    "webhook_secret_not_empty": "the secret must not be empty (clear it instead)",
    "webhook_timeout_range": "the timeout must be more than 0 and at most 300 seconds",
    "webhook_max_attempts_range": "max attempts must be between 1 and 50",
}


class friendly_errors:
    """Turn database refusals of user input into :class:`UserError` sentences."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or not isinstance(exc, psycopg.DatabaseError):
            return False
        # Lost connections, shutdowns and resource exhaustion are not the
        # user's input; other refusals (class 55 included) are.
        if isinstance(exc, psycopg.OperationalError) and (
            exc.sqlstate is None or exc.sqlstate[:2] in ("08", "53", "57", "58")
        ):
            return False
        diag = exc.diag
        message = diag.message_primary or one_line(exc)
        if diag.constraint_name in _CONSTRAINT_MESSAGES:
            message = _CONSTRAINT_MESSAGES[diag.constraint_name]
        elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
            message = (
                f"{message}: this needs membership in danbyte_integrations "
                "(GRANT danbyte_integrations TO <role>)"
                if "permission denied" in message
                else message
            )
        raise UserError(message) from None


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - set(WEBHOOK_FIELDS)
    if unknown:
        raise ValueError(f"not webhook fields: {sorted(unknown)}")


def _assignments(fields: dict[str, Any]) -> sql.Composed:
    _check_fields(fields)
    return sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in fields
    )


def add_webhook(conn: psycopg.Connection, fields: dict[str, Any]) -> int:
    """Insert a webhook; return its id. Constraint failures become :class:`UserError`."""
    _check_fields(fields)
    query = sql.SQL("INSERT INTO webhooks.webhook ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(sql.Identifier(k) for k in fields),
        sql.SQL(", ").join(sql.Placeholder(k) for k in fields),
    )
    with friendly_errors():
        row = conn.execute(query, fields).fetchone()
    assert row is not None
    return int(row[0])


def update_webhook(conn: psycopg.Connection, name: str, fields: dict[str, Any]) -> None:
    """Change some fields of webhook ``name``."""
    if not fields:
        raise UserError("nothing to change: give at least one option to update")
    query = sql.SQL("UPDATE webhooks.webhook SET {} WHERE name = {}").format(
        _assignments(fields), sql.Placeholder("_name")
    )
    with friendly_errors():
        cur = conn.execute(query, {**fields, "_name": name})
    if cur.rowcount == 0:
        raise UserError(f"no webhook named {name!r}")


def delete_webhook(conn: psycopg.Connection, name: str) -> None:
    with friendly_errors():
        cur = conn.execute("DELETE FROM webhooks.webhook WHERE name = %s", (name,))
    if cur.rowcount == 0:
        raise UserError(f"no webhook named {name!r}")


def list_webhooks(conn: psycopg.Connection, name: str | None = None) -> list[dict[str, Any]]:
    """Webhooks from the ``webhook_list`` view (secret shown only as ``secret_set``)."""
    with friendly_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT * FROM webhooks.webhook_list WHERE %(name)s::text IS NULL OR name = %(name)s "
            "ORDER BY name",
            {"name": name},
        )
        return cur.fetchall()


def get_webhook(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    rows = list_webhooks(conn, name)
    if not rows:
        raise UserError(f"no webhook named {name!r}")
    return rows[0]


def watch(conn: psycopg.Connection, table: str, object_type: str | None) -> str:
    """Capture changes of ``table``; return its object type."""
    with friendly_errors():
        row = conn.execute(
            "SELECT webhooks.watch(%s::regclass, %s)", (table, object_type)
        ).fetchone()
    assert row is not None
    return str(row[0])


def unwatch(conn: psycopg.Connection, table: str) -> bool:
    """Stop capturing changes of ``table``; False if it was not watched."""
    with friendly_errors():
        row = conn.execute("SELECT webhooks.unwatch(%s::regclass)", (table,)).fetchone()
    return bool(row and row[0])


def watched(conn: psycopg.Connection) -> list[dict[str, Any]]:
    with friendly_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT table_name::text AS table_name, object_type, primary_key "
            "FROM webhooks.watched ORDER BY 1"
        )
        return cur.fetchall()


def changelog(
    conn: psycopg.Connection, webhook: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Newest change-log entries first, optionally for one webhook name."""
    with friendly_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT id, changed_at, db_user, username, action, webhook_id, webhook_name,
                   secret_changed, before, after
              FROM webhooks.changelog
             WHERE %(name)s::text IS NULL OR webhook_name = %(name)s
             ORDER BY id DESC
             LIMIT %(limit)s
            """,
            {"name": webhook, "limit": limit},
        )
        return cur.fetchall()


def queue_test(conn: psycopg.Connection, name: str) -> str:
    """``webhooks.send_test(name)``: queue a test delivery for the daemon; return its id."""
    with friendly_errors():
        row = conn.execute("SELECT webhooks.send_test(%s)::text", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def can_read_secrets(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT has_column_privilege('webhooks.webhook', 'secret', 'SELECT')"
    ).fetchone()
    return bool(row and row[0])


def delivery_state(conn: psycopg.Connection, delivery_id: str) -> dict[str, Any] | None:
    """The latest state of a delivery and its last attempt (None if unknown)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT d.state, d.status_code, d.error, d.attempts,
                   (SELECT a.duration_ms FROM webhooks.delivery_attempt a
                     WHERE a.delivery_id = d.id ORDER BY a.attempt DESC LIMIT 1) AS duration_ms
              FROM webhooks.delivery d WHERE d.id = %s
            """,
            (delivery_id,),
        )
        return cur.fetchone()


# --------------------------------------------------------------------------
# Operating: delivery log, redelivery, retention, status
# --------------------------------------------------------------------------

DELIVERY_STATES = {
    "failed": ("failed",),
    "succeeded": ("succeeded",),
    "pending": ("pending", "sending"),
    "cancelled": ("cancelled",),
}


def deliveries(
    conn: psycopg.Connection,
    *,
    webhook: str | None = None,
    status: str | None = None,
    since: float | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Deliveries, newest first, filtered by webhook name, status and age (seconds)."""
    with friendly_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT d.id::text AS id, d.created_at, d.webhook_name, d.event, d.object_type,
                   d.object_id, d.is_test, d.state, d.attempts, d.status_code, d.error,
                   d.finished_at, d.due_at
              FROM webhooks.delivery d
             WHERE (%(webhook)s::text IS NULL OR d.webhook_name = %(webhook)s)
               AND (%(states)s::text[] IS NULL OR d.state = ANY (%(states)s::text[]))
               AND (%(since)s::float8 IS NULL
                    OR d.created_at >= now() - %(since)s::float8 * interval '1 second')
             ORDER BY d.created_at DESC, d.seq DESC
             LIMIT %(limit)s
            """,
            {
                "webhook": webhook,
                "states": list(DELIVERY_STATES[status]) if status else None,
                "since": since,
                "limit": limit,
            },
        )
        return cur.fetchall()


def delivery_detail(conn: psycopg.Connection, delivery_id: str) -> dict[str, Any]:
    """A delivery with every attempt (request, response, error)."""
    with friendly_errors(), conn.cursor(row_factory=dict_row) as cur:
        try:
            cur.execute(
                "SELECT d.id::text AS id, d.webhook_id, d.webhook_name, d.event, d.object_type, "
                "d.object_id, d.is_test, d.state, d.attempts, d.max_attempts, d.due_at, "
                "d.created_at, d.finished_at, d.status_code, d.error "
                "FROM webhooks.delivery d WHERE d.id = %s::uuid",
                (delivery_id,),
            )
        except psycopg.errors.InvalidTextRepresentation:
            raise UserError(f"{delivery_id!r} is not a delivery id (a UUID)") from None
        row = cur.fetchone()
        if row is None:
            raise UserError(f"no delivery with id {delivery_id}")
        cur.execute(
            "SELECT attempt, attempted_at, outcome, dispatcher, request_method, request_url, "
            "request_headers, status_code, response_headers, response_body, error, duration_ms "
            "FROM webhooks.delivery_attempt WHERE delivery_id = %s ORDER BY attempt, id",
            (delivery_id,),
        )
        row["attempt_log"] = cur.fetchall()
    return row


def redeliver(conn: psycopg.Connection, delivery_id: str) -> bool:
    """Queue a finished delivery again (same id); False if it is pending already."""
    with friendly_errors():
        try:
            row = conn.execute("SELECT webhooks.redeliver(%s::uuid)", (delivery_id,)).fetchone()
        except psycopg.errors.InvalidTextRepresentation:
            raise UserError(f"{delivery_id!r} is not a delivery id (a UUID)") from None
    return bool(row and row[0])


def redeliver_many(conn: psycopg.Connection, webhook: str | None, status: str, since: float) -> int:
    """Queue again the deliveries in ``status`` that finished within ``since`` seconds."""
    with friendly_errors():
        row = conn.execute(
            "SELECT webhooks.redeliver(%s::text, %s::text, %s::float8 * interval '1 second')",
            (webhook, status, since),
        ).fetchone()
    return int(row[0]) if row else 0


CLEANUP_DELIVERIES = """
WITH gone AS (
    DELETE FROM webhooks.delivery
     WHERE id IN (SELECT id FROM webhooks.delivery
                   WHERE finished_at < now() - %(age)s * interval '1 second'
                     AND state IN ('succeeded', 'failed', 'cancelled')
                   LIMIT %(batch)s)
    RETURNING id
), attempts AS (
    DELETE FROM webhooks.delivery_attempt a USING gone WHERE a.delivery_id = gone.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM attempts)
"""

CLEANUP_OUTBOX = """
WITH gone AS (
    DELETE FROM webhooks.outbox
     WHERE id IN (SELECT o.id FROM webhooks.outbox o
                   WHERE o.dispatched_at < now() - %(age)s * interval '1 second'
                     AND NOT EXISTS (SELECT FROM webhooks.delivery d WHERE d.outbox_id = o.id)
                   LIMIT %(batch)s)
    RETURNING 1
)
SELECT count(*) FROM gone
"""

CLEANUP_COUNT = """
SELECT
  (SELECT count(*) FROM webhooks.delivery
    WHERE finished_at < now() - %(age)s * interval '1 second'
      AND state IN ('succeeded', 'failed', 'cancelled')),
  (SELECT count(*) FROM webhooks.delivery_attempt a JOIN webhooks.delivery d
       ON d.id = a.delivery_id
    WHERE d.finished_at < now() - %(age)s * interval '1 second'
      AND d.state IN ('succeeded', 'failed', 'cancelled')),
  (SELECT count(*) FROM webhooks.outbox o
    WHERE o.dispatched_at < now() - %(age)s * interval '1 second'
      AND NOT EXISTS (SELECT FROM webhooks.delivery d
                       WHERE d.outbox_id = o.id
                         AND NOT (d.finished_at < now() - %(age)s * interval '1 second'
                                  AND d.state IN ('succeeded', 'failed', 'cancelled'))))
"""


@dataclass
class CleanupResult:
    deliveries: int = 0
    attempts: int = 0
    changes: int = 0
    finished: bool = True


def cleanup(
    conn: psycopg.Connection,
    older_than: float,
    *,
    dry_run: bool = False,
    batch_size: int = 1000,
    max_batches: int | None = None,
) -> CleanupResult:
    """Delete finished deliveries (with their attempts) and dispatched changes
    older than ``older_than`` seconds, in short transactions of ``batch_size``.

    Changes whose deliveries are still kept stay too, so failed deliveries
    within retention remain redeliverable. ``finished`` is False when
    ``max_batches`` ran out before everything old was gone.
    """
    params = {"age": older_than, "batch": batch_size}
    result = CleanupResult()
    if dry_run:
        row = conn.execute(CLEANUP_COUNT, params).fetchone()
        assert row is not None
        result.deliveries, result.attempts, result.changes = (int(x) for x in row)
        return result
    batches = 0
    for query in (CLEANUP_DELIVERIES, CLEANUP_OUTBOX):
        while True:
            if max_batches is not None and batches >= max_batches:
                result.finished = False
                return result
            batches += 1
            row = conn.execute(query, params).fetchone()
            assert row is not None
            if query is CLEANUP_DELIVERIES:
                result.deliveries += int(row[0])
                result.attempts += int(row[1])
            else:
                result.changes += int(row[0])
            if int(row[0]) < batch_size:
                break
    return result


def status(conn: psycopg.Connection) -> dict[str, Any]:
    """The ``webhooks.status`` row plus per-webhook ``webhooks.webhook_stats``."""
    with friendly_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM webhooks.status")
        row = cur.fetchone() or {}
        cur.execute("SELECT * FROM webhooks.webhook_stats ORDER BY name")
        row["webhooks"] = cur.fetchall()
    return row


# --------------------------------------------------------------------------
# The demo's own objects
# --------------------------------------------------------------------------


def demo_prepare(conn: psycopg.Connection, schema: str) -> str:
    """Create ``schema.orders`` and watch it; return its object type."""
    with friendly_errors():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.orders (id int PRIMARY KEY, customer text, "
                "total numeric(10,2), status text)"
            ).format(sql.Identifier(schema))
        )
        return watch(conn, f"{sql.Identifier(schema).as_string(conn)}.orders", None)


def demo_changes(conn: psycopg.Connection, schema: str) -> None:
    """One create, one update and one delete on the demo table, as user 'demo'."""
    table = sql.Identifier(schema, "orders")
    with conn.transaction():
        conn.execute("SET LOCAL danbyte.username = 'demo'")
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'Ada', 42.50, 'new')").format(table))
    conn.execute(sql.SQL("UPDATE {} SET status = 'paid' WHERE id = 1").format(table))
    conn.execute(sql.SQL("DELETE FROM {} WHERE id = 1").format(table))


def demo_teardown(
    conn: psycopg.Connection, schema: str, webhook: str, drop_webhooks_schema: bool
) -> None:
    """Remove what the demo created in an existing database."""
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    if drop_webhooks_schema:
        conn.execute("DROP SCHEMA IF EXISTS webhooks CASCADE")
        return
    with conn.transaction():
        row = conn.execute("SELECT id FROM webhooks.webhook WHERE name = %s", (webhook,)).fetchone()
        if row is None:
            return
        conn.execute(
            "DELETE FROM webhooks.delivery_attempt a USING webhooks.delivery d "
            "WHERE a.delivery_id = d.id AND d.webhook_id = %s",
            (row[0],),
        )
        conn.execute(
            "DELETE FROM webhooks.outbox o USING webhooks.delivery d "
            "WHERE d.outbox_id = o.id AND d.webhook_id = %s",
            (row[0],),
        )
        conn.execute("DELETE FROM webhooks.delivery WHERE webhook_id = %s", (row[0],))
        conn.execute("DELETE FROM webhooks.webhook WHERE id = %s", (row[0],))
