"""Clients that pipeline commands and never read the replies (issue 7, item 1).

Before the fix, one plaintext connection that pipelined 2 MB of ``EHLO x`` and
read nothing grew the worker by ~36 MiB: every reply went into the transport's
write buffer and nothing stopped the reading. Now the driver stops reading
while its replies are not being taken (write-side flow control), an
unauthenticated client gets at most ``max_commands_before_login`` commands,
and a connection that stops reading is cut after ``command_timeout``.

Memory is read from /proc: with ``workers = 1`` in capture mode the server
is one process. The margins are generous (a few hundred KiB per connection
allowed against tens of MiB before the fix).
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from .helpers import ALICE, HOST, TLS_NAME, RawSMTP, Server, ServerPool, session

CONNECTIONS = 4
FLOOD_BYTES = 6 * 1024 * 1024  # per connection; its replies are 2-25x that
PER_CONNECTION_KIB = 400  # "a few hundred KiB per connection"
SLACK_KIB = 6 * 1024  # allocator noise, TLS state, buffers of the test's own handshakes


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def uncapped(servers: ServerPool) -> Server:
    """No cap on commands before login: only flow control bounds the output."""
    return servers.create(
        "uncapped",
        users=[ALICE],
        limits={"max_commands_before_login": 0, "max_bad_commands": 1000000},
    )


def flood(sock: socket.socket | ssl.SSLSocket, line: bytes, total: int, seconds: float) -> int:
    """Send ``line`` repeatedly without reading; return the bytes the server took.

    Stops when ``total`` bytes went out, or when the server has taken nothing
    for half a second (it stopped reading: flow control), bounded by ``seconds``.
    """
    chunk = line * max(1, 16384 // len(line))
    sent = 0
    deadline = time.monotonic() + seconds
    stalled_since: float | None = None
    sock.settimeout(0.2)
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
            stalled_since = None
        except (TimeoutError, ssl.SSLWantWriteError, BlockingIOError):
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 0.5:
                break
        except (ConnectionError, ssl.SSLError):
            break
    return sent


@contextlib.contextmanager
def open_connections(
    server: Server, count: int, *, tls: bool, login: bool
) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            port = server.implicit_port if tls else server.starttls_port
            raw = socket.create_connection((HOST, port), timeout=10)
            sock: socket.socket = raw
            if tls:
                sock = server.client_context().wrap_socket(raw, server_hostname=TLS_NAME)
            socks.append(sock)
            client = RawSMTP(sock)
            assert client.reply().code == 220
            if login:
                assert client.command("EHLO flood.example").code == 250
                token = base64.b64encode(f"\0{ALICE.address}\0{ALICE.password}".encode())
                assert client.command(b"AUTH PLAIN " + token).code == 235
        yield socks
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def assert_bounded(server: Server, line: bytes, *, tls: bool, login: bool) -> None:
    before = rss_kib(server.pid)
    with open_connections(server, CONNECTIONS, tls=tls, login=login) as socks:
        taken = [flood(sock, line, FLOOD_BYTES, 20) for sock in socks]
        time.sleep(0.5)
        grown = rss_kib(server.pid) - before
        # The server stopped reading each one well before the flood was over.
        # Kernel socket buffers on loopback auto-tune to many MB, so how much the
        # server "took" says little; its own memory is what must stay bounded.
        assert sum(taken) > CONNECTIONS * 1024 * 1024, taken
        limit = CONNECTIONS * PER_CONNECTION_KIB + SLACK_KIB
        assert grown < limit, f"worker grew {grown} KiB for {CONNECTIONS} connections ({line!r})"
    # And it still serves everyone else at once.
    with session(server) as client:
        assert client.auth_plain(ALICE.address, ALICE.password).code == 235


@pytest.mark.parametrize(
    "line",
    [b"EHLO x\r\n", b"HELP\r\n", b"MAIL FROM:<a@example.com>\r\n", b"STARTTLS\r\n",
     b"XYZZY\r\n"],
)  # fmt: skip
def test_pipelining_without_reading_before_login_keeps_memory_bounded(
    uncapped: Server, line: bytes
) -> None:
    assert_bounded(uncapped, line, tls=True, login=False)


@pytest.mark.parametrize("line", [b"NOOP\r\n", b"RCPT TO:<a@example.com>\r\n"])
def test_pipelining_without_reading_after_login_keeps_memory_bounded(
    uncapped: Server, line: bytes
) -> None:
    assert_bounded(uncapped, line, tls=True, login=True)


def test_plaintext_ehlo_flood_is_bounded(uncapped: Server) -> None:
    assert_bounded(uncapped, b"EHLO x\r\n", tls=False, login=False)


def test_commands_before_login_are_capped(server: Server) -> None:
    """The default cap: 50 command lines before login, then 421 and the door."""
    with RawSMTP.connect(server.starttls_port) as client:
        client.send(b"NOOP\r\n" * 200)
        replies = [client.reply() for _ in range(51)]
        assert [r.code for r in replies[:50]] == [250] * 50
        assert replies[50].status == "421 4.7.0", str(replies[50])
        assert "before authentication" in replies[50].text
        assert client.wait_closed(5)


def test_a_client_that_stops_reading_is_cut(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create(
        "stops-reading", limits={"max_commands_before_login": 0, "command_timeout": 2}
    )
    with open_connections(server, 1, tls=False, login=False) as (sock,):
        flood(sock, b"EHLO x\r\n", FLOOD_BYTES, 10)
        started = time.monotonic()
        events = server.wait_for_event("timeout", timeout=10)
        assert events["reason"] == "not_reading"
        assert time.monotonic() - started < 6
        assert server.wait_for_event("disconnect", timeout=5)
