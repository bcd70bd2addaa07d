"""Throwaway PostgreSQL clusters from the machine's server binaries.

Used by ``danbyte-webhooks demo``, the test suite and the benchmark. A cluster
lives in a temporary directory, listens on 127.0.0.1 on a free port, trusts
local connections, and is removed by :meth:`TempCluster.stop`. When the
current user is root (PostgreSQL refuses to run as root) the server runs as
an unprivileged OS user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_MISSING = (
    "No PostgreSQL server binaries found (initdb, pg_ctl): install them "
    "(Debian/Ubuntu: apt-get install postgresql) or pass --dsn for an existing database."
)


class PostgresNotFound(RuntimeError):
    """No usable initdb/pg_ctl on this machine."""

    def __init__(self, message: str = SERVER_MISSING) -> None:
        super().__init__(message)


def find_bindir() -> Path | None:
    """Return the directory holding initdb and pg_ctl, or None.

    Looks on PATH, then at ``pg_config --bindir``, then at the newest
    ``/usr/lib/postgresql/*/bin``.
    """
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent  # symlinks point into the real bindir
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            out = ""
        if out and (Path(out) / "initdb").exists() and (Path(out) / "pg_ctl").exists():
            return Path(out)

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresNotFound(
        "Running as root and no unprivileged 'postgres' or 'nobody' user exists to run "
        "PostgreSQL: create one (useradd postgres) or pass --dsn."
    )


class TempCluster:
    """A PostgreSQL server in a temporary directory. Not thread-safe."""

    def __init__(self, *, durable: bool = False, settings: dict[str, str] | None = None) -> None:
        """Create (but do not start) a cluster.

        ``durable=False`` turns off fsync for speed (tests); benchmarks pass
        ``durable=True`` so commits cost what they cost in production.
        """
        bindir = find_bindir()
        if bindir is None:
            raise PostgresNotFound()
        self.bindir = bindir
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="danbyte-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = 0
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root),
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        if not durable:
            self.settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        self.settings.update(settings or {})
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict = {"capture_output": True, "text": True, "cwd": str(self.root)}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
            kwargs["env"] = {**os.environ, "HOME": str(self.root), "USER": self.user.pw_name}
        result = subprocess.run(cmd, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{Path(cmd[0]).name} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _start_server(self) -> None:
        opts = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                f"-p {self.port} {opts}",
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def start(self) -> TempCluster:
        """Start the server on a free port (retrying if the port is taken)."""
        last_error: Exception | None = None
        for _ in range(5):
            self.port = free_port()
            try:
                self._start_server()
                return self
            except RuntimeError as exc:
                last_error = exc
                time.sleep(0.2)
        raise RuntimeError(f"could not start PostgreSQL: {last_error}; see {self.logfile}")

    def stop_server(self) -> None:
        """Stop the server (fast: clients are disconnected), keeping its files."""
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"]
        )

    def restart(self) -> None:
        """Stop (fast) and start again on the same port: clients lose their connections."""
        self.stop_server()
        self._start_server()

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A libpq connection string for a database of this cluster."""
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def stop(self) -> None:
        """Stop the server immediately and delete its files."""
        if self.datadir.exists():
            self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> TempCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
