"""What the capture trigger costs the server, in instructions (valgrind).

    python -m tests.bench.instructions [--json PATH]

Wall-clock figures on a shared machine drift by tens of percent between runs;
instruction counts do not. Each statement runs (and commits) in a server-side loop in a
single-user PostgreSQL under callgrind, twice with different loop lengths, so
start-up and the loop's own cost cancel out: what is left is the cost of one
statement (per row, for 100-row statements). The baseline is the same
statement on the same table unwatched, measured in the same run.

Needs valgrind (Debian/Ubuntu: apt-get install valgrind). Takes about two
minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from dispatcher import db
from dispatcher.pgcluster import TempCluster
from tests.bench import create_tables

#: name -> (statement inside the loop, rows per statement). Every run gets
#: rows of its own ({base}): rows left dead by an earlier run would add work
#: of their own.
STATEMENTS = {
    "single-row INSERT": ("INSERT INTO {t} (id) VALUES ({base} + i)", 1),
    "single-row UPDATE": ("UPDATE {t} SET n = n + 1 WHERE id = {base} + i", 1),
    "100-row INSERT": (
        "INSERT INTO {t} (id) SELECT g FROM generate_series({base} + i * 100, "
        "{base} + i * 100 + 99) g",
        100,
    ),
    "100-row UPDATE": (
        "UPDATE {t} SET n = n + 1 WHERE id >= {base} + i * 100 AND id < {base} + i * 100 + 100",
        100,
    ),
}
ROWS = 100_000  # in each table; UPDATEs take their rows from these
#: database -> (table, what it shows)
CASES = {
    "plain": ("plain", "unwatched"),
    "wanted": ("bench", "watched, a webhook wants the changes"),
    "unwanted": ("bench", "watched, no webhook wants them"),
}


def setup(cluster: TempCluster) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        c.execute("CREATE DATABASE template_bench")
    with psycopg.connect(cluster.dsn("template_bench"), autocommit=True) as c:
        create_tables(c)
        db.add_webhook(c, {"name": "all", "payload_url": "http://127.0.0.1:9/"})
        for t in ("bench", "plain"):
            c.execute(f"INSERT INTO {t} (id) SELECT g FROM generate_series(1, {ROWS}) g")
        c.execute("TRUNCATE webhooks.outbox, webhooks.capture")
        c.execute("VACUUM ANALYZE")
    for name in CASES:
        with psycopg.connect(cluster.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name} TEMPLATE template_bench")
    with psycopg.connect(cluster.dsn("unwanted"), autocommit=True) as c:
        c.execute("DELETE FROM webhooks.webhook")
        c.execute("SELECT webhooks.refresh_wanted()")


def instructions(cluster: TempCluster, database: str, statement: str, loops: int) -> int:
    """Instructions of a single-user server running ``statement`` ``loops`` times, each in a
    transaction of its own (as most application writes are), commit included."""
    script = f"DO $$BEGIN FOR i IN 1..{loops} LOOP {statement}; COMMIT; END LOOP; END$$;\n"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            str(cluster.bindir / "postgres"),
            "--single",
            "-D",
            str(cluster.datadir),
            "-c",
            "jit=off",
            database,
        ]
        kwargs: dict = {}
        if cluster.user is not None:
            Path(tmp).chmod(0o777)
            kwargs = {"user": cluster.user.pw_uid, "group": cluster.user.pw_gid}
        # Single-user mode ends a statement at a blank line, not at a semicolon.
        run = subprocess.run(
            cmd,
            input=script.replace(";\n", ";\n\n"),
            capture_output=True,
            text=True,
            cwd=tmp,
            **kwargs,
        )
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or not found or "ERROR" in run.stdout:
        raise RuntimeError(f"valgrind run failed: {run.stdout[-2000:]}{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.instructions", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 1
    cluster = TempCluster().start()
    try:
        setup(cluster)
        # The single-user server needs the data directory to itself.
        cluster.stop_server()
        results: dict[str, dict[str, float]] = {}
        updated = 0  # rows of the tables taken by UPDATE runs so far
        inserted = 0  # INSERT runs so far
        for name, (statement, rows) in STATEMENTS.items():
            short, long = (200, 400) if rows == 1 else (10, 20)
            per_row = {}
            for case, (table, _) in CASES.items():
                counts = []
                for loops in (short, long):
                    if "INSERT" in name:
                        base, inserted = ROWS + 1 + inserted * 100_000, inserted + 1
                    else:
                        base, updated = 1 + updated, updated + (loops + 1) * rows
                    sql = statement.format(t=table, base=base)
                    counts.append(instructions(cluster, case, sql, loops))
                per_row[case] = (counts[1] - counts[0]) / ((long - short) * rows)
            results[name] = per_row
        assert updated <= ROWS
    finally:
        cluster.stop()
    print("Server instructions per row (valgrind), watched table against the same table unwatched")
    print(
        "| statement          | unwatched | watched, wanted (added) | watched, not wanted (added) |"
    )
    print(
        "|--------------------|-----------|-------------------------|-----------------------------|"
    )
    for name, r in results.items():
        wanted, unwanted = r["wanted"] - r["plain"], r["unwanted"] - r["plain"]
        print(
            f"| {name:18} | {r['plain'] / 1000:8.1f}k | {wanted / 1000:14.1f}k "
            f"({r['wanted'] / r['plain']:4.2f}x) | {unwanted / 1000:18.1f}k "
            f"({r['unwanted'] / r['plain']:4.2f}x) |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
