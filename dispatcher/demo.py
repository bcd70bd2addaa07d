"""``danbyte-webhooks demo``: the whole product, end to end, in a minute.

Starts (or uses) a database, applies the migration, watches a demo table,
starts the debug receiver and a dispatcher, makes a create, an update and a
delete, prints what the receiver saw and what the delivery log says, and
cleans up.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

import click

from dispatcher import db
from dispatcher.errors import UserError
from dispatcher.pgcluster import PostgresNotFound, TempCluster
from dispatcher.receiver import DebugReceiver, Received

SCHEMA = "danbyte_demo"
WEBHOOK = "danbyte-demo"


def _show(item: Received) -> None:
    click.echo("")
    click.echo(
        f"received {item.event} (delivery {item.delivery_id}, "
        f"signature verified: {'yes' if item.verified else 'NO'})"
    )
    click.echo(item.describe())


def run_demo(dsn: str | None, keep: bool, timeout: float = 30.0) -> int:
    """Run the demo; return the exit code (0 when all three deliveries verified)."""
    with ExitStack() as stack:
        if dsn is None:
            click.echo("starting a throwaway PostgreSQL ...")
            try:
                cluster = TempCluster().start()
            except PostgresNotFound as exc:
                raise UserError(str(exc)) from None
            stack.callback(cluster.stop)
            dsn = cluster.dsn()
            fresh = True
        else:
            fresh = False
        conn = stack.enter_context(db.connect(dsn, application_name="danbyte-webhooks demo"))
        had_schema = bool(db.applied_versions(conn))
        applied = db.migrate(conn)
        click.echo(f"migrated: {', '.join(m.version + '_' + m.name for m in applied) or 'already'}")
        if not fresh:
            stack.callback(db.demo_teardown, conn, SCHEMA, WEBHOOK, not had_schema)
        object_type = db.demo_prepare(conn, SCHEMA)
        click.echo(f"watching {SCHEMA}.orders as object type {object_type}")

        secret = secrets.token_urlsafe(32)
        receiver = DebugReceiver(secret=secret, on_request=_show).start()
        stack.callback(receiver.stop)
        url = f"http://127.0.0.1:{receiver.port}/hooks/orders"
        db.add_webhook(
            conn,
            {"name": WEBHOOK, "payload_url": url, "secret": secret, "object_types": [object_type]},
        )
        click.echo(f"webhook {WEBHOOK} -> {url} (with a freshly generated secret)")

        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dispatcher",
                "run",
                "--dsn",
                dsn,
                "--poll-interval",
                "1",
                "--log-level",
                "WARNING",
            ],
        )
        stack.callback(_stop_process, proc)
        click.echo(f"dispatcher started (pid {proc.pid})")

        db.demo_changes(conn, SCHEMA)
        click.echo("made a create, an update and a delete on the demo table")
        got = receiver.wait_for(3, timeout)
        _wait_for_log(conn, len(got), timeout)
        click.echo("")
        click.echo("delivery log:")
        for row in reversed(db.deliveries(conn, webhook=WEBHOOK, limit=10)):
            click.echo(
                f"  {row['id']}  {row['event']:<7} {row['state']:<9} "
                f"HTTP {row['status_code']}  attempts={row['attempts']}"
            )
        ok = len(got) == 3 and all(item.verified for item in got)
        click.echo("")
        click.echo(
            f"{sum(1 for i in got if i.verified)} of 3 deliveries arrived signed and verified"
        )
        if keep:
            _keep_running(dsn, fresh, lambda: proc.poll() is None)
        return 0 if ok else 1


def _wait_for_log(conn, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db.deliveries(conn, webhook=WEBHOOK, limit=10)
        if sum(1 for r in rows if r["state"] in ("succeeded", "failed")) >= n:
            return
        time.sleep(0.1)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _keep_running(dsn: str, fresh: bool, alive: Callable[[], bool]) -> None:
    try:  # before the instructions: Ctrl-C may come as soon as they are printed
        click.echo("")
        click.echo("still running: make your own changes and watch them arrive, e.g.")
        click.echo(
            f'  psql {json.dumps(dsn)} -c "INSERT INTO {SCHEMA}.orders '
            "VALUES (2, 'Grace', 10, 'new')\""
        )
        click.echo("press Ctrl-C to stop" + (" and remove the throwaway database" if fresh else ""))
        while alive():
            time.sleep(0.5)
        click.echo("the dispatcher exited")
    except KeyboardInterrupt:
        click.echo("\ncleaning up ...")
