"""The log writer: every line, in order, written out at exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

#: Logs N lines from each of 4 threads, then N from the main thread, and exits
#: without shutting logging down itself: the interpreter's exit does.
SCRIPT = """
import logging, sys, threading
from dispatcher.logs import setup_logging
setup_logging("INFO", sys.argv[1])
log = logging.getLogger("danbyte.test")
n = int(sys.argv[2])
def burst(t):
    for i in range(n):
        log.info("thread %d line %d", t, i, extra={"t": t, "i": i})
threads = [threading.Thread(target=burst, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
for i in range(n):
    log.info("thread %d line %d", 9, i, extra={"t": 9, "i": i})
log.debug("not at INFO")
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_line_is_written_in_order_by_exit(fmt: str) -> None:
    n = 3000
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt, str(n)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = out.stderr.splitlines()
    assert len(lines) == 5 * n, lines[-3:]
    seen: dict[int, list[int]] = {}
    for line in lines:
        if fmt == "json":
            entry = json.loads(line)
            assert entry["level"] == "info" and entry["logger"] == "danbyte.test"
            t, i = entry["t"], entry["i"]
            assert entry["message"] == f"thread {t} line {i}"
        else:
            assert " INFO danbyte.test: thread " in line
            words = line.split()
            t, i = int(words[-3]), int(words[-1])
        seen.setdefault(t, []).append(i)
    assert seen == {t: list(range(n)) for t in (0, 1, 2, 3, 9)}
