"""What happens after an attempt: done, failed, or tried again later."""

from __future__ import annotations

import random
from dataclasses import dataclass

from dispatcher.delivery import Outcome


@dataclass(frozen=True, slots=True)
class Decision:
    """The delivery's next state; ``retry_in`` seconds when it is ``pending`` again."""

    state: str  # 'succeeded' | 'failed' | 'pending'
    retry_in: float | None = None
    disable_reason: str | None = None


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: half to all of ``base * 2**(attempt-1)``, capped."""
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    return ceiling * random.uniform(0.5, 1.0)


def decide(outcome: Outcome, *, base: float = 5.0, cap: float = 3600.0) -> Decision:
    """The next step for the delivery of ``outcome``.

    2xx succeeds. 410 Gone fails and disables the webhook. Connection errors,
    timeouts, 429 and 5xx are retried while attempts remain (honouring
    Retry-After on 429/503); other 4xx only when the webhook allows it; 3xx
    never. Test deliveries are never retried.
    """
    job = outcome.job
    if outcome.ok:
        return Decision("succeeded")
    status = outcome.status_code
    if status == 410 and not job.is_test:
        return Decision("failed", disable_reason="the receiver answered 410 Gone")
    if job.is_test or job.attempt >= job.max_attempts:
        return Decision("failed")
    retryable = (
        status is None
        or status >= 500
        or status == 429
        or (400 <= status < 500 and job.retry_on_4xx)
    )
    if not retryable:
        return Decision("failed")
    if outcome.retry_after is not None:
        return Decision("pending", retry_in=min(cap, outcome.retry_after))
    return Decision("pending", retry_in=backoff(job.attempt, base, cap))
