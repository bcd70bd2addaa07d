"""The benchmark: write-path cost, latency, throughput, backlog, isolation, fan-out.

    python -m tests.bench [--quick] [--dsn DSN] [--json PATH]

Starts what it needs: a durable throwaway PostgreSQL (fsync and
synchronous_commit on) unless --dsn names a server (a superuser DSN; the
benchmark creates and drops its own databases there), a fast keep-alive HTTP
receiver in its own process, and dispatchers as real subprocesses. Every
figure is printed with the baseline it is compared against, measured in the
same run. --quick is a seconds-long smoke run of every figure (numbers from
it mean little). It asserts nothing about absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dispatcher import db
from dispatcher.delivery import Job
from dispatcher.pgcluster import TempCluster, find_bindir, free_port
from tests.bench import create_tables

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Scale:
    seconds: float  # each pgbench run
    rounds: int  # write path: baseline and watched runs alternate this many times
    rows: int  # multi-row statements: 100-row statements per run
    backlog: int  # throughput backlog
    big_backlog: int  # figure 5
    latency_seconds: float
    slow: int
    isolation: int
    fanout_changes: int


FULL = Scale(
    seconds=5,
    rounds=3,
    rows=300,
    backlog=20000,
    big_backlog=100000,
    latency_seconds=10,
    slow=3000,
    isolation=10000,
    fanout_changes=400,
)
QUICK = Scale(
    seconds=1.5,
    rounds=1,
    rows=20,
    backlog=600,
    big_backlog=2000,
    latency_seconds=1.5,
    slow=150,
    isolation=400,
    fanout_changes=12,
)


class Bench:
    """The server, the receiver, and fresh databases for each scenario."""

    def __init__(self, dsn: str | None, scale: Scale) -> None:
        self.scale = scale
        self.cluster: TempCluster | None = None
        if dsn is None:
            self.cluster = TempCluster(durable=True, settings={"max_connections": "300"}).start()
            dsn = self.cluster.dsn()
        self.admin_dsn = dsn
        self.dbs: list[str] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="danbyte-bench-"))
        self.port = free_port()
        self.receiver = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.receiver", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.receiver.stdout is not None
        assert self.receiver.stdout.readline().strip() == "ready"
        self.template = self._create("danbyte_bench_tpl")
        with psycopg.connect(self.dsn(self.template), autocommit=True) as c:
            create_tables(c)
            # The reference point: a bare row trigger inserting into an
            # outbox like ours, with none of the product's duties (no SECURITY
            # DEFINER, no wake-up check, no acting user or request id). A copy
            # of the outbox that no dispatcher reads, so that it can run while
            # one is busy, too.
            c.execute("CREATE TABLE reference (LIKE bench INCLUDING ALL)")
            c.execute("CREATE TABLE reference_outbox (LIKE webhooks.outbox INCLUDING ALL)")
            c.execute(
                "CREATE FUNCTION public.bench_reference_capture() RETURNS trigger "
                "LANGUAGE plpgsql AS $$BEGIN "
                "INSERT INTO public.reference_outbox (event, object_type, object_id, postchange, "
                "changed_at, db_user) VALUES ('create', 'public.reference', to_json(NEW.id), "
                "to_json(NEW), clock_timestamp(), current_user); RETURN NULL; END$$"
            )
            c.execute(
                "CREATE TRIGGER reference AFTER INSERT ON reference FOR EACH ROW "
                "EXECUTE FUNCTION public.bench_reference_capture()"
            )
            # The latency baseline: a row trigger that NOTIFYs the new id, for
            # tests.bench.listener to post at once.
            c.execute("CREATE TABLE bare (LIKE bench INCLUDING ALL)")
            c.execute(
                "CREATE FUNCTION public.bench_bare_notify() RETURNS trigger LANGUAGE plpgsql "
                "AS $$BEGIN PERFORM pg_notify('bench_bare', NEW.id::text); RETURN NULL; END$$"
            )
            c.execute(
                "CREATE TRIGGER bare AFTER INSERT ON bare FOR EACH ROW "
                "EXECUTE FUNCTION public.bench_bare_notify()"
            )

    def dsn(self, dbname: str) -> str:
        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return make_conninfo("", **params)

    def _create(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as c:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                q += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            c.execute(q)
        self.dbs.append(name)
        return name

    def fresh(self) -> str:
        """A new database with the schema, a watched ``bench`` table and an unwatched ``plain``."""
        return self.dsn(self._create(f"danbyte_bench_{uuid.uuid4().hex[:8]}", self.template))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, list[tuple[int, float]]]:
        """What the receiver got since the last call (and reset it)."""
        with urllib.request.urlopen(self.url("/stats"), timeout=30) as r:
            return {k: [tuple(x) for x in v] for k, v in json.loads(r.read()).items()}

    @contextmanager
    def dispatchers(self, dsn: str, n: int = 1, *args: str) -> Iterator[list[subprocess.Popen]]:
        procs = []
        for i in range(n):
            log = open(self.logdir / f"dispatcher-{uuid.uuid4().hex[:6]}-{i}.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dispatcher", "run", "--dsn", dsn, *args],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        try:
            yield procs
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()

    def close(self) -> None:
        self.receiver.terminate()
        self.receiver.wait(10)
        if self.cluster is not None:
            self.cluster.stop()
        else:
            with psycopg.connect(self.admin_dsn, autocommit=True) as c:
                for name in self.dbs:
                    c.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )


def add_webhook(bench: Bench, dsn: str, name: str, path: str, **fields: Any) -> None:
    """A webhook sending to ``path`` on the benchmark's receiver."""
    with psycopg.connect(dsn, autocommit=True) as c:
        db.add_webhook(c, {"name": name, "payload_url": bench.url(path), **fields})


def load_backlog(dsn: str, n: int, start: int = 1) -> None:
    """``n`` committed changes (inserts) in 10,000-row statements."""
    with psycopg.connect(dsn, autocommit=True) as c:
        for lo in range(start, start + n, 10000):
            hi = min(lo + 9999, start + n - 1)
            c.execute(
                "INSERT INTO bench (id) SELECT g FROM generate_series(%s::bigint, %s) g", (lo, hi)
            )


def rate_from(times: list[float]) -> float:
    """Deliveries per second between the first and the last arrival."""
    if len(times) < 2:
        return float("nan")
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0])


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (None: gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User plus system CPU seconds used so far by each of ``pids`` still running."""
    used = {}
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def exited_cpu_seconds(pid: int) -> float:
    """CPU seconds used by the children ``pid`` has reaped so far (for the
    postmaster: by the server processes that exited, such as closed sessions)."""
    fields = _stat(pid)
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def machine_cpu() -> dict[str, float]:
    """CPU seconds the whole machine has spent so far: ``busy`` (user, system,
    interrupts), ``idle`` (iowait included) and ``steal`` (taken by the hypervisor)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "busy": (user + nice + system + irq + softirq) / hz,
        "idle": (idle + iowait) / hz,
        "steal": steal / hz,
    }


def postmaster_pid(bench: Bench) -> int | None:
    """The throwaway server's postmaster (None with --dsn)."""
    if bench.cluster is None:
        return None
    try:
        return int((bench.cluster.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def server_pids(bench: Bench) -> list[int]:
    """The throwaway server's processes now (none with --dsn: it may be elsewhere)."""
    postmaster = postmaster_pid(bench)
    if postmaster is None:
        return []
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids


@dataclass
class CpuSnapshot:
    at: float  # time.monotonic()
    processes: dict[str, dict[int, float]]  # group -> pid -> CPU seconds so far
    machine: dict[str, float]  # machine_cpu()


def drain(
    bench: Bench,
    dsn: str,
    n_expected: int,
    procs: int = 1,
    args: tuple[str, ...] = (),
    path_filter: Callable[[str], bool] = lambda p: True,
    timeout: float = 900,
    cpu: dict[str, float] | None = None,
) -> tuple[float, list[float]]:
    """Start dispatchers on a loaded backlog; return (deliveries/s, arrival times).

    With ``cpu``, also fill it with the cores used while deliveries arrived
    (from the first poll that saw some to the end: start-up does not count)
    by the dispatchers, the server and the receiver, and by the whole machine
    (``machine_busy``, ``machine_idle``, ``machine_steal``).
    """
    bench.stats()
    times: list[float] = []

    def snapshot(running: list[subprocess.Popen]) -> CpuSnapshot:
        pids = {"dispatchers": [p.pid for p in running], "receiver": [bench.receiver.pid]}
        if bench.cluster is not None:  # with --dsn the server is not ours to measure
            pids["postgres"] = server_pids(bench)
        used = {k: cpu_seconds(v) for k, v in pids.items()}
        return CpuSnapshot(time.monotonic(), used, machine_cpu())

    first: CpuSnapshot | None = None
    with bench.dispatchers(dsn, procs, *args) as running:
        deadline = time.monotonic() + timeout
        while len(times) < n_expected:
            time.sleep(0.5)
            for path, got in bench.stats().items():
                if path_filter(path):
                    times.extend(t for _, t in got)
            if cpu is not None and first is None and times:
                first = snapshot(running)
            if time.monotonic() > deadline:
                raise RuntimeError(f"benchmark: {len(times)} of {n_expected} deliveries arrived")
            for p in running:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"benchmark: a dispatcher exited with code {p.returncode} after"
                        f" {len(times)} of {n_expected} deliveries: see its log in {bench.logdir}"
                    )
        if cpu is not None and first is not None:
            # Processes started after the first snapshot count from zero;
            # those that ended meanwhile are not counted.
            end = snapshot(running)
            wall = max(end.at - first.at, 1e-9)
            for k, now in end.processes.items():
                before = first.processes[k]
                cpu[k] = sum(t - before.get(pid, 0.0) for pid, t in now.items()) / wall
            for k, t in end.machine.items():
                cpu[f"machine_{k}"] = (t - first.machine[k]) / wall
    return rate_from(times), times


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


@dataclass
class Writes:
    """One pgbench run."""

    tps: float
    #: Server CPU per transaction of the sessions pgbench opened, in
    #: microseconds: the writers' own cost, trigger included (nan with --dsn).
    cpu_us: float


def pgbench(bench: Bench, dsn: str, script: str, seconds: float, clients: int = 8) -> Writes:
    bindir = find_bindir()
    assert bindir is not None
    postmaster = postmaster_pid(bench)
    exited_before = exited_cpu_seconds(postmaster) if postmaster else 0.0
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    out = subprocess.run(
        [
            str(bindir / "pgbench"),
            "-n",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(max(1, round(seconds))),
            "-f",
            f.name,
            dsn,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(f.name)
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    assert m and done, out
    cpu_us = float("nan")
    if postmaster is not None:
        # The sessions' processes count once the postmaster has reaped them:
        # their CPU is then in its children's total. (Other server processes
        # that exited meanwhile, such as an autovacuum worker, count too.)
        with psycopg.connect(dsn, autocommit=True) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'"
            ).fetchone() != (0,):
                time.sleep(0.05)
        time.sleep(0.2)  # from leaving pg_stat_activity to being reaped
        exited = exited_cpu_seconds(postmaster) - exited_before
        cpu_us = exited / max(1, int(done.group(1))) * 1e6
    return Writes(float(m.group(1)), cpu_us)


def median_ratio(runs: list[Writes], baselines: list[Writes]) -> float:
    """The median of the rounds' throughput ratios (runs and baselines alternated)."""
    return statistics.median(r.tps / b.tps for r, b in zip(runs, baselines, strict=True))


def figure_write_path(bench: Bench) -> dict[str, Any]:
    s = bench.scale
    dsn = bench.fresh()
    with psycopg.connect(dsn, autocommit=True) as c:
        for t in ("bench", "plain", "reference"):
            c.execute(
                sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, 10000) g").format(
                    sql.Identifier(t)
                )
            )
        c.execute("TRUNCATE webhooks.outbox, webhooks.capture")
    insert = (
        "\\set id random(100000000, 999999999999)\n"
        "INSERT INTO {t} (id) VALUES (:id) ON CONFLICT DO NOTHING;\n"
    )
    update = "\\set id random(1, 10000)\nUPDATE {t} SET n = n + 1 WHERE id = :id;\n"
    # First, before the runs below leave big tables and autovacuum work behind.
    results: dict[str, Any] = multirow(bench)

    def pair(
        label: str, reference: bool = False, ops: tuple[str, ...] = ("insert", "update")
    ) -> None:
        # Baseline and watched runs alternate, and the ratio is the median of
        # the rounds' ratios: this machine's speed drifts between runs.
        for op in ops:
            script = insert if op == "insert" else update
            runs: dict[str, list[Writes]] = {"plain": [], "bench": [], "reference": []}
            tables = ["plain", "bench"] + (["reference"] if reference and op == "insert" else [])
            for _ in range(s.rounds):
                for t in tables:
                    runs[t].append(pgbench(bench, dsn, script.format(t=t), s.seconds))
            results[f"{op}_{label}"] = {
                "tps": statistics.median(r.tps for r in runs["bench"]),
                "baseline_tps": statistics.median(r.tps for r in runs["plain"]),
                "ratio": median_ratio(runs["bench"], runs["plain"]),
                "cpu_us_per_tx": statistics.median(r.cpu_us for r in runs["bench"]),
                "baseline_cpu_us_per_tx": statistics.median(r.cpu_us for r in runs["plain"]),
                "runs": {t: [vars(r) for r in rs] for t, rs in runs.items() if rs},
            }
            if runs["reference"]:
                results[f"{op}_{label}_reference"] = {
                    "tps": statistics.median(r.tps for r in runs["reference"]),
                    "ratio": median_ratio(runs["reference"], runs["plain"]),
                    "cpu_us_per_tx": statistics.median(r.cpu_us for r in runs["reference"]),
                }

    # A webhook wants every change (the triggers capture only what some
    # enabled webhook wants), but no dispatcher sends them yet.
    add_webhook(bench, dsn, "fast", "/fast")
    pair("no_dispatcher", reference=True)
    # Busy: a backlog that lasts through all five runs keeps the dispatcher
    # delivering while the unwatched baseline, the watched table and the
    # reference are measured, so all pay for the CPU it uses.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("TRUNCATE webhooks.outbox, webhooks.capture")
    load_backlog(dsn, int(5 * s.rounds * s.seconds * 1500) + 2000, start=10_000_000)
    with bench.dispatchers(dsn, 1):
        time.sleep(0.5)
        pair("dispatcher_busy", reference=True)
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute(
                "SELECT outbox_backlog + deliveries_due FROM webhooks.status"
            ).fetchone()
        results["busy_backlog_left"] = int(row[0]) if row else 0
    bench.stats()
    # The control: the dispatcher drains a backlog in another database of the
    # same server, so it competes for the CPU and the WAL as above but never
    # touches this database's queue tables.
    elsewhere = bench.fresh()
    add_webhook(bench, elsewhere, "fast", "/fast")
    load_backlog(elsewhere, int(2 * s.rounds * s.seconds * 1500) + 2000)
    with bench.dispatchers(elsewhere, 1):
        time.sleep(0.5)
        pair("dispatcher_busy_elsewhere", ops=("insert",))
    bench.stats()
    # Idle: no webhook wants these writes. The dispatcher lowers the wanted
    # events when it starts, so the triggers capture nothing.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM webhooks.webhook")
    with bench.dispatchers(dsn, 1):
        time.sleep(1.0)
        pair("dispatcher_idle")

    return results


def multirow(bench: Bench) -> dict[str, Any]:
    """Multi-row statements, one client, no dispatcher, in a database of their own:
    the trigger's own cost per row (rounds alternate, median of the differences)."""
    s = bench.scale
    dsn = bench.fresh()
    add_webhook(bench, dsn, "fast", "/fast")  # no dispatcher runs: nothing is sent
    rows = 100

    def per_row(table: str, stmt: str) -> float:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(
                sql.SQL("TRUNCATE {}, webhooks.outbox, webhooks.capture").format(
                    sql.Identifier(table)
                )
            )
            c.execute(
                sql.SQL("INSERT INTO {} (id) SELECT g FROM generate_series(1, %s) g").format(
                    sql.Identifier(table)
                ),
                (rows,),
            )
            start = time.perf_counter()
            for i in range(s.rows):
                c.execute(sql.SQL(stmt).format(sql.Identifier(table)), {"i": i, "rows": rows})
            return (time.perf_counter() - start) / (s.rows * rows) * 1e6

    ins = (
        "INSERT INTO {} (id) SELECT g FROM generate_series(%(i)s * %(rows)s + 1000000, "
        "%(i)s * %(rows)s + 1000000 + %(rows)s - 1) g"
    )
    upd = "UPDATE {} SET n = n + 1"
    results: dict[str, Any] = {}
    for op, stmt in (("insert", ins), ("update", upd)):
        runs: dict[str, list[float]] = {"plain": [], "bench": []}
        for _ in range(s.rounds):
            for t in runs:
                runs[t].append(per_row(t, stmt))
        results[f"multirow_{op}"] = {
            "us_per_row": statistics.median(runs["bench"]),
            "baseline_us_per_row": statistics.median(runs["plain"]),
            "added_us_per_row": statistics.median(
                [w - p for w, p in zip(runs["bench"], runs["plain"], strict=True)]
            ),
        }
    return results


def client(bench: Bench, path: str, n: int, *args: str) -> float:
    """Deliveries/s of ``python -m tests.bench.client`` (a baseline without the database)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.client", bench.url(path), str(n), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    bench.stats()
    return float(out.stdout.strip())


def figure_throughput(bench: Bench) -> dict[str, Any]:
    n = bench.scale.backlog
    # The bare loop runs right before and right after the one-process drain,
    # and the ratio takes their mean: this machine's speed drifts by tens of
    # percent within minutes.
    loops = [client(bench, "/baseline", n)]
    # The dispatcher's own sending path with as many threads as it uses for
    # one webhook (--per-webhook-concurrency), and no database work at all.
    sender = client(bench, "/baseline", n, "--threads", "16", "--sender")
    results: dict[str, Any] = {"sender_16_threads": sender}
    for procs in (1, 2):
        dsn = bench.fresh()
        add_webhook(bench, dsn, "fast", "/fast")
        load_backlog(dsn, n)
        cpu: dict[str, float] = {}
        rate, _ = drain(bench, dsn, n, procs, cpu=cpu)
        results[f"processes_{procs}"] = rate
        results[f"cpu_processes_{procs}"] = cpu
        if procs == 1:
            loops.append(client(bench, "/baseline", n))
    baseline = statistics.mean(loops)
    results["baseline_requests_loop"] = baseline
    results["baseline_requests_loop_runs"] = loops
    results["ratio_1_process_to_baseline"] = results["processes_1"] / baseline
    results["ratio_2_to_1_processes"] = results["processes_2"] / results["processes_1"]
    return results


def latency_run(
    bench: Bench, dsn: str, rate: float, seconds: float, table: str = "bench", path: str = "/lat"
) -> dict[str, float]:
    """Commit single-row inserts into ``table`` at ``rate``/s; latency = arrival at
    ``path`` - commit."""
    commits: dict[int, float] = {}
    lock = threading.Lock()
    threads_n = 4 if rate > 150 else 1
    total = int(rate * seconds)
    t0 = time.time() + 0.5
    base = int(time.time() * 1000) % 1_000_000 * 1_000_000

    def worker(k: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            for i in range(k, total, threads_n):
                due = t0 + i / rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                c.execute(
                    sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(table)),
                    (base + i,),
                )
                done = time.time()
                with lock:
                    commits[base + i] = done

    bench.stats()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got: dict[int, float] = {}
    deadline = time.monotonic() + 60
    while len(got) < total and time.monotonic() < deadline:
        for oid, t in bench.stats().get(path, []):
            got[oid] = t
        time.sleep(0.2)
    lat = sorted((got[i] - commits[i]) * 1000 for i in commits if i in got)
    if len(lat) < total:
        raise RuntimeError(f"benchmark: {total - len(lat)} latency deliveries missing")
    return {
        "rate": rate,
        "changes": total,
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
    }


def figure_latency(bench: Bench, capacity: float) -> dict[str, Any]:
    dsn = bench.fresh()
    add_webhook(bench, dsn, "lat", "/lat")
    listener = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.listener", dsn, bench.url("/lat-bare")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        bare = latency_run(bench, dsn, 200.0, bench.scale.latency_seconds, "bare", "/lat-bare")
    finally:
        listener.terminate()
        listener.wait(10)
    with bench.dispatchers(dsn, 1):
        time.sleep(1.0)
        light = latency_run(bench, dsn, 200.0, bench.scale.latency_seconds)
        half = latency_run(bench, dsn, capacity / 2, bench.scale.latency_seconds)
    return {"light": light, "half_capacity": half, "capacity_used": capacity, "bare_light": bare}


def figure_slow(bench: Bench) -> dict[str, Any]:
    # 8 in flight at 20 ms each is 400/s: below the fast-receiver ceiling
    # (figure 3), so this measures how well requests overlap, not the CPU.
    conc = 8
    dsn = bench.fresh()
    add_webhook(bench, dsn, "slow", "/slow/20")
    load_backlog(dsn, bench.scale.slow)
    rate, _ = drain(
        bench,
        dsn,
        bench.scale.slow,
        1,
        ("--workers", str(conc), "--per-webhook-concurrency", str(conc)),
    )
    ideal = conc / 0.020
    # The same concurrency from bare requests loops (one Session per thread):
    # what this receiver and a Python client reach without the dispatcher.
    bare = client(bench, "/slow/20", min(bench.scale.slow, 2000), "--threads", str(conc))
    return {
        "concurrency": conc,
        "rate": rate,
        "ideal": ideal,
        "ratio": rate / ideal,
        "bare_threads": bare,
        "ratio_to_bare": rate / bare,
    }


def rss_peak_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) if m else 0


QUEUE_ROWS_READ = (
    "SELECT coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0) "
    "FROM pg_stat_user_tables WHERE schemaname = 'webhooks' "
    "AND relname IN ('delivery', 'outbox', 'capture')"
)


def quiet(dsn: str, timeout: float = 300) -> None:
    """Wait (up to ``timeout``) until nothing else runs in this database: no autovacuum
    worker (one working off the backlog's dead rows competes with the claim for the
    same 2 cores) and no other client backend (a stopped dispatcher's backend adds
    the rows it read to the statistics only as it exits)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as c:
        while time.monotonic() < deadline:
            row = c.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type IN ('autovacuum worker', 'client backend') "
                "AND datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
            if not row or not row[0]:
                return
            time.sleep(0.5)


def claim_ms(dsn: str) -> tuple[float, int]:
    """Time of one turn that fans out and leases 200 fresh changes, with no
    dispatcher running, on a connection that has already made a turn (as a
    running dispatcher's has), and the queue-table rows that connection read
    meanwhile."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT coalesce(max(id), 0) FROM bench").fetchone()
        start_id = int(row[0]) + 1 if row else 1
        read_before = int(c.execute(QUEUE_ROWS_READ).fetchone()[0])  # type: ignore[index]
    with db.connect(dsn) as c:  # the dispatcher's own connection settings

        def turn() -> list[Job]:
            return db.cycle(
                c,
                me="bench",
                fan_out_limit=200,
                claim_limit=200,
                per_webhook=200,
                lease=60,
                default_timeout=10,
            ).jobs

        # Nothing is queued yet: this turn only compiles and plans the function.
        turn()
        load_backlog(dsn, 200, start=start_id)
        t = time.perf_counter()
        jobs = turn()
        assert len(jobs) == 200, len(jobs)
        elapsed = (time.perf_counter() - t) * 1000
        # The backend's counts reach the statistics when it next goes idle.
        c.execute("SELECT pg_stat_force_next_flush()")
        with psycopg.connect(dsn, autocommit=True) as other:
            read = int(other.execute(QUEUE_ROWS_READ).fetchone()[0]) - read_before  # type: ignore[index]
        # hand them back so they do not count as lost
        c.execute(
            "DELETE FROM webhooks.delivery WHERE id = ANY(%s::uuid[])",
            ([j.delivery_id for j in jobs],),
        )
        # The rows this read must not land in the next measurement.
        c.execute("SELECT pg_stat_force_next_flush()")
    return elapsed, read


def claims(dsn: str) -> tuple[float, int]:
    """The medians of three :func:`claim_ms`: time, and rows read."""
    runs = []
    for _ in range(3):
        quiet(dsn)
        runs.append(claim_ms(dsn))
    return statistics.median(t for t, _ in runs), int(statistics.median(n for _, n in runs))


def figure_backlog(bench: Bench) -> dict[str, Any]:
    n = bench.scale.big_backlog
    dsn = bench.fresh()
    add_webhook(bench, dsn, "fast", "/big")
    before, read_before = claims(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("TRUNCATE bench")
    load_backlog(dsn, n)
    bench.stats()
    peak = 0
    times: list[float] = []
    with bench.dispatchers(dsn, 1) as (proc,):
        deadline = time.monotonic() + 1800
        while len(times) < n:
            time.sleep(0.5)
            peak = max(peak, rss_peak_kb(proc.pid))
            times.extend(t for _, t in bench.stats().get("/big", []))
            if time.monotonic() > deadline:
                raise RuntimeError("benchmark: backlog not drained")
        peak = max(peak, rss_peak_kb(proc.pid))
    after, read_after = claims(dsn)
    return {
        "changes": n,
        "rate": rate_from(times),
        "peak_rss_mb": peak / 1024,
        "claim_ms_empty": before,
        "claim_ms_after": after,
        "claim_rows_read_empty": read_before,
        "claim_rows_read_after": read_after,
    }


def figure_isolation(bench: Bench) -> dict[str, Any]:
    # Alone and beside the dead endpoint alternate, and the ratio is the median
    # of the rounds' ratios: this machine's speed drifts between runs.
    n = bench.scale.isolation
    alone: list[float] = []
    shared: list[float] = []
    for _ in range(bench.scale.rounds):
        alone_dsn = bench.fresh()
        add_webhook(bench, alone_dsn, "healthy", "/healthy-alone")
        load_backlog(alone_dsn, n)
        alone.append(drain(bench, alone_dsn, n, path_filter=lambda p: p == "/healthy-alone")[0])
        dsn = bench.fresh()
        add_webhook(bench, dsn, "healthy", "/healthy")
        add_webhook(bench, dsn, "dead", "/hang", timeout_seconds=30)
        load_backlog(dsn, n)
        shared.append(drain(bench, dsn, n, path_filter=lambda p: p == "/healthy")[0])
    return {
        "healthy_alone": statistics.median(alone),
        "healthy_with_dead_endpoint": statistics.median(shared),
        "ratio": statistics.median([w / a for w, a in zip(shared, alone, strict=True)]),
        "runs": {"alone": alone, "with_dead_endpoint": shared},
    }


def figure_fanout(bench: Bench, single: float) -> dict[str, Any]:
    k = bench.scale.fanout_changes
    dsn = bench.fresh()
    for i in range(50):
        add_webhook(bench, dsn, f"fan{i}", f"/fan{i}")
    load_backlog(dsn, k)
    rate, _ = drain(bench, dsn, k * 50, path_filter=lambda p: p.startswith("/fan"))
    return {
        "webhooks": 50,
        "changes": k,
        "rate": rate,
        "single_webhook_rate": single,
        "ratio": rate / single,
    }


# ---------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pg = subprocess.run(
        [str((find_bindir() or Path("/usr/bin")) / "postgres"), "--version"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {pg}, "
        f"{platform.system()} {platform.release()}"
    )


def table(r: dict[str, Any]) -> list[str]:
    w = r["write_path"]
    t = r["throughput"]
    lat = r["latency"]
    rows = [
        (
            "1 write path: INSERT tps, dispatcher busy",
            f"{w['insert_dispatcher_busy']['tps']:.0f}",
            f"{w['insert_dispatcher_busy']['baseline_tps']:.0f} unwatched",
            f"{w['insert_dispatcher_busy']['ratio']:.2f}x",
            ">= 0.75x",
        ),
        (
            "1 write path: UPDATE tps, dispatcher busy",
            f"{w['update_dispatcher_busy']['tps']:.0f}",
            f"{w['update_dispatcher_busy']['baseline_tps']:.0f} unwatched",
            f"{w['update_dispatcher_busy']['ratio']:.2f}x",
            ">= 0.75x",
        ),
        (
            "1 write path: INSERT tps, dispatcher busy on another database",
            f"{w['insert_dispatcher_busy_elsewhere']['tps']:.0f}",
            f"{w['insert_dispatcher_busy_elsewhere']['baseline_tps']:.0f} unwatched",
            f"{w['insert_dispatcher_busy_elsewhere']['ratio']:.2f}x",
            "",
        ),
        *[
            (
                f"1 server CPU per transaction, {label}: INSERT / UPDATE us",
                f"{w[f'insert_{key}']['cpu_us_per_tx']:.0f} / "
                f"{w[f'update_{key}']['cpu_us_per_tx']:.0f}",
                f"{w[f'insert_{key}']['baseline_cpu_us_per_tx']:.0f} / "
                f"{w[f'update_{key}']['baseline_cpu_us_per_tx']:.0f} unwatched",
                "",
                "",
            )
            for key, label in (("no_dispatcher", "no dispatcher"), ("dispatcher_busy", "busy"))
        ],
        (
            "1 write path: INSERT tps, no webhook wants them",
            f"{w['insert_dispatcher_idle']['tps']:.0f}",
            f"{w['insert_dispatcher_idle']['baseline_tps']:.0f} unwatched",
            f"{w['insert_dispatcher_idle']['ratio']:.2f}x",
            "as low as possible",
        ),
        (
            "1 write path: UPDATE tps, no webhook wants them",
            f"{w['update_dispatcher_idle']['tps']:.0f}",
            f"{w['update_dispatcher_idle']['baseline_tps']:.0f} unwatched",
            f"{w['update_dispatcher_idle']['ratio']:.2f}x",
            "as low as possible",
        ),
        (
            "1 write path: INSERT tps, no dispatcher",
            f"{w['insert_no_dispatcher']['tps']:.0f}",
            f"{w['insert_no_dispatcher']['baseline_tps']:.0f} unwatched",
            f"{w['insert_no_dispatcher']['ratio']:.2f}x",
            "",
        ),
        *[
            row
            for key, label in (("no_dispatcher", "no dispatcher"), ("dispatcher_busy", "busy"))
            for row in (
                (
                    f"1 reference: bare row trigger into an outbox, {label}",
                    f"{w[f'insert_{key}_reference']['tps']:.0f}",
                    f"{w[f'insert_{key}']['baseline_tps']:.0f} unwatched",
                    f"{w[f'insert_{key}_reference']['ratio']:.2f}x",
                    "",
                ),
                (
                    f"1 reference: server CPU per transaction, {label}, us",
                    f"{w[f'insert_{key}_reference']['cpu_us_per_tx']:.0f}",
                    f"{w[f'insert_{key}']['baseline_cpu_us_per_tx']:.0f} unwatched",
                    "",
                    "",
                ),
            )
        ],
        (
            "1 100-row INSERT: us added per row",
            f"{w['multirow_insert']['added_us_per_row']:.1f}",
            f"{w['multirow_insert']['baseline_us_per_row']:.1f} us/row unwatched",
            "",
            "<= 10",
        ),
        (
            "1 100-row UPDATE: us added per row",
            f"{w['multirow_update']['added_us_per_row']:.1f}",
            f"{w['multirow_update']['baseline_us_per_row']:.1f} us/row unwatched",
            "",
            "",
        ),
        (
            "2 latency at 200/s: p50 / p99 ms",
            f"{lat['light']['p50_ms']:.1f} / {lat['light']['p99_ms']:.1f}",
            "",
            "",
            "<= 2 / 10",
        ),
        (
            "2 latency at 200/s, bare LISTEN + requests loop",
            f"{lat['light']['p50_ms']:.1f} / {lat['light']['p99_ms']:.1f}",
            f"{lat['bare_light']['p50_ms']:.1f} / {lat['bare_light']['p99_ms']:.1f} bare loop",
            "",
            "",
        ),
        (
            f"2 latency at {lat['half_capacity']['rate']:.0f}/s (half capacity): p50 / p99 ms",
            f"{lat['half_capacity']['p50_ms']:.1f} / {lat['half_capacity']['p99_ms']:.1f}",
            "",
            "",
            "<= 15 / 60",
        ),
        (
            "3 throughput, 1 process (deliveries/s)",
            f"{t['processes_1']:.0f}",
            "{:.0f} bare requests loop ({})".format(
                t["baseline_requests_loop"],
                " and ".join(f"{x:.0f}" for x in t["baseline_requests_loop_runs"]),
            ),
            f"{t['ratio_1_process_to_baseline']:.2f}x",
            ">= 0.8x",
        ),
        (
            "3 the dispatcher's sender, 16 threads, no database",
            f"{t['sender_16_threads']:.0f}",
            f"{t['baseline_requests_loop']:.0f} bare requests loop",
            f"{t['sender_16_threads'] / t['baseline_requests_loop']:.2f}x",
            "",
        ),
        (
            "3 throughput, 2 processes (deliveries/s)",
            f"{t['processes_2']:.0f}",
            f"{t['processes_1']:.0f} one process",
            f"{t['ratio_2_to_1_processes']:.2f}x",
            ">= 1.5x",
        ),
        *[
            (
                f"3 cores used, {k} process{'es' if k > 1 else ''}: dispatcher/server/receiver",
                " / ".join(
                    f"{t[f'cpu_processes_{k}'].get(x, float('nan')):.2f}"
                    for x in ("dispatchers", "postgres", "receiver")
                ),
                "machine: {:.2f} busy, {:.2f} idle, {:.2f} stolen of {}".format(
                    *(
                        t[f"cpu_processes_{k}"].get(f"machine_{x}", float("nan"))
                        for x in ("busy", "idle", "steal")
                    ),
                    os.cpu_count(),
                ),
                "",
                "",
            )
            for k in (1, 2)
        ],
        (
            f"4 slow receiver (20 ms), {r['slow']['concurrency']} in flight",
            f"{r['slow']['rate']:.0f}",
            f"{r['slow']['ideal']:.0f} ideal",
            f"{r['slow']['ratio']:.2f}x",
            ">= 0.85x",
        ),
        (
            f"4 slow receiver, {r['slow']['concurrency']} bare requests threads",
            f"{r['slow']['rate']:.0f}",
            f"{r['slow']['bare_threads']:.0f} bare loops",
            f"{r['slow']['ratio_to_bare']:.2f}x",
            "",
        ),
        (
            f"5 backlog of {r['backlog']['changes']}: drain rate",
            f"{r['backlog']['rate']:.0f}",
            f"{t['processes_1']:.0f} (figure 3)",
            f"{r['backlog']['rate'] / t['processes_1']:.2f}x",
            "",
        ),
        (
            "5 backlog: dispatcher peak RSS (MB)",
            f"{r['backlog']['peak_rss_mb']:.0f}",
            "",
            "",
            "flat",
        ),
        (
            "5 turn taking 200 changes, ms: after backlog",
            f"{r['backlog']['claim_ms_after']:.1f}",
            f"{r['backlog']['claim_ms_empty']:.1f} on an empty history",
            f"{r['backlog']['claim_ms_after'] / r['backlog']['claim_ms_empty']:.2f}x",
            "",
        ),
        (
            "5 turn taking 200, queue rows read: after",
            f"{r['backlog']['claim_rows_read_after']}",
            f"{r['backlog']['claim_rows_read_empty']} on an empty history",
            "",
            "",
        ),
        (
            "6 healthy webhook beside a dead endpoint",
            f"{r['isolation']['healthy_with_dead_endpoint']:.0f}",
            f"{r['isolation']['healthy_alone']:.0f} alone",
            f"{r['isolation']['ratio']:.2f}x",
            ">= 0.9x",
        ),
        (
            "7 fan-out to 50 webhooks (deliveries/s)",
            f"{r['fanout']['rate']:.0f}",
            f"{r['fanout']['single_webhook_rate']:.0f} one webhook (figure 3)",
            f"{r['fanout']['ratio']:.2f}x",
            "",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    head = ("figure", "measured", "baseline (same run)", "ratio", "target")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--dsn", help="superuser DSN of a server to use instead of a throwaway one")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the throwaway cluster is stopped and removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    bench = Bench(args.dsn, scale)
    results: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("write_path", lambda: figure_write_path(bench)),
            ("throughput", lambda: figure_throughput(bench)),
            ("latency", lambda: figure_latency(bench, results["throughput"]["processes_1"])),
            ("slow", lambda: figure_slow(bench)),
            ("backlog", lambda: figure_backlog(bench)),
            ("isolation", lambda: figure_isolation(bench)),
            ("fanout", lambda: figure_fanout(bench, results["throughput"]["processes_1"])),
        ]
        for name, step in steps:
            t = time.time()
            results[name] = step()
            print(f"# {name}: done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    finally:
        bench.close()
    results["seconds"] = time.time() - started
    print(
        f"Danbyte Webhooks benchmark{' (--quick: smoke run)' if args.quick else ''}, "
        f"{results['date']}, {results['machine']}"
    )
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
