"""The sender on its own, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from dispatcher.delivery import Sender
from tests.httpd import Receiver
from tests.jobs import make_job


def test_response_headers_are_kept_one_per_name_and_read_case_insensitively(
    receiver: Receiver,
) -> None:
    outcome = Sender().send(make_job(url=receiver.url("/repeated"), body=b"{}"))
    assert (outcome.ok, outcome.status_code, outcome.error) == (False, 503, "HTTP 503")
    assert outcome.response_headers is not None
    assert outcome.response_headers["X-Multi"] == "a, b"
    assert outcome.retry_after == 7.0  # sent as "retry-after"
    assert receiver.wait_for(1, path="/repeated")[0].body == b"{}"


def test_through_a_proxy_the_request_line_carries_the_whole_url(receiver: Receiver) -> None:
    # The receiver stands in for an HTTP proxy: it is sent the absolute URL.
    sender = Sender(proxy=receiver.url(""))
    outcome = sender.send(make_job(url="http://hooks.example.invalid/in?x=1"))
    assert outcome.ok, outcome.error
    assert receiver.wait_for(1, path="http://hooks.example.invalid/in?x=1")


def test_without_a_proxy_the_request_line_carries_the_path(receiver: Receiver) -> None:
    assert Sender().send(make_job(url=receiver.url("/in?x=1"))).ok
    assert receiver.wait_for(1, path="/in?x=1")
