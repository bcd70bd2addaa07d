"""Test harness: a real PostgreSQL, one fresh database per test.

If DANBYTE_TEST_DSN is set (a superuser DSN), that server is used. Otherwise a
throwaway cluster is started from the machine's PostgreSQL binaries (one per
xdist worker) and removed at the end. Each test gets a database cloned from a
template that is migrated once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dispatcher import db
from dispatcher.pgcluster import PostgresNotFound, TempCluster
from tests.httpd import Receiver

ROOT = Path(__file__).resolve().parent.parent


def in_threads(work: Callable[[], object], n: int, timeout: float) -> list[BaseException]:
    """Run ``work`` in ``n`` threads at once; return what they raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


class Server:
    """A PostgreSQL server the tests may create databases and roles on."""

    def __init__(self, admin_dsn: str, cluster: TempCluster | None) -> None:
        self.admin_dsn = admin_dsn
        self.cluster = cluster

    def dsn(self, dbname: str, user: str | None = None) -> str:
        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        if user is not None:
            params["user"] = user
            params.pop("password", None)
        return make_conninfo("", **params)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_dsn, autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    dsn = os.environ.get("DANBYTE_TEST_DSN")
    if dsn:
        yield Server(dsn, None)
        return
    try:
        cluster = TempCluster().start()
    except PostgresNotFound as exc:
        pytest.exit(f"{exc} (or set DANBYTE_TEST_DSN to a superuser DSN)", returncode=3)
    try:
        yield Server(cluster.dsn(), cluster)
    finally:
        cluster.stop()


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> str:
    name = f"danbyte_tpl_{_worker()}_{os.getpid()}"
    with pg_server.admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(pg_server.dsn(name), autocommit=True) as conn:
        db.migrate(conn)
    return name


class Database:
    """A fresh database for one test."""

    def __init__(self, server: Server, name: str) -> None:
        self.server = server
        self.name = name
        self.dsn = server.dsn(name)

    def connect(self, user: str | None = None) -> psycopg.Connection:
        return psycopg.connect(self.server.dsn(self.name, user), autocommit=True)

    def dsn_as(self, user: str) -> str:
        return self.server.dsn(self.name, user)


def create_database(server: Server, template: str | None) -> Database:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with server.admin() as conn:
        q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            q = q + sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(q)
    return Database(server, name)


def drop_database(database: Database) -> None:
    with database.server.admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database.name))
        )


@pytest.fixture
def database(pg_server: Server, template_db: str) -> Iterator[Database]:
    """A migrated database of its own."""
    d = create_database(pg_server, template_db)
    yield d
    drop_database(d)


@pytest.fixture
def empty_database(pg_server: Server) -> Iterator[Database]:
    """A database without our schema."""
    d = create_database(pg_server, None)
    yield d
    drop_database(d)


@pytest.fixture
def conn(database: Database) -> Iterator[psycopg.Connection]:
    with database.connect() as c:
        yield c


@pytest.fixture
def make_role(pg_server: Server, database: Database) -> Iterator[Callable[..., str]]:
    """Create LOGIN roles with unique names (optionally members of some roles).

    They are dropped, with what they own in the test database, at the end.
    """
    made: list[str] = []

    def make(prefix: str = "r", member_of: tuple[str, ...] = ()) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with pg_server.admin() as c:
            c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            for group in member_of:
                c.execute(
                    sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(name))
                )
        made.append(name)
        return name

    yield make
    with database.connect() as dc, pg_server.admin() as c:
        for name in made:
            dc.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (made with openssl)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture
def tls_receiver(tls_cert: tuple[str, str]) -> Iterator[Receiver]:
    r = Receiver(*tls_cert)
    yield r
    r.stop()


class Daemon:
    """``danbyte-webhooks run`` as a real subprocess."""

    def __init__(
        self, dsn: str, log_path: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dispatcher",
                "run",
                "--dsn",
                dsn,
                "--poll-interval",
                "0.5",
                "--log-level",
                "DEBUG",
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture
def daemon(database: Database, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start dispatcher subprocesses on the test database; all are killed at the end."""
    started: list[Daemon] = []

    def start(*args: str, dsn: str | None = None, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(dsn or database.dsn, tmp_path / f"daemon{len(started)}.log", *args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
