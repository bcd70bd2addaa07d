"""A :class:`~dispatcher.delivery.Job` and its :class:`~dispatcher.delivery.Outcome`
for tests and benchmarks, without a database; and a dispatcher whose turns a
test drives by hand."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from dispatcher.config import Settings
from dispatcher.daemon import Dispatcher
from dispatcher.delivery import Job, Outcome


@contextmanager
def stepped_dispatcher(settings: Settings) -> Iterator[Dispatcher]:
    """A :class:`Dispatcher` that is never run (no threads): the test calls its
    steps. Its database connection and wake-up pipe are closed afterwards."""
    d = Dispatcher(settings)
    try:
        yield d
    finally:
        d._drop_connection()
        os.close(d._rfd)
        os.close(d._wfd)


def make_job(**fields: Any) -> Job:
    """A POST of ``{}`` to a closed port on 127.0.0.1, with ``fields`` overriding that."""
    defaults: dict[str, Any] = {
        "delivery_id": "00000000-0000-0000-0000-000000000000",
        "webhook_id": 1,
        "webhook_name": "w",
        "event": "create",
        "object_type": "t",
        "object_id": 1,
        "is_test": False,
        "attempt": 1,
        "max_attempts": 1,
        "method": "POST",
        "url": "http://127.0.0.1:9/",
        "content_type": "application/json",
        "secret": None,
        "additional_headers": "",
        "verify_tls": True,
        "timeout": 10.0,
        "retry_on_4xx": False,
        "body": b"{}",
    }
    return Job(**{**defaults, **fields})


def make_outcome(job: Job, **fields: Any) -> Outcome:
    """A 200 answer to ``job`` that took 1 ms, with ``fields`` overriding that."""
    defaults: dict[str, Any] = {
        "ok": True,
        "status_code": 200,
        "error": None,
        "duration_ms": 1.0,
        "attempted_at": datetime.now(timezone.utc),
        "request_headers": {},
        "response_headers": {},
        "response_body": "",
    }
    return Outcome(job=job, **{**defaults, **fields})
