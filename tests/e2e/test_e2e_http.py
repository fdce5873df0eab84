"""The admin API over HTTP (issue 9, first part): bearer tokens made with the
CLI, the message log read with curl and urllib, JSON errors, revocation at
once. Runs on both storage backends (Makefile E2E_POSTGRES)."""

from __future__ import annotations

import email.policy
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import pytest

from .helpers import (
    ALICE,
    Server,
    ServerPool,
    free_ports,
    make_message,
    session,
    sigterm_right_after_start,
)

RCPT = "someone@example.net"


@pytest.fixture(scope="module")
def api(servers: ServerPool) -> Iterator[tuple[Server, str]]:
    (port,) = free_ports(1)
    server = servers.create(
        "http-api", users=[ALICE], sections={"http": {"address": f"127.0.0.1:{port}"}}
    )
    yield server, f"http://127.0.0.1:{port}"


def _get(url: str, token: str | None = None, raw_header: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if raw_header is not None:
        request.add_header("Authorization", raw_header)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            kind = response.headers.get("Content-Type", "")
            return response.status, json.loads(body) if "json" in kind else body
    except urllib.error.HTTPError as exc:
        assert exc.headers.get("Content-Type") == "application/json", exc.headers
        return exc.code, json.loads(exc.read())


def test_no_token_or_a_wrong_one_is_401_json(api: tuple[Server, str]) -> None:
    server, base = api
    done = subprocess.run(
        ["curl", "-s", "-i", f"{base}/api/v1/messages"],
        capture_output=True,
        timeout=20,
        check=True,
        text=True,
    )
    head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF became LF
    assert head.startswith("HTTP/1.1 401"), head
    assert "www-authenticate: bearer" in head.lower()
    assert json.loads(body)["error"].startswith("a valid API token is needed")
    good = server.api_token("reader", "--read-only")
    for header in (
        "Bearer rgt_" + "A" * 43,
        "Bearer " + good + "x",
        "Basic " + good,
        "Bearer",
        "Bearer " + "x" * 100_00,
        "Bearer r\u00e9sum\u00e9",
    ):
        status, body = _get(f"{base}/api/v1/messages", raw_header=header.encode().decode("latin-1"))
        assert status == 401 and body["error"].startswith("a valid API token"), (header, body)


def test_messages_list_show_and_raw(api: tuple[Server, str]) -> None:
    server, base = api
    token = server.api_token("ops")
    with session(server, user=ALICE) as client:
        queue_id = client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject="seen through the API"),
        )
    status, listed = _get(f"{base}/api/v1/messages?limit=10", token)
    assert status == 200
    mine = [m for m in listed["messages"] if m["id"] == queue_id]
    assert mine and mine[0]["subject"] == "seen through the API"
    assert mine[0]["account"] == ALICE.address and mine[0]["rcpt_to"] == [RCPT]
    # The same records the CLI prints.
    cli = json.loads(server.cli("messages", "list", "--json").stdout)
    assert next(m for m in cli if m["id"] == queue_id) == mine[0]
    status, shown = _get(f"{base}/api/v1/messages/{queue_id}", token)
    assert status == 200 and shown["id"] == queue_id and shown["history"] == []
    status, raw = _get(f"{base}/api/v1/messages/{queue_id}/raw", token)
    assert status == 200 and raw == server.raw(queue_id)
    assert b"Subject: seen through the API" in raw
    # An id in any case is the same message; from/to/subject look in one field each.
    status, lower = _get(f"{base}/api/v1/messages/{queue_id.lower()}", token)
    assert status == 200 and lower == shown
    status, found = _get(
        f"{base}/api/v1/messages?subject=THROUGH%20THE&from={ALICE.address}&to={RCPT}", token
    )
    assert status == 200 and queue_id in [m["id"] for m in found["messages"]]
    status, found = _get(f"{base}/api/v1/messages?from=through", token)
    assert status == 200 and queue_id not in [m["id"] for m in found["messages"]]


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/api/v1/messages/NOPE", 404, "no such message: NOPE"),
        ("/api/v1/messages/NOPE/raw", 404, "no such message: NOPE"),
        ("/api/v1/messages?limit=0", 400, "limit must be a whole number from 1 to 1000"),
        ("/api/v1/messages?limit=abc", 400, "limit must be a whole number from 1 to 1000"),
        ("/api/v1/nothing-here", 404, "Not Found"),
    ],
)
def test_errors_are_json_with_the_right_status(
    api: tuple[Server, str], path: str, status: int, error: str
) -> None:
    server, base = api
    token = server.api_token(f"t-{abs(hash(path)) % 10_000_000}")
    assert _get(base + path, token)[0:1] == (status,)
    assert _get(base + path, token)[1]["error"] == error


def test_a_revoked_token_stops_working_at_once(api: tuple[Server, str]) -> None:
    server, base = api
    token = server.api_token("short-lived")
    assert _get(f"{base}/api/v1/messages", token)[0] == 200
    server.cli("token", "revoke", "short-lived")
    assert _get(f"{base}/api/v1/messages", token)[0] == 401
    listed = json.loads(server.cli("token", "list", "--json").stdout)
    assert "short-lived" not in {t["name"] for t in listed}


def test_sigterm_right_after_start_stops_the_http_process_too(fresh_servers: ServerPool) -> None:
    (port,) = free_ports(1)
    server = fresh_servers.create(
        "http-early", sections={"http": {"address": f"127.0.0.1:{port}"}}, start=False
    )
    ports = [port, server.starttls_port, server.implicit_port]
    assert sigterm_right_after_start(server, ports) == [0, 0, 0]


def test_failed_tokens_are_throttled_like_smtp_logins(fresh_servers: ServerPool) -> None:
    """Guessing tokens costs what guessing passwords costs: the address's window
    fills, then even a good token is 429 with Retry-After; the SMTP door is
    closed to that address too (one set of windows), and no token is logged."""
    (port,) = free_ports(1)
    server = fresh_servers.create(
        "http-throttle",
        users=[ALICE],
        sections={
            "http": {"address": f"127.0.0.1:{port}"},
            "auth_throttle": {"ip_per_minute": 3},
        },
    )
    base = f"http://127.0.0.1:{port}"
    good = server.api_token("ops")
    assert _get(f"{base}/api/v1/messages", good)[0] == 200
    guesses = ["rgt_" + c * 43 for c in "ABC"]
    for guess in guesses:
        assert _get(f"{base}/api/v1/messages", guess)[0] == 401
    status, body = _get(f"{base}/api/v1/messages", "rgt_" + "D" * 43)
    assert status == 429, body
    assert body["error"].startswith("too many failed logins")
    assert body["detail"]["retry_after"] >= 1
    assert _get(f"{base}/api/v1/messages", good)[0] == 429
    with (
        pytest.raises(AssertionError, match=r"^454 4\.7\.0 Too many failed logins"),
        session(server, user=ALICE),
    ):
        pass
    failed = server.log_events("api.auth_failed")
    assert [e["result"] for e in failed] == ["failed"] * 3 + ["throttled"]
    assert all(e["ip"] == "127.0.0.1" for e in failed)
    assert server.secrets_in_log([good, *guesses]) == []


def _raw_http(port: int, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def test_oversized_and_malformed_requests_are_refused_and_it_keeps_serving(
    api: tuple[Server, str],
) -> None:
    server, base = api
    port = int(base.rsplit(":", 1)[1])
    # A declared 2 GB login form: refused before a byte of it is read.
    head = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 2000000000\r\n\r\n"
    )
    assert _raw_http(port, head + b"address=a").startswith(b"HTTP/1.1 413 ")
    # The same without a length (chunked): refused once it passes the limit.
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    reply = _raw_http(
        port,
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    # Garbage, a header too long, a bad method: a 4xx each, never a crash.
    assert _raw_http(port, b"\x16\x03\x01\x00\xff garbage\r\n\r\n")[:12] in (b"HTTP/1.1 400", b"")
    long_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 200_000 + b"\r\n\r\n"
    assert _raw_http(port, long_header)[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 431", b"")
    token = server.api_token("after-abuse")
    assert _get(f"{base}/api/v1/messages", token)[0] == 200


def test_message_filters_and_cursor_pages(api: tuple[Server, str]) -> None:
    """Thirty messages paged seven at a time: each exactly once, newest first,
    while more arrive; the filters combine; bad input is a 400 saying why."""
    server, base = api
    token = server.api_token("pager")
    tag = f"batch-{time.time_ns()}"
    with session(server, user=ALICE) as client:
        ids = [
            client.send_mail(
                ALICE.address,
                [RCPT],
                make_message(from_addr=ALICE.address, to=[RCPT], subject=f"{tag} n{i:02d}"),
            )
            for i in range(30)
        ]
    seen: list[str] = []
    url = f"{base}/api/v1/messages?limit=7&q={tag}"
    for page_number in range(10):
        status, body = _get(url, token)
        assert status == 200, body
        seen += [m["id"] for m in body["messages"]]
        if page_number == 0:  # arrives meanwhile: newer than every page, so in none
            with session(server, user=ALICE) as client:
                client.send_mail(
                    ALICE.address,
                    [RCPT],
                    make_message(from_addr=ALICE.address, to=[RCPT], subject=f"{tag} late"),
                )
        if body["next_cursor"] is None:
            break
        url = f"{base}/api/v1/messages?limit=7&q={tag}&cursor={body['next_cursor']}"
    assert seen == list(reversed(ids))
    status, body = _get(
        f"{base}/api/v1/messages?q={tag.upper()}%20N0&account=ALICE@example.com", token
    )
    assert status == 200 and len(body["messages"]) == 10
    created = server.message(ids[0])["created_at"]  # RFC 3339, whole seconds
    first = datetime.fromisoformat(created).timestamp()
    status, body = _get(f"{base}/api/v1/messages?q={tag}&since={created}&until={first + 1}", token)
    assert ids[0] in [m["id"] for m in body["messages"]]
    assert {m["created_at"] for m in body["messages"]} == {created}
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first + 3600))
    assert len(_get(f"{base}/api/v1/messages?q={tag}&since={iso}", token)[1]["messages"]) == 0
    for query, error in (
        ("cursor=not-a-cursor", "not a cursor"),
        ("since=yesterday", "since must be unix seconds or an RFC 3339 time"),
        ("sort=desc", "unknown parameter: sort"),
        ("limit=1001", "limit must be a whole number from 1 to 1000"),
    ):
        status, body = _get(f"{base}/api/v1/messages?{query}", token)
        assert status == 400 and body["error"].startswith(error), (query, body)


def test_message_headers_and_parts(api: tuple[Server, str]) -> None:
    """Decoded headers, the text and HTML bodies, and each attachment as a
    download that no browser would render (an HTML attachment is octets)."""
    server, base = api
    token = server.api_token("parts")
    message = EmailMessage()
    message["From"] = ALICE.address
    message["To"] = RCPT
    message["Subject"] = "Grüße <b>bold</b>"
    message.set_content("plain body\n")
    message.add_alternative("<p onclick='x()'>html body</p>", subtype="html")
    message.add_attachment(
        b"<script>alert(1)</script>",
        maintype="text",
        subtype="html",
        filename='r\u00e9sum\u00e9"; x=.html',
    )
    with session(server, user=ALICE) as client:
        queue_id = client.send_mail(
            ALICE.address, [RCPT], message.as_bytes(policy=email.policy.SMTP)
        )
    status, shown = _get(f"{base}/api/v1/messages/{queue_id}", token)
    assert status == 200
    assert ["Subject", "Grüße <b>bold</b>"] in shown["headers"]
    status, parts = _get(f"{base}/api/v1/messages/{queue_id}/parts", token)
    assert status == 200
    assert parts["text"] == "plain body\n" and parts["html"] == "<p onclick='x()'>html body</p>\n"
    (attachment,) = parts["attachments"]
    assert attachment["filename"] == 'r\u00e9sum\u00e9"; x=.html'
    assert attachment["content_type"] == "text/html" and attachment["size"] == 25
    request = urllib.request.Request(
        f"{base}/api/v1/messages/{queue_id}/parts/{attachment['index']}"
    )
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read() == b"<script>alert(1)</script>"
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        disposition = response.headers["Content-Disposition"]
    assert disposition == (
        'attachment; filename="r_sum____x_.html";'
        " filename*=UTF-8''r%C3%A9sum%C3%A9%22%3B%20x%3D.html"
    )
    for index in ("0", "99", "-1", "x", "9" * 30):
        status, body = _get(f"{base}/api/v1/messages/{queue_id}/parts/{index}", token)
        assert status == 404 and body["error"].startswith(f"message {queue_id} has no attachment")


def test_the_openapi_document_and_docs_page_need_no_token(api: tuple[Server, str]) -> None:
    _, base = api
    with urllib.request.urlopen(f"{base}/api/v1/openapi.json", timeout=10) as response:
        spec = json.loads(response.read())
    assert spec["openapi"] == "3.1.0" and "/api/v1/messages" in spec["paths"]
    with urllib.request.urlopen(f"{base}/api/v1/docs", timeout=10) as response:
        html = response.read().decode()
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "<code>/api/v1/accounts/{address}/credentials</code>" in html
