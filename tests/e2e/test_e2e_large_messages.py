"""Large messages and BDAT abuse (issue 7, item 10 and a suspected item).

Before the fix a 19 MiB message raised a worker by ~65 MiB that stayed: the
body was copied several times on its way to the database. Now the session
makes one copy of the body (dot-unstuffed in place when it has dot lines),
rebuilds its input buffer so the megabytes go, and the spool writes our
header and the client's body into the database blob in place.
"""

from __future__ import annotations

import time

import pytest

from .helpers import ALICE, RawSMTP, Server, ServerPool, session

SIZE = 20 * 1024 * 1024
MIB = 1024


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB, once the last message's objects are gone."""
    time.sleep(0.5)
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found["VmRSS"], found["VmHWM"]


@pytest.fixture(scope="module")
def big(servers: ServerPool) -> Server:
    return servers.create("big", users=[ALICE], limits={"max_message_size": 30 * 1024 * 1024})


def _big_message(n: int) -> bytes:
    line = b"x" * 998 + b"\r\n"
    head = f"From: {ALICE.address}\r\nTo: r@example.net\r\nSubject: big {n}\r\n\r\n".encode()
    # A dot-stuffed line in the middle, so the unstuffing path runs too.
    return head + line * (SIZE // 2000) + b"..dot line\r\n" + line * (SIZE // 2000)


def _send_big(client: RawSMTP, n: int) -> None:
    client.transaction(ALICE.address, ["r@example.net"])
    assert client.command("DATA").code == 354
    client.send(_big_message(n) + b".\r\n")
    assert client.reply(timeout=60).code == 250


def test_large_messages_leave_no_memory_behind(big: Server) -> None:
    size_kib = SIZE // 1024
    with session(big, user=ALICE) as client:
        for n in range(3):  # the first ones also warm up TLS, threads, SQLite, malloc
            _send_big(client, n)
        rss_before, hwm_before = memory_kib(big.pid)
        for n in range(3, 7):
            _send_big(client, n)
        rss_after, hwm_after = memory_kib(big.pid)
    # At the peak, one copy of the body plus its input buffer, not five...
    assert hwm_after - hwm_before < 2 * size_kib, (hwm_before, hwm_after)
    # ...and each message's memory is given back once it is stored (before the
    # fix a worker kept growing by tens of MiB per large message).
    assert rss_after - rss_before < 4 * MIB, (rss_before, rss_after)
    raw = big.raw(big.messages()[0]["id"])
    assert b"\r\n.dot line\r\n" in raw and b"\r\n..dot line" not in raw


def test_bdat_before_login_is_answered_and_the_connection_closed(big: Server) -> None:
    with RawSMTP.connect(big.starttls_port) as client:
        client.ehlo()
        client.send(b"BDAT 999999999999 LAST\r\n")
        reply = client.reply()
        assert reply.status == "530 5.7.0", str(reply)
        assert client.wait_closed(5)


def test_bdat_over_the_size_limit_is_answered_and_the_connection_closed(big: Server) -> None:
    with session(big, user=ALICE) as client:
        client.transaction(ALICE.address, ["r@example.net"])
        client.send(b"BDAT 999999999999 LAST\r\n")
        assert client.reply().status == "552 5.3.4"
        assert client.wait_closed(5)
