"""Settings for the dispatcher daemon, filled from click options (and their env vars)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg.conninfo import conninfo_to_dict, make_conninfo


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced, fit for logs and repr."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable dsn>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"7d"`` or ``"1w"``.

    Raises ValueError with a sentence saying what is accepted.
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration: use a number with s, m, h, d or w, like 7d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def redact_url(url: str) -> str:
    """``url`` without the credentials of its userinfo part."""
    return re.sub(r"//[^/@]*@", "//***@", url)


@dataclass(frozen=True)
class Settings:
    """Everything ``danbyte-webhooks run`` is configured with."""

    dsn: str
    workers: int = 32
    per_webhook_concurrency: int = 16
    poll_interval: float = 5.0
    busy_poll_interval: float = 0.005
    lease_time: float = 60.0
    default_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    batch_size: int = 200
    retry_base: float = 5.0
    proxy: str | None = None
    retention: float = 7 * 86400.0
    log_level: str = "INFO"
    log_format: str = "text"

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.__dataclass_fields__
            if name not in ("dsn", "proxy")
        )
        proxy = redact_url(self.proxy) if self.proxy else None
        return f"Settings(dsn={redact_dsn(self.dsn)!r}, proxy={proxy!r}, {fields})"
