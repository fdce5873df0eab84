"""Abuse limits over real sockets: failed-login throttling, sending quotas, per-IP
connection limits, and app credentials (all changed with the CLI while running).

Clients play other hosts by binding to other loopback addresses (127.0.N.x:
all of 127.0.0.0/8 is loopback on Linux); the server always listens on
127.0.0.1. Each test uses its own addresses and users, so the counters one
test drives (kept in the database, shared by the workers) never reach another.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from .helpers import (
    ALICE,
    BOB,
    RawSMTP,
    Reply,
    Server,
    ServerPool,
    User,
    make_message,
    session,
    wait_until,
)
from .security_helpers import new_credential

RCPT = "rcpt@example.net"
NO_THROTTLE = {
    "ip_per_minute": 0,
    "ip_per_day": 0,
    "network_per_minute": 0,
    "network_per_day": 0,
    "account_per_hour": 0,
    "connection_delay_after": 0,
    "connection_close_after": 0,
}


def _login(server: Server, user: str, password: str, source: str) -> Reply:
    with session(server, source=source) as client:
        return client.auth_plain(user, password)


# ------------------------------------------------------------------ per-connection rules


@pytest.fixture(scope="module")
def per_connection(servers: ServerPool) -> Server:
    rules = dict(NO_THROTTLE, connection_delay_after=2, connection_close_after=4)
    return servers.create(
        "per-connection",
        users=[ALICE],
        sections={"auth_throttle": {**rules, "delay_seconds": 0.4}},
    )


def test_failures_on_one_connection_are_slowed_then_cut(per_connection: Server) -> None:
    with session(per_connection, source="127.0.1.1") as client:
        timings = []
        for attempt in range(4):
            started = time.monotonic()
            reply = client.auth_plain(f"guess{attempt}@example.com", "Guess-pw-0Aa")
            timings.append(time.monotonic() - started)
            if attempt < 3:
                assert reply.status == "535 5.7.8", (attempt, str(reply))
        assert reply.code == 421, str(reply)
        assert reply.enhanced == "4.7.0", str(reply)
        assert client.wait_closed(5)
    assert timings[0] < 0.3 and timings[1] < 0.3, timings  # the first two: no delay
    assert timings[2] >= 0.35, timings  # delay_seconds x 1
    assert timings[3] >= 0.75, timings  # delay_seconds x 2
    # A new connection starts counting afresh, and the owner is not locked out.
    assert _login(per_connection, ALICE.address, ALICE.password, "127.0.1.1").code == 235


# ------------------------------------------------------------------ IP and account rules


@pytest.fixture(scope="module")
def throttled(servers: ServerPool) -> Server:
    rules = dict(NO_THROTTLE, ip_per_minute=3, account_per_hour=2)
    return servers.create(
        "throttled",
        workers=2,
        users=[
            User("owner@example.com", "Owner-pw-6Ty1uI"),
            User("victim@example.com", "Victim-pw-2Ws8dF"),
        ],
        sections={"auth_throttle": rules},
    )


def test_ip_rule_refuses_even_the_right_password(throttled: Server) -> None:
    owner = throttled.users["owner@example.com"]
    for n in range(3):  # three failures from 127.0.2.1, against three names
        reply = _login(throttled, f"nobody{n}@example.com", "Nobody-pw-5Rr", "127.0.2.1")
        assert reply.status == "535 5.7.8", str(reply)
    refused = _login(throttled, owner.address, owner.password, "127.0.2.1")
    assert refused.status == "454 4.7.0", str(refused)
    assert re.search(r"try again in \d+ minute", refused.text), str(refused)
    # The rule is per address: a neighbour in the same /24 is not affected.
    assert _login(throttled, owner.address, owner.password, "127.0.2.2").code == 235
    event = throttled.wait_for_event("auth.throttled", lambda e: e["client_ip"] == "127.0.2.1")
    assert event["scope"] == "ip"
    assert event["user"] == owner.address


def test_account_rule_spares_the_owners_networks(throttled: Server) -> None:
    victim = throttled.users["victim@example.com"]
    # The owner logs in from home (127.0.3.0/24): that network is now known.
    assert _login(throttled, victim.address, victim.password, "127.0.3.1").code == 235
    # Someone guesses from two other networks, once each (the IP rule stays quiet).
    for source in ("127.0.4.1", "127.0.5.1"):
        reply = _login(throttled, victim.address, "Guess-pw-3Ee", source)
        assert reply.status == "535 5.7.8", (source, str(reply))
    # Now the account rule holds for strangers, even with the right password...
    assert _login(throttled, victim.address, victim.password, "127.0.6.1").status == "454 4.7.0"
    # ...but not for the owner's own network.
    assert _login(throttled, victim.address, victim.password, "127.0.3.200").code == 235


# ------------------------------------------------------------------ sending quotas


@pytest.fixture(scope="module")
def quota_server(servers: ServerPool) -> Server:
    return servers.create("quotas", workers=2, users=[ALICE, BOB])


def _mail_from(server: Server, user: User, sender: str) -> Reply:
    with session(server, user=user) as client:
        return client.command(f"MAIL FROM:<{sender}>")


def test_hourly_message_limit_set_while_running(quota_server: Server) -> None:
    quota_server.cli("user", "limits", ALICE.address, "--messages-per-hour", "2")
    for n in range(2):  # on separate connections: the count is shared by the workers
        with session(quota_server, user=ALICE) as client:
            client.send_mail(
                ALICE.address,
                [RCPT],
                make_message(from_addr=ALICE.address, to=[RCPT], subject=f"quota {n}"),
            )
    refused = _mail_from(quota_server, ALICE, ALICE.address)
    assert refused.status == "451 4.7.1", str(refused)
    assert "Hourly message limit (2)" in refused.text, str(refused)
    quota_server.cli("user", "limits", ALICE.address, "--messages-per-hour", "0")  # unlimited
    assert _mail_from(quota_server, ALICE, ALICE.address).status == "250 2.1.0"


def test_daily_recipient_limit(quota_server: Server) -> None:
    quota_server.cli("user", "limits", BOB.address, "--recipients-per-day", "3")
    with session(quota_server, user=BOB) as client:
        client.send_mail(
            BOB.address,
            ["a@example.net", "b@example.net"],
            make_message(from_addr=BOB.address, to=[RCPT], subject="two recipients"),
        )
        assert client.command(f"MAIL FROM:<{BOB.address}>").status == "250 2.1.0"
        assert client.command("RCPT TO:<c@example.net>").status == "250 2.1.5"
        refused = client.command("RCPT TO:<d@example.net>")
        assert refused.status == "451 4.7.1", str(refused)
    assert quota_server.wait_for_event("rcpt.refused", lambda e: e["user"] == BOB.address)


# ------------------------------------------------------------------ per-IP connections


@pytest.fixture(scope="module")
def per_ip(servers: ServerPool) -> Server:
    return servers.create(
        "per-ip",
        workers=2,
        sections={
            "connection_limits": {
                "per_ip_concurrent": 2,
                "per_ip_per_minute": 0,
                # 127.0.0.1 runs the readiness probes; 127.0.9.0/24 shows the exemption.
                "exempt": ["127.0.0.1/32", "127.0.9.0/24"],
            }
        },
    )


def test_concurrent_connections_per_ip(per_ip: Server) -> None:
    context = per_ip.client_context()
    first = RawSMTP.connect(per_ip.implicit_port, tls=context, source="127.0.7.1")
    second = RawSMTP.connect(per_ip.starttls_port, source="127.0.7.1")
    try:
        # Both workers count together: the third is refused whichever worker takes it.
        for _ in range(3):
            with RawSMTP.connect(per_ip.starttls_port, source="127.0.7.1") as third:
                assert third.greeting.status == "421 4.7.0", str(third.greeting)
                assert third.wait_closed(5)
        with RawSMTP.connect(per_ip.starttls_port, source="127.0.8.1") as other:
            assert other.greeting.code == 220
        exempt = [RawSMTP.connect(per_ip.starttls_port, source="127.0.9.1") for _ in range(4)]
        for client in exempt:
            assert client.greeting.code == 220
            client.close()
    finally:
        first.close()
        second.close()

    def room_again() -> bool:
        with RawSMTP.connect(per_ip.starttls_port, source="127.0.7.1") as client:
            return client.greeting.code == 220

    wait_until(room_again, 5, 0.05, "the closed connections to be uncounted")


# ------------------------------------------------------------------ app credentials


@pytest.fixture(scope="module")
def credentials_server(servers: ServerPool) -> Server:
    return servers.create("credentials", workers=2, users=[ALICE, BOB])


def test_app_credential_login_and_revoke(credentials_server: Server) -> None:
    server = credentials_server
    secret = new_credential(server, ALICE.address, "mailer")
    subject = "sent with an app credential"
    for _ in range(4):  # several connections, so both workers see it
        assert _login(server, ALICE.address, secret, "127.0.0.1").status == "235 2.7.0"
    with session(server) as client:
        client.login(ALICE.address, secret)
        client.send_mail(
            ALICE.address, [RCPT], make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
        )
    event = server.wait_for_event("auth.ok", lambda e: e.get("credential") == "mailer")
    assert event["user"] == ALICE.address
    assert subject in server.subjects()
    # The account password still works beside it.
    assert _login(server, ALICE.address, ALICE.password, "127.0.0.1").code == 235

    server.cli("credential", "revoke", ALICE.address, "mailer")
    for _ in range(4):
        assert _login(server, ALICE.address, secret, "127.0.0.1").status == "535 5.7.8"


def test_app_credential_network_and_senders(credentials_server: Server) -> None:
    server = credentials_server
    secret = new_credential(
        server, BOB.address, "office", "--network", "127.0.11.0/24", "--sender", "bob@alias.test"
    )
    assert _login(server, BOB.address, secret, "127.0.0.1").status == "535 5.7.8"
    assert _login(server, BOB.address, secret, "127.0.12.1").status == "535 5.7.8"
    with session(server, source="127.0.11.7") as client:
        client.login(BOB.address, secret)
        # Narrower than the account (@example.org, bob@alias.test): only bob@alias.test.
        assert client.command("MAIL FROM:<someone@example.org>").status == "553 5.7.1"
        assert client.command("MAIL FROM:<bob@alias.test>").status == "250 2.1.0"


def test_failed_starttls_handshakes_do_not_leak_connection_slots(per_ip: Server) -> None:
    """A failed STARTTLS handshake ends the connection and leaves the per-IP slot free.

    (The leak race itself is caught by the next test, which counts sessions.)
    """
    endings = [
        b"this is not a TLS client hello\r\n",  # OpenSSL refuses it at once
        b"\x16\x03\x01\x02\x00" + b"\x01" * 40,  # a truncated record, then EOF
        b"",  # EOF right after the 220
    ]
    for attempt, ending in enumerate(endings * 2):  # each twice: 6 > the limit of 2
        with RawSMTP.connect(per_ip.starttls_port, source="127.0.6.1") as client:
            assert client.greeting.code == 220, f"attempt {attempt}: {client.greeting}"
            client.ehlo()
            assert client.command("STARTTLS").code == 220
            if ending:
                client.send(ending)
            client.sock.shutdown(socket.SHUT_WR)
            assert client.wait_closed(10), f"attempt {attempt}"
    with RawSMTP.connect(per_ip.starttls_port, source="127.0.6.1") as later:
        assert later.greeting.code == 220, str(later.greeting)


def test_client_gone_before_starttls_handshake_frees_its_slot(per_ip: Server) -> None:
    """STARTTLS pipelined with junk, then an immediate close: the slot must come back."""
    # The race (the client gone before the handshake starts) is hit by a few percent of
    # such connections, so make many: each leak would hold one of the 2 slots for good.
    for _ in range(300):
        sock = socket.create_connection(
            ("127.0.0.1", per_ip.starttls_port), timeout=5, source_address=("127.0.5.1", 0)
        )
        try:
            greeting = sock.recv(512)
            if greeting.startswith(b"220"):  # 421 while earlier closes are still in flight
                sock.sendall(b"EHLO x\r\nSTARTTLS\r\nRSET\r\n" + bytes(range(100)))
        finally:
            sock.close()
    # Every session that was let in must end with a disconnect event (a leaked one
    # never does, and keeps its per-IP slot and its place in the worker for good).
    deadline = time.monotonic() + 10
    while True:
        opened = {
            e["session"] for e in per_ip.log_events("connect") if e["client_ip"] == "127.0.5.1"
        }
        closed = {e["session"] for e in per_ip.log_events("disconnect")}
        if opened <= closed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert opened, "no session got in"
    assert opened <= closed, f"{len(opened - closed)} sessions never ended"
    with RawSMTP.connect(per_ip.starttls_port, source="127.0.5.1") as later:
        assert later.greeting.code == 220, str(later.greeting)
