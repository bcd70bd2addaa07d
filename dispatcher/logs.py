"""Logging set-up: text lines or JSON lines on stderr, written by a thread of their own."""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone
from logging.handlers import QueueHandler
from queue import Empty, SimpleQueue

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


#: Records one write takes at most, so a burst is written while it comes.
_BATCH = 1000


class _Handoff(QueueHandler):
    """Queues records as they are, for a writer thread of its own to format and
    write; closing it (``logging.shutdown()``, also run at exit) writes out
    what is queued first.

    The writer takes every record waiting and writes them in one write: at a
    thousand deliveries a second the dispatcher logs a thousand lines, and
    each wake-up and write gives up the interpreter lock, then waits for it
    behind the sender threads.
    """

    def __init__(self, target: logging.StreamHandler) -> None:
        super().__init__(SimpleQueue())
        self.target = target
        self._writer: threading.Thread | None = threading.Thread(
            target=self._write, name="log-writer", daemon=True
        )
        self._writer.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Unlike QueueHandler's, formatting is left to the writer thread: the
        # arguments are plain values that nothing changes afterwards.
        return record

    def _write(self) -> None:
        queue = self.queue
        done = False
        while not done:
            batch = [queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(queue.get_nowait())
                except Empty:
                    break
            if None in batch:  # from close(): what came before it is in this batch
                batch = batch[: batch.index(None)]
                done = True
            lines = []
            for record in batch:
                try:
                    lines.append(self.target.format(record) + "\n")
                except Exception:
                    self.target.handleError(record)
            if lines:
                try:
                    self.target.stream.write("".join(lines))
                    self.target.flush()
                except Exception:
                    self.target.handleError(batch[0])

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self.queue.put_nowait(None)
            writer.join()
        super().close()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the ``danbyte`` loggers to stderr at ``level`` in ``fmt`` ('text' or 'json').

    Formatting and writing happen on a thread of their own. The dispatcher
    logs a line per delivery from its main thread, and a write there gives up
    the interpreter lock, then waits for it behind the sender threads:
    that alone took about a fifth of the main thread's time at 1,000
    deliveries a second.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # No format here shows where a line was logged from, nor the process or
    # thread: do not work them out for every record (the logging HOWTO's
    # "Optimization"). Looking for the caller alone walked the stack at
    # every delivery.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("danbyte")
    for old in root.handlers:
        old.close()
    root.handlers[:] = [_Handoff(handler)]
    root.setLevel(level.upper())
    root.propagate = False
