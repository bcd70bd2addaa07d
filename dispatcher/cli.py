"""The ``danbyte-webhooks`` command line. Click only: SQL lives in :mod:`dispatcher.db`."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import psycopg

from dispatcher import __version__, db
from dispatcher.config import Settings, parse_duration
from dispatcher.delivery import Sender
from dispatcher.errors import UserError
from dispatcher.retry import decide

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class Cli(click.Group):
    """A group that prints user mistakes and database refusals as one line, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None
        except psycopg.OperationalError as exc:
            raise click.ClickException(f"database connection failed: {db.one_line(exc)}") from None
        except psycopg.Error as exc:
            raise click.ClickException(f"database error: {db.one_line(exc)}") from None


def dsn_option(f: F) -> F:
    return click.option(
        "--dsn",
        envvar="DANBYTE_DSN",
        show_envvar=True,
        required=True,
        help="libpq connection string or URI of the application database.",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def _connect(dsn: str) -> psycopg.Connection:
    return db.connect(dsn, application_name="danbyte-webhooks cli")


@contextmanager
def _database(dsn: str) -> Iterator[psycopg.Connection]:
    """A connection to a database with our schema installed (else a clear error)."""
    with _connect(dsn) as conn:
        db.require_schema(conn)
        yield conn


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Print ``rows`` as an aligned table; ``columns`` are (key, heading) pairs."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value).replace("\n", " | ")

    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [
        max([len(heading)] + [len(r[i]) for r in cells]) for i, (_, heading) in enumerate(columns)
    ]
    click.echo(
        "  ".join(h.upper().ljust(w) for (_, h), w in zip(columns, widths, strict=True)).rstrip()
    )
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


class Duration(click.ParamType):
    """A duration like 90s, 30m, 2h, 7d or 1w (a bare number is seconds)."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
STATUS_CHOICE = click.Choice(sorted(db.DELIVERY_STATES))


@click.group(cls=Cli, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="danbyte-webhooks")
def main() -> None:
    """Danbyte Webhooks: deliver PostgreSQL changes as signed HTTP requests.

    \b
    Quick start:
      danbyte-webhooks demo
      danbyte-webhooks migrate --dsn postgresql://localhost/app
      danbyte-webhooks watch public.orders --dsn ...
      danbyte-webhooks webhook add --name orders --url https://example.com/hook --dsn ...
      danbyte-webhooks run --dsn ...
    """


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


@main.command()
@dsn_option
def migrate(dsn: str) -> None:
    """Apply the SQL migrations that are not applied yet.

    Safe to run again (it reports nothing to do) and from several places at
    once (they wait for each other). Example:

        danbyte-webhooks migrate --dsn postgresql://admin@db/app
    """
    with _connect(dsn) as conn:
        applied = db.migrate(conn)
        version = db.schema_version(conn)
    if applied:
        for mig in applied:
            click.echo(f"applied {mig.version}_{mig.name}")
    else:
        click.echo(f"nothing to do: schema is at version {version}")


@main.command("watch")
@dsn_option
@click.argument("table")
@click.option("--object-type", help="Object type name for this table [default: schema.table].")
def watch_cmd(dsn: str, table: str, object_type: str | None) -> None:
    """Capture creates, updates and deletes of TABLE.

    Needs the table owner's rights. Example:

        danbyte-webhooks watch public.orders --dsn ...
    """
    with _database(dsn) as conn:
        ot = db.watch(conn, table, object_type)
    click.echo(f"watching {table} as object type {ot}")


@main.command("unwatch")
@dsn_option
@click.argument("table")
def unwatch_cmd(dsn: str, table: str) -> None:
    """Stop capturing changes of TABLE. Example: danbyte-webhooks unwatch public.orders"""
    with _database(dsn) as conn:
        removed = db.unwatch(conn, table)
    click.echo(f"stopped watching {table}" if removed else f"{table} was not watched")


@main.command("watched")
@dsn_option
@json_option
def watched_cmd(dsn: str, as_json: bool) -> None:
    """List watched tables and their object types. Example: danbyte-webhooks watched --json"""
    with _database(dsn) as conn:
        rows = db.watched(conn)
    if as_json:
        _print_json(rows)
    else:
        _table(
            rows,
            [
                ("table_name", "table"),
                ("object_type", "object type"),
                ("primary_key", "primary key"),
            ],
        )


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------


def _env(name: str) -> dict[str, Any]:
    return {"envvar": f"DANBYTE_{name}", "show_envvar": True}


@main.command()
@dsn_option
@click.option(
    "--workers",
    type=click.IntRange(1, 1024),
    default=32,
    **_env("WORKERS"),
    help="Requests in flight at most (sender threads).",
)
@click.option(
    "--per-webhook-concurrency",
    type=click.IntRange(1, 1024),
    default=16,
    **_env("PER_WEBHOOK_CONCURRENCY"),
    help="Requests in flight to one webhook at most, so a slow one cannot starve the rest.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.05, 30),
    default=5.0,
    **_env("POLL_INTERVAL"),
    help="Seconds between sweeps and heartbeats (at most 30: writers only wake a dispatcher "
    "whose heartbeat is under a minute old).",
)
@click.option(
    "--lease-time",
    type=click.FloatRange(1, 86400),
    default=60.0,
    **_env("LEASE_TIME"),
    help="Seconds a claimed delivery stays ours before another dispatcher may take it "
    "(at least the request timeout + 5 s).",
)
@click.option(
    "--default-timeout",
    type=click.FloatRange(0.1, 300),
    default=10.0,
    **_env("DEFAULT_TIMEOUT"),
    help="Request timeout for webhooks without their own.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(0, 3600),
    default=30.0,
    **_env("SHUTDOWN_TIMEOUT"),
    help="Seconds to finish requests in flight on SIGTERM.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 5000),
    default=200,
    **_env("BATCH_SIZE"),
    help="Changes or deliveries taken per query, and claimed deliveries held at most "
    "(or twice --workers, if more).",
)
@click.option(
    "--retry-base",
    type=click.FloatRange(0.01, 3600),
    default=5.0,
    **_env("RETRY_BASE"),
    help="First retry delay in seconds (doubles per attempt, with jitter) for webhooks "
    "with max_attempts > 1.",
)
@click.option(
    "--retention",
    type=DURATION,
    default="7d",
    **_env("RETENTION"),
    help="Remove finished deliveries and delivered changes older than this (checked every "
    "minute, in small batches); 0 keeps everything.",
)
@click.option(
    "--proxy",
    default=None,
    **_env("PROXY"),
    help="HTTP(S) proxy URL for all deliveries. Proxy environment variables are ignored.",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    **_env("LOG_LEVEL"),
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    **_env("LOG_FORMAT"),
    help="Text lines or JSON lines on stderr.",
)
def run(**options: Any) -> None:
    """Run the dispatcher until SIGTERM or SIGINT.

    The first signal stops claiming, finishes requests in flight (up to
    --shutdown-timeout) and exits 0; a second one exits at once. Example:

        DANBYTE_DSN=postgresql://dispatcher@db/app danbyte-webhooks run --workers 64
    """
    from dispatcher.daemon import Dispatcher
    from dispatcher.logs import setup_logging

    settings = Settings(**options)
    setup_logging(settings.log_level, settings.log_format)
    with _database(settings.dsn):  # fail fast, and clearly, if unreachable or not migrated
        pass
    sys.exit(Dispatcher(settings).run())


# ---------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------


@main.group(cls=Cli)
def webhook() -> None:
    """Add, change, list, test and delete webhooks."""


def _read_secret(
    secret_stdin: bool, secret_prompt: bool, generate_secret: bool, secret_env: str | None
) -> str | None:
    chosen = [secret_stdin, secret_prompt, generate_secret, bool(secret_env)].count(True)
    if chosen > 1:
        raise UserError(
            "use only one of --secret-stdin, --secret-prompt, --secret-env and --generate-secret"
        )
    if secret_env:
        value = os.environ.get(secret_env, "")
        if not value:
            raise UserError(f"--secret-env: environment variable {secret_env} is not set or empty")
        return value
    if secret_stdin:
        value = sys.stdin.read().rstrip("\r\n")
        if not value:
            raise UserError(
                "--secret-stdin read an empty secret: pipe the secret on standard input"
            )
        return value
    if secret_prompt:
        return str(click.prompt("Secret", hide_input=True, confirmation_prompt=True))
    if generate_secret:
        return secrets.token_urlsafe(32)
    return None


def _headers(values: Sequence[str]) -> str:
    for i, value in enumerate(values, 1):
        if ":" not in value:
            raise UserError(f'--header #{i} is not "Name: value"')
    return "\n".join(v.strip() for v in values)


def webhook_options(add: bool) -> Callable[[F], F]:
    """The options shared by ``webhook add`` and ``webhook update``."""

    def decorate(f: F) -> F:
        opts = [
            click.option("--url", help="Payload URL (http:// or https://)."),
            click.option(
                "--object-type",
                "object_types",
                multiple=True,
                help="Object type that fires the webhook (repeatable) [default: all].",
            ),
            click.option("--all-object-types", is_flag=True, help="Fire for every object type."),
            click.option(
                "--trigger",
                "triggers",
                multiple=True,
                type=click.Choice(["create", "update", "delete"], case_sensitive=False),
                help="Event that fires the webhook (repeatable) [default: all three].",
            ),
            click.option(
                "--method",
                type=click.Choice(["POST", "PUT", "PATCH"], case_sensitive=False),
                help="HTTP method [default: POST].",
            ),
            click.option(
                "--content-type", help="Content-Type of the body [default: application/json]."
            ),
            click.option(
                "--header",
                "headers",
                multiple=True,
                help='Additional header "Name: value" (repeatable).',
            ),
            click.option(
                "--secret-stdin", is_flag=True, help="Read the signing secret from standard input."
            ),
            click.option(
                "--secret-prompt", is_flag=True, help="Prompt for the signing secret without echo."
            ),
            click.option(
                "--secret-env",
                metavar="NAME",
                help="Read the signing secret from environment variable NAME.",
            ),
            click.option(
                "--generate-secret",
                is_flag=True,
                help="Generate a random secret and print it this once.",
            ),
            click.option(
                "--verify-tls/--no-verify-tls",
                default=None,
                help="Verify the receiver's TLS certificate [default: verify].",
            ),
            click.option(
                "--timeout",
                type=click.FloatRange(0.1, 300),
                default=None,
                help="Request timeout in seconds [default: the dispatcher's].",
            ),
            click.option(
                "--max-attempts",
                type=click.IntRange(1, 50),
                default=None,
                help="Attempts before a delivery fails; more than 1 enables retries [default: 1].",
            ),
            click.option(
                "--retry-4xx/--no-retry-4xx",
                "retry_on_4xx",
                default=None,
                help="Also retry 4xx answers other than 410.",
            ),
        ]
        if add:
            opts.append(click.option("--disabled", is_flag=True, help="Create it disabled."))
            opts.append(
                click.option(
                    "--if-not-exists",
                    is_flag=True,
                    help="Succeed without changes if a webhook with this name exists.",
                )
            )
            opts.append(click.option("--name", required=True, help="Unique name."))
        else:
            opts.append(click.option("--new-name", help="Rename the webhook."))
            opts.append(click.option("--clear-secret", is_flag=True, help="Remove the secret."))
            opts.append(
                click.option("--clear-headers", is_flag=True, help="Remove all additional headers.")
            )
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def _fields(o: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Webhook columns from the options, and a generated secret to print (if any)."""
    fields: dict[str, Any] = {}
    if o.get("new_name") is not None:
        fields["name"] = o["new_name"]
    if o.get("url") is not None:
        fields["payload_url"] = o["url"]
    if o["object_types"] and o["all_object_types"]:
        raise UserError("use either --object-type or --all-object-types, not both")
    if o["object_types"]:
        fields["object_types"] = list(o["object_types"])
    elif o["all_object_types"]:
        fields["object_types"] = None
    if o["triggers"]:
        fields["triggers"] = sorted(
            {t.lower() for t in o["triggers"]}, key=["create", "update", "delete"].index
        )
    if o["method"]:
        fields["method"] = o["method"].upper()
    if o["content_type"] is not None:
        fields["content_type"] = o["content_type"]
    if o["headers"]:
        fields["additional_headers"] = _headers(o["headers"])
    if o.get("clear_headers"):
        if o["headers"]:
            raise UserError("use either --header or --clear-headers, not both")
        fields["additional_headers"] = ""
    for key in ("verify_tls", "max_attempts", "retry_on_4xx"):
        if o[key] is not None:
            fields[key] = o[key]
    if o["timeout"] is not None:
        fields["timeout_seconds"] = o["timeout"]
    secret = _read_secret(
        o["secret_stdin"], o["secret_prompt"], o["generate_secret"], o["secret_env"]
    )
    if o.get("clear_secret"):
        if secret is not None:
            raise UserError("use either --clear-secret or a way to set the secret, not both")
        fields["secret"] = None
    elif secret is not None:
        fields["secret"] = secret
    return fields, secret if o["generate_secret"] else None


@webhook.command("add")
@dsn_option
@webhook_options(add=True)
def webhook_add(dsn: str, **o: Any) -> None:
    """Create a webhook.

    \b
    Example:
      printf '%s' "$SECRET" | danbyte-webhooks webhook add --name orders \\
          --url https://example.com/hooks/orders --object-type public.orders \\
          --trigger create --trigger update --secret-stdin --dsn ...
    """
    if not o["url"]:
        raise UserError("--url is required: the payload URL to send deliveries to")
    fields, generated = _fields(o)
    fields["name"] = o["name"]
    if o["disabled"]:
        fields["enabled"] = False
    with _database(dsn) as conn:
        if o["if_not_exists"] and db.list_webhooks(conn, o["name"]):
            click.echo(f"webhook {o['name']} exists already: left unchanged")
            return
        db.add_webhook(conn, fields)
    click.echo(f"created webhook {o['name']}")
    if generated:
        click.echo(f"secret (shown only this once, store it now): {generated}")


@webhook.command("update")
@dsn_option
@click.argument("name")
@webhook_options(add=False)
def webhook_update(dsn: str, name: str, **o: Any) -> None:
    """Change a webhook; options not given stay as they are.

    \b
    Example:
      danbyte-webhooks webhook update orders --trigger delete --clear-secret --dsn ...
    """
    fields, generated = _fields(o)
    with _database(dsn) as conn:
        db.update_webhook(conn, name, fields)
    click.echo(f"updated webhook {fields.get('name', name)}")
    if generated:
        click.echo(f"secret (shown only this once, store it now): {generated}")


def _set_enabled(dsn: str, name: str, enabled: bool) -> None:
    with _database(dsn) as conn:
        db.update_webhook(conn, name, {"enabled": enabled})
    click.echo(f"{'enabled' if enabled else 'disabled'} webhook {name}")


@webhook.command("enable")
@dsn_option
@click.argument("name")
def webhook_enable(dsn: str, name: str) -> None:
    """Enable a webhook (changes from now on are delivered). Example: webhook enable orders"""
    _set_enabled(dsn, name, True)


@webhook.command("disable")
@dsn_option
@click.argument("name")
def webhook_disable(dsn: str, name: str) -> None:
    """Disable a webhook (unsent deliveries are cancelled). Example: webhook disable orders"""
    _set_enabled(dsn, name, False)


@webhook.command("delete")
@dsn_option
@click.argument("name")
def webhook_delete(dsn: str, name: str) -> None:
    """Delete a webhook; its delivery log stays. Example: webhook delete orders"""
    with _database(dsn) as conn:
        db.delete_webhook(conn, name)
    click.echo(f"deleted webhook {name}")


WEBHOOK_COLUMNS = [
    ("name", "name"),
    ("enabled", "enabled"),
    ("object_types", "object types"),
    ("triggers", "triggers"),
    ("method", "method"),
    ("payload_url", "url"),
    ("secret_set", "secret"),
    ("last_delivery_state", "last delivery"),
]


@webhook.command("list")
@dsn_option
@json_option
def webhook_list(dsn: str, as_json: bool) -> None:
    """List webhooks (secrets show only as yes/no). Example: danbyte-webhooks webhook list"""
    with _database(dsn) as conn:
        rows = db.list_webhooks(conn)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        r["object_types"] = r["object_types"] or "all"
        if r["last_delivery_state"]:
            r["last_delivery_state"] = (
                f"{r['last_delivery_state']} ({r['last_status_code'] or 'no response'})"
            )
    _table(rows, WEBHOOK_COLUMNS)


@webhook.command("show")
@dsn_option
@json_option
@click.argument("name")
def webhook_show(dsn: str, name: str, as_json: bool) -> None:
    """Show one webhook in full (except the secret). Example: webhook show orders"""
    with _database(dsn) as conn:
        row = db.get_webhook(conn, name)
    if as_json:
        _print_json(row)
        return
    row["object_types"] = row["object_types"] or "all"
    width = max(len(k) for k in row)
    for key, value in row.items():
        if key == "additional_headers":
            lines = (value or "").split("\n") if value else ["-"]
            click.echo(f"{key.ljust(width)}  {lines[0]}")
            for extra in lines[1:]:
                click.echo(f"{' ' * width}  {extra}")
            continue
        if isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        click.echo(f"{key.ljust(width)}  {'-' if value is None else value}")


@webhook.command("test")
@dsn_option
@click.argument("name")
@click.option(
    "--wait",
    type=click.FloatRange(1, 600),
    default=30.0,
    help="When queued for the daemon: seconds to wait for the result.",
)
def webhook_test(dsn: str, name: str, wait: float) -> None:
    """Send a sample delivery now and show the status code or the error.

    Uses the webhook's method, URL, headers, content type, secret and TLS
    setting, with X-Danbyte-Event: test; exits 0 only on a 2xx answer. With a
    role that cannot read secrets (danbyte_integrations) the test is queued
    for the running dispatcher instead. Example:

        danbyte-webhooks webhook test orders --dsn ...
    """
    with _database(dsn) as conn:
        if db.can_read_secrets(conn):
            me = f"cli:{socket.gethostname()}:{os.getpid()}"
            job = db.begin_test(conn, name, me, default_timeout=10.0)
            outcome = Sender().send(job)
            db.record_outcomes(conn, me, [(outcome, decide(outcome))])
            state = {
                "state": "succeeded" if outcome.ok else "failed",
                "status_code": outcome.status_code,
                "error": outcome.error,
                "duration_ms": outcome.duration_ms,
            }
            delivery_id = job.delivery_id
        else:
            db.get_webhook(conn, name)  # a clear error for an unknown name
            delivery_id = db.queue_test(conn, name)
            click.echo(f"queued test delivery {delivery_id} for the dispatcher")
            deadline = time.monotonic() + wait
            while True:
                state = db.delivery_state(conn, delivery_id) or {}
                if state.get("state") in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise UserError(
                        f"no dispatcher sent test delivery {delivery_id} within {wait:g}s: "
                        "is `danbyte-webhooks run` running?"
                    )
                time.sleep(0.2)
    took = f"{state['duration_ms']:.1f} ms" if state.get("duration_ms") is not None else "-"
    if state["state"] == "succeeded":
        click.echo(f"ok: HTTP {state['status_code']} in {took} (delivery {delivery_id})")
        return
    reason = state.get("error") or f"HTTP {state.get('status_code')}"
    click.echo(f"failed: {reason} after {took} (delivery {delivery_id})")
    sys.exit(1)


@main.command("changelog")
@dsn_option
@json_option
@click.option("--webhook", "webhook_name", help="Only this webhook.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50)
def changelog_cmd(dsn: str, as_json: bool, webhook_name: str | None, limit: int) -> None:
    """Show who created, changed or deleted webhooks, newest first.

    Secrets never appear: only whether one is set and whether it changed.
    Example: danbyte-webhooks changelog --webhook orders --limit 10
    """
    with _database(dsn) as conn:
        rows = db.changelog(conn, webhook_name, limit)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        before, after = r["before"] or {}, r["after"] or {}
        changed = sorted(
            k
            for k in set(before) | set(after)
            if k not in ("updated_at", "enabled_at") and before.get(k) != after.get(k)
        )
        if r["secret_changed"] and "secret" not in changed:
            changed.append("secret")
        r["changes"] = ", ".join(changed) if r["action"] == "update" else ""
        r["who"] = r["db_user"] + (f" ({r['username']})" if r["username"] else "")
    _table(
        rows,
        [
            ("changed_at", "when"),
            ("who", "who"),
            ("action", "action"),
            ("webhook_name", "webhook"),
            ("changes", "changed"),
        ],
    )


# ---------------------------------------------------------------------------
# Operating
# ---------------------------------------------------------------------------


def _age(value: Any) -> str:
    if value is None:
        return "-"
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _print_deliveries(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        r["created_at"] = _age(r["created_at"])
        r["object"] = f"{r['object_type'] or '-'}:{json.dumps(r['object_id'])}"
        r["result"] = r["error"] or (f"HTTP {r['status_code']}" if r["status_code"] else "")
        if r["state"] == "pending" and r["attempts"]:
            r["result"] = f"retry at {_age(r['due_at'])}; last: {r['result']}"
    _table(
        rows,
        [
            ("id", "delivery"),
            ("created_at", "created"),
            ("webhook_name", "webhook"),
            ("event", "event"),
            ("object", "object"),
            ("state", "state"),
            ("attempts", "attempts"),
            ("result", "result"),
        ],
    )


@main.group(cls=Cli, invoke_without_command=True)
@click.option("--dsn", envvar="DANBYTE_DSN", show_envvar=True, help="Database connection string.")
@click.option("--webhook", "webhook_name", help="Only deliveries of this webhook.")
@click.option("--status", type=STATUS_CHOICE, help="Only deliveries in this state.")
@click.option("--since", type=DURATION, help="Only deliveries created within this long, e.g. 1h.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50)
@json_option
@click.pass_context
def deliveries(
    ctx: click.Context,
    dsn: str | None,
    webhook_name: str | None,
    status: str | None,
    since: float | None,
    limit: int,
    as_json: bool,
) -> None:
    """List deliveries, newest first; `deliveries redeliver` sends some again.

    \b
    Examples:
      danbyte-webhooks deliveries --status failed --since 1h
      danbyte-webhooks deliveries redeliver --webhook orders --status failed --since 2h
    """
    if ctx.invoked_subcommand is not None:
        return
    if not dsn:
        raise UserError("--dsn is required (or set DANBYTE_DSN)")
    with _database(dsn) as conn:
        rows = db.deliveries(conn, webhook=webhook_name, status=status, since=since, limit=limit)
    if as_json:
        _print_json(rows)
    else:
        _print_deliveries(rows)


@deliveries.command("redeliver")
@dsn_option
@click.option("--webhook", "webhook_name", help="Only this webhook [default: every enabled one].")
@click.option("--status", type=click.Choice(["failed", "succeeded", "cancelled"]), default="failed")
@click.option(
    "--since",
    type=DURATION,
    default="1d",
    help="Deliveries that finished within this long, e.g. 2h.",
)
def deliveries_redeliver(dsn: str, webhook_name: str | None, status: str, since: float) -> None:
    """Send finished deliveries again, each with its own delivery id.

    Example: danbyte-webhooks deliveries redeliver --webhook orders --status failed --since 2h
    """
    with _database(dsn) as conn:
        n = db.redeliver_many(conn, webhook_name, status, since)
    click.echo(f"queued {n} deliveries again")


@main.group(cls=Cli)
def delivery() -> None:
    """Inspect or resend one delivery."""


@delivery.command("show")
@dsn_option
@json_option
@click.argument("delivery_id")
def delivery_show(dsn: str, delivery_id: str, as_json: bool) -> None:
    """Show a delivery with each attempt's request and response.

    Example: danbyte-webhooks delivery show 0f9c...-...
    """
    with _database(dsn) as conn:
        d = db.delivery_detail(conn, delivery_id)
    if as_json:
        _print_json(d)
        return
    click.echo(f"delivery   {d['id']}")
    click.echo(f"webhook    {d['webhook_name']}{' (test)' if d['is_test'] else ''}")
    click.echo(f"event      {d['event']} {d['object_type'] or ''}:{json.dumps(d['object_id'])}")
    click.echo(f"state      {d['state']} after {d['attempts']} of {d['max_attempts']} attempts")
    click.echo(f"created    {_age(d['created_at'])}   finished {_age(d['finished_at'])}")
    for a in d["attempt_log"]:
        click.echo("")
        click.echo(
            f"attempt {a['attempt']} at {_age(a['attempted_at'])}: {a['outcome']} "
            f"in {a['duration_ms']:.1f} ms (by {a['dispatcher']})"
        )
        click.echo(f"  > {a['request_method']} {a['request_url']}")
        for k, v in a["request_headers"].items():
            click.echo(f"  > {k}: {v}")
        if a["status_code"] is not None:
            click.echo(f"  < HTTP {a['status_code']}")
            for k, v in (a["response_headers"] or {}).items():
                click.echo(f"  < {k}: {v}")
            if a["response_body"]:
                click.echo(f"  < {a['response_body'][:1000]}")
        if a["error"]:
            click.echo(f"  ! {a['error']}")


@delivery.command("redeliver")
@dsn_option
@click.argument("delivery_id")
def delivery_redeliver(dsn: str, delivery_id: str) -> None:
    """Send a finished delivery again with the same delivery id.

    Example: danbyte-webhooks delivery redeliver 0f9c...-...
    """
    with _database(dsn) as conn:
        queued = db.redeliver(conn, delivery_id)
    click.echo(
        f"queued delivery {delivery_id} again"
        if queued
        else f"delivery {delivery_id} is already waiting to be sent"
    )


@main.command()
@dsn_option
@click.option(
    "--older-than",
    type=DURATION,
    default="7d",
    help="Remove finished deliveries and delivered changes older than this.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
def cleanup(dsn: str, older_than: float, dry_run: bool) -> None:
    """Remove old delivery-log rows and delivered changes, in small batches.

    Failed deliveries younger than --older-than stay (and stay redeliverable).
    The daemon does this on its own every few minutes with --retention.
    Example: danbyte-webhooks cleanup --older-than 3d --dry-run
    """
    with _database(dsn) as conn:
        r = db.cleanup(conn, older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {r.deliveries} deliveries, {r.attempts} attempts and {r.changes} changes")


@main.command()
@dsn_option
@json_option
@click.option(
    "--max-backlog-age",
    type=DURATION,
    default="5m",
    help="Unhealthy when an undelivered change is older than this.",
)
def status(dsn: str, as_json: bool, max_backlog_age: float) -> None:
    """Health at a glance; exits 1 when unhealthy (usable as a health check).

    Unhealthy: database unreachable, schema missing or behind, no dispatcher
    heartbeat within a minute, or a backlog older than --max-backlog-age.
    Example: danbyte-webhooks status --max-backlog-age 2m
    """
    problems: list[str] = []
    try:
        with _database(dsn) as conn:
            s = db.status(conn)
    except UserError as exc:  # unreachable, or no schema: unhealthy, said the same way
        if as_json:
            _print_json({"healthy": False, "problems": [str(exc)]})
        else:
            click.echo(f"unhealthy: {exc}")
        sys.exit(1)
    latest = db.migrations()[-1].version
    if s["schema_version"] != latest:
        problems.append(
            f"schema is at version {s['schema_version']}, this release needs "
            f"{latest}: run `danbyte-webhooks migrate`"
        )
    if not s["dispatchers_alive"]:
        problems.append(
            "no dispatcher has reported in the last minute: is `danbyte-webhooks run` running?"
        )
    age = s["oldest_undelivered_age_seconds"]
    if age is not None and age > max_backlog_age:
        problems.append(
            f"the oldest undelivered change waits for {age:.0f}s (more than {max_backlog_age:g}s)"
        )
    s["healthy"] = not problems
    s["problems"] = problems
    if as_json:
        _print_json(s)
    else:
        click.echo(f"database     reachable, schema version {s['schema_version']}")
        click.echo(
            f"dispatchers  {s['dispatchers_alive']} alive "
            f"(last heartbeat {_age(s['last_dispatcher_seen_at'])})"
        )
        click.echo(
            f"backlog      {s['outbox_backlog']} changes to fan out, "
            f"{s['deliveries_due']} deliveries due, {s['deliveries_in_flight']} in flight, "
            f"{s['retries_scheduled']} retries scheduled"
        )
        click.echo("oldest       " + ("-" if age is None else f"{age:.1f}s waiting"))
        if s["webhooks"]:
            click.echo("")
            _table(
                s["webhooks"],
                [
                    ("name", "webhook"),
                    ("enabled", "enabled"),
                    ("succeeded_last_hour", "ok 1h"),
                    ("failed_last_hour", "failed 1h"),
                    ("pending", "pending"),
                    ("last_error", "last error"),
                ],
            )
        click.echo("")
        click.echo("healthy" if not problems else "unhealthy: " + "; ".join(problems))
    if problems:
        sys.exit(1)


# ---------------------------------------------------------------------------
# Trying it out
# ---------------------------------------------------------------------------


@main.command()
@click.option(
    "--dsn",
    envvar="DANBYTE_DSN",
    show_envvar=True,
    help="Use this existing database instead of a throwaway one (the demo works in "
    "its own schema and removes what it created).",
)
@click.option("--keep", is_flag=True, help="Keep running after the demo; Ctrl-C cleans up.")
def demo(dsn: str | None, keep: bool) -> None:
    """See the whole product work in a minute.

    Starts a throwaway PostgreSQL (or uses --dsn), applies the migration,
    watches a demo table, starts a debug receiver and a dispatcher, makes a
    create, an update and a delete, and prints each signed delivery as the
    receiver saw it. Example:

        danbyte-webhooks demo --keep
    """
    from dispatcher.demo import run_demo

    sys.exit(run_demo(dsn, keep))


@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8080, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for all).")
@click.option(
    "--secret-stdin",
    is_flag=True,
    help="Read the secret from standard input to verify signatures "
    "(or set DANBYTE_RECEIVER_SECRET).",
)
@click.option(
    "--status",
    "status_code",
    type=click.IntRange(100, 599),
    default=200,
    help="HTTP status to answer with.",
)
def receive(port: int, host: str, secret_stdin: bool, status_code: int) -> None:
    """A debug receiver: print each delivery and whether its signature verifies.

    \b
    Example:
      printf '%s' "$SECRET" | danbyte-webhooks receive --port 8080 --secret-stdin
    """
    from dispatcher.receiver import DebugReceiver

    secret = os.environ.get("DANBYTE_RECEIVER_SECRET") or None
    if secret_stdin:
        secret = sys.stdin.read().rstrip("\r\n") or None
        if secret is None:
            raise UserError(
                "--secret-stdin read an empty secret: pipe the secret on standard input"
            )

    def show(item: Any) -> None:
        click.echo(item.describe() + "\n", nl=True)

    try:
        receiver = DebugReceiver(
            port=port, host=host, secret=secret, status=status_code, on_request=show
        )
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    click.echo(
        f"listening on http://{host}:{receiver.port}/ (answering {status_code}); Ctrl-C to stop",
        err=True,
    )
    receiver.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        receiver.stop()
