"""The benchmark: ``python -m tests.bench [--quick] [--dsn DSN] [--json PATH]``."""

from __future__ import annotations

import psycopg

from dispatcher import db


def create_tables(conn: psycopg.Connection) -> None:
    """Migrate, then create the watched table ``bench`` and its unwatched twin ``plain``."""
    db.migrate(conn)
    conn.execute(
        "CREATE TABLE bench (id bigint PRIMARY KEY, n int NOT NULL DEFAULT 0, "
        "v text NOT NULL DEFAULT 'x')"
    )
    conn.execute("CREATE TABLE plain (LIKE bench INCLUDING ALL)")
    conn.execute("SELECT webhooks.watch('bench')")
