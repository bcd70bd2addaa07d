"""Signing and sending deliveries: the only module that talks HTTP.

A :class:`Job` is one attempt at one delivery, with everything needed to send
it (the webhook's settings as of the claim). :class:`Sender` turns a job into
an :class:`Outcome`; it never raises for a network or HTTP failure.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import hmac
import math
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest, Response

from dispatcher import __version__

# verify_tls=false is a per-webhook choice the user made on purpose: do not
# warn on every request it applies to.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

USER_AGENT = f"Danbyte-Webhooks/{__version__}"
SIGNATURE_PREFIX = "sha512="
#: At most this many bytes of a response body are read and kept.
RESPONSE_BODY_LIMIT = 4096
#: At most this many response headers (each value cut to 512 chars) are kept.
RESPONSE_HEADERS_LIMIT = 40
REDACTED_SIGNATURE = "sha512=<redacted>"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Danbyte-Signature`` value: HMAC-SHA512 of the raw ``body`` keyed with ``secret``."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()


def verify_signature(body: bytes, signature_header: str | None, secret: str) -> bool:
    """True if ``signature_header`` is the signature of ``body`` under ``secret``.

    Compares in constant time. A missing or malformed header gives False.
    """
    if not signature_header or not signature_header.startswith(SIGNATURE_PREFIX):
        return False
    expected = sign(secret, body).encode()
    return hmac.compare_digest(expected, signature_header.strip().encode())


@functools.lru_cache(maxsize=1024)
def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """``"Name: value"`` lines (already validated by the database) as pairs."""
    pairs = []
    for line in text.split("\n"):
        if not line:
            continue
        name, _, value = line.partition(":")
        pairs.append((name, value.strip()))
    return tuple(pairs)


@functools.lru_cache(maxsize=1024)
def _prepared_url(method: str, url: str) -> requests.PreparedRequest:
    """A request with method and URL parsed once per webhook URL (a hot-path saving)."""
    request = requests.PreparedRequest()
    request.prepare_method(method)
    request.prepare_url(url, None)
    return request


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt at one delivery."""

    delivery_id: str
    webhook_id: int
    webhook_name: str
    event: str
    object_type: str | None
    object_id: Any
    is_test: bool
    attempt: int
    max_attempts: int
    method: str
    url: str
    content_type: str
    secret: str | None = field(repr=False)
    additional_headers: str
    verify_tls: bool
    timeout: float
    retry_on_4xx: bool
    body: bytes = field(repr=False)
    #: ``time.monotonic()`` after which the job must not start: its lease
    #: would end before the request does (another dispatcher may take it).
    send_by: float = math.inf


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened when a job was sent. ``ok`` means a 2xx answer."""

    job: Job
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: float
    attempted_at: datetime
    request_headers: dict[str, str]
    response_headers: dict[str, str] | None = None
    response_body: str | None = None
    retry_after: float | None = None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps (urllib3 nests errors several levels deep)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (getattr(e, "reason", None), e.__cause__, e.__context__, *e.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def describe_error(exc: BaseException, job: Job) -> str:
    """A readable one-line reason for a failed request, without the URL's path or query."""
    causes = list(_causes(exc))
    for e in causes:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS error: certificate verify failed: {e.verify_message}"
    for e in causes:
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {e.reason or e}"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"connection timed out after {job.timeout:g}s"
    if isinstance(exc, requests.exceptions.ReadTimeout | urllib3.exceptions.ReadTimeoutError):
        return f"no response within {job.timeout:g}s"
    for e in causes:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "could not resolve the host name"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(e, socket.timeout | TimeoutError):
            return f"no response within {job.timeout:g}s"
    for e in causes:
        if type(e).__name__ in ("RemoteDisconnected", "ProtocolError", "IncompleteRead"):
            return "connection closed by the server before a complete response"
    return f"request failed: {type(exc).__name__}"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _Adapter(HTTPAdapter):
    """``requests``' transport, minus per-request work a webhook never needs.

    Both methods are the hooks ``requests`` documents for subclassing. Without
    a proxy the request line carries only the path, as in ``requests``; the
    response keeps its headers (already case-insensitive) and raw body, but no
    cookie jar or text encoding is worked out for it. That is a tenth of the
    Python function calls of each request (934 down to 844, by cProfile).
    """

    def __init__(self, proxied: bool) -> None:
        super().__init__(pool_connections=256, pool_maxsize=1, max_retries=0)
        self._proxied = proxied

    def request_url(self, request: PreparedRequest, proxies: dict[str, str] | None) -> str:
        if self._proxied:
            return super().request_url(request, proxies)
        return request.path_url

    def build_response(self, req: PreparedRequest, resp: Any) -> Response:
        response = Response()
        response.status_code = resp.status
        response.headers = resp.headers  # type: ignore[assignment]  # a case-insensitive mapping too
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


class Sender:
    """Sends jobs over keep-alive connections, one ``requests`` HTTPAdapter per thread.

    The adapter is ``requests``' transport without the Session layer (cookies,
    hooks, redirect handling, environment settings), none of which a webhook
    needs: proxies come only from ``proxy`` (never from the environment),
    redirects are never followed, and every request has the job's timeout.
    """

    def __init__(self, *, proxy: str | None = None) -> None:
        self._proxies = {"http": proxy, "https": proxy} if proxy else {}
        self._local = threading.local()

    def _adapter(self) -> HTTPAdapter:
        adapter = getattr(self._local, "adapter", None)
        if adapter is None:
            # One request at a time per thread, to many hosts: keep a connection
            # to each of up to 256 hosts; retry nothing (retries are ours to decide).
            adapter = _Adapter(proxied=bool(self._proxies))
            self._local.adapter = adapter
        return adapter

    @staticmethod
    def headers(job: Job) -> tuple[dict[str, str], dict[str, str]]:
        """The request headers, and the same with the signature redacted (for the log)."""
        headers = {
            "User-Agent": USER_AGENT,
            "Content-Type": job.content_type,
            "X-Danbyte-Event": job.event,
            "X-Danbyte-Delivery": job.delivery_id,
        }
        for name, value in parse_headers(job.additional_headers):
            headers[name] = value
        logged = dict(headers)
        if job.secret:
            headers["X-Danbyte-Signature"] = sign(job.secret, job.body)
            logged["X-Danbyte-Signature"] = REDACTED_SIGNATURE
        return headers, logged

    def send(self, job: Job) -> Outcome:
        """Send ``job`` once and report what happened. Never raises for network errors."""
        headers, logged = self.headers(job)
        attempted_at = datetime.now(timezone.utc)
        start = time.perf_counter()
        try:
            request = _prepared_url(job.method, job.url).copy()
            request.prepare_headers(headers)
            request.prepare_body(job.body, None)
            response = self._adapter().send(
                request,
                stream=True,
                timeout=job.timeout,
                verify=job.verify_tls,
                proxies=self._proxies,
            )
            complete = False
            try:
                raw = response.raw.read(RESPONSE_BODY_LIMIT + 1, decode_content=True) or b""
                complete = len(raw) <= RESPONSE_BODY_LIMIT
            finally:
                if complete:
                    response.raw.release_conn()  # body fully read: reuse the connection
                else:
                    response.close()  # a huge body, or a failed read: drop the connection
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            return Outcome(
                job=job,
                ok=False,
                status_code=None,
                error=describe_error(exc, job),
                duration_ms=(time.perf_counter() - start) * 1000.0,
                attempted_at=attempted_at,
                request_headers=logged,
            )
        duration_ms = (time.perf_counter() - start) * 1000.0
        status = response.status_code
        ok = 200 <= status < 300
        error = None
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
        elif not ok:
            error = f"HTTP {status}"
        # One entry per header name (repeated headers joined with ", ").
        kept = [(k, response.headers[k]) for k in list(response.headers)[:RESPONSE_HEADERS_LIMIT]]
        return Outcome(
            job=job,
            ok=ok,
            status_code=status,
            error=error,
            duration_ms=duration_ms,
            attempted_at=attempted_at,
            request_headers=logged,
            response_headers={k: v[:512] for k, v in kept},
            # PostgreSQL text cannot hold NUL characters
            response_body=raw[:RESPONSE_BODY_LIMIT]
            .decode("utf-8", "replace")
            .replace("\x00", "\ufffd"),
            retry_after=parse_retry_after(response.headers.get("Retry-After"))
            if status in (429, 503)
            else None,
        )
