"""End to end: bounces and delay warnings that reach the sender (issue 10, part 3).

With ``[delivery] bounce_to = "sender"`` (the default outside capture mode) a
DSN for a local account is delivered like any message: in mx mode to the MX of
the sender's domain (routes apply), in smarthost mode through the smarthost.
Here an SMTP sink stands in for the sender's mailbox: example.test's MX (a
fresh 127.66.x.y address found through ``FakeDNS``), or the smarthost itself.
Each DSN must arrive from the null sender (``MAIL FROM:<>``) as a proper
multipart/report, DKIM-signed with the key of the hostname's parent domain,
and nothing may loop: a DSN that fails is recorded and never bounced.
``bounce_to = "capture"`` keeps the old behaviour (the DSN stays in the log).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import dkim
import pytest

from fakes.dns_server import FakeDNS
from fakes.smtp_sink import Received, SMTPSink

from .delivery_helpers import (
    DSN,
    WAIT,
    DeliveryServer,
    TomlData,
    delete_leftovers,
    delivery_toml,
    dkim_txt_records,
    find_dsns,
    history,
    loopback_address,
    parse_dsn,
    submit_one,
    wait_dsns,
    wait_status,
)
from .helpers import ServerPool, User, free_ports

HOSTNAME = "relay.example.test"  # bounces come From MAILER-DAEMON@relay.example.test
ALICE = User("alice@example.test", "Alice-bounce-pw-5Qm8Zr2x")
BOB = User("bob@example.test", "Bob-bounce-pw-7Hd3Wp9c")  # his mailbox refuses bounces
CAROL = User("carol@routed.test", "Carol-bounce-pw-4Kx6Tn1v")  # routed.test has a route
BODY_MARKER = "A body line that no bounce may carry: 0c41e7d2."
QUIET = 1.5  # seconds in which a loop (a DSN of a DSN) would have shown up


class NamedServer(DeliveryServer):
    """A ``DeliveryServer`` whose ``[server] hostname`` is ``HOSTNAME``."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text(encoding="utf-8")
        assert 'hostname = "localhost"' in text
        text = text.replace('hostname = "localhost"', f'hostname = "{HOSTNAME}"', 1)
        self.config_path.write_text(text, encoding="utf-8")


def _server(pool: ServerPool, name: str, toml: str, users: Sequence[User]) -> NamedServer:
    server = NamedServer(pool.base / name, extra_toml=toml)
    pool.servers.append(server)
    for user in users:
        server.add_user(user)
    server.cli("dkim", "generate", "example.test")  # the hostname's parent domain
    server.start()
    return server


def _settings(**extra: TomlData) -> dict[str, TomlData]:
    return {
        "retry_schedule": [1],
        "delay_warning_after": 1,  # warn at the first deferral after a second
        "max_age": 600,
        "connect_timeout": 3,
        "command_timeout": 10,
        **extra,
    }


@dataclass
class Mx:
    """mx mode: hard.test's MX refuses nobody@ and defers busy@; example.test's MX
    is the senders' mailbox; routed.test's mail goes through a route."""

    server: NamedServer
    remote: SMTPSink  # the recipients' MX
    mailbox: SMTPSink  # example.test's MX: alice's and bob's mailbox
    routed: SMTPSink  # the smarthost of the route for routed.test: carol's mailbox
    capture: NamedServer  # the same, with bounce_to = "capture"


@dataclass
class Smarthost:
    """smarthost mode: one sink is the smarthost, and so also the way to the senders."""

    server: NamedServer
    relay: SMTPSink


def _remote_rules(sink: SMTPSink) -> None:
    sink.reject_recipient("nobody@hard.test", "550 5.1.1 <nobody@hard.test>: No such user")
    sink.reject_recipient("busy@hard.test", "451 4.2.0 Mailbox busy, try later")


@pytest.fixture(scope="module")
def mx(servers: ServerPool) -> Iterator[Mx]:
    [port] = free_ports(1)
    remote = SMTPSink(loopback_address(), port, hostname="mx.hard.test")
    mailbox = SMTPSink(loopback_address(), port, hostname="mx.example.test")
    routed = SMTPSink(loopback_address(), 0, hostname="smtp.routed.test")
    sinks = [remote, mailbox, routed]
    with FakeDNS() as dns:
        try:
            for sink in sinks:
                sink.start()
            _remote_rules(remote)
            mailbox.reject_recipient(BOB.address, "550 5.7.1 We take no bounces")
            dns.add_mx("hard.test", [(10, "mx.hard.test")])
            dns.add_a("mx.hard.test", remote.host)
            dns.add_mx("example.test", [(10, "mx.example.test")])
            dns.add_a("mx.example.test", mailbox.host)
            # No DNS at all for routed.test: only the route can reach it.
            base = _settings(
                mode="mx",
                resolvers=[dns.address],
                mx_port=port,
                allow_private_targets=True,  # the sinks are on 127.66.x.y
            )
            route: dict[str, TomlData] = {
                "domain": "routed.test",
                "host": routed.host,
                "port": routed.port,
                "tls": "none",
            }
            sender = _server(
                servers, "mx", delivery_toml(base, routes=[route]), [ALICE, BOB, CAROL]
            )  # bounce_to left out: "sender" is the default in mx mode
            capture = _server(
                servers,
                "mx-capture",
                delivery_toml({**base, "bounce_to": "capture"}, routes=[route]),
                [ALICE],
            )
            yield Mx(sender, remote, mailbox, routed, capture)
        finally:
            for sink in sinks:
                sink.stop()


@pytest.fixture(scope="module")
def smarthost(servers: ServerPool) -> Iterator[Smarthost]:
    relay = SMTPSink(loopback_address(), 0, hostname="smarthost.test")
    try:
        relay.start()
        _remote_rules(relay)
        toml = delivery_toml(
            _settings(mode="smarthost"),
            smarthost={"host": relay.host, "port": relay.port, "tls": "none"},
        )
        yield Smarthost(_server(servers, "smarthost", toml, [ALICE]), relay)
    finally:
        relay.stop()


# ------------------------------------------------------------------ checks


def _dsns_to(sink: SMTPSink, rcpt: str, about: str) -> list[Received]:
    """The DSNs ``sink`` received for ``rcpt`` that report on message ``about``."""
    marker = f"X-Relaygate-Queue-ID: {about}".encode()
    return [m for m in sink.messages if m.rcpt_to == [rcpt] and marker in m.data]


def _wait_dsn(sink: SMTPSink, rcpt: str, about: str) -> Received:
    sink.wait_until(lambda: bool(_dsns_to(sink, rcpt, about)), WAIT)
    [received] = _dsns_to(sink, rcpt, about)
    return received


def _check_arrived(
    server: DeliveryServer,
    sink: SMTPSink,
    received: Received,
    *,
    rcpt: str,
    subject: str,
    about: str,
) -> DSN:
    """A DSN from <> to ``rcpt``: a multipart/report that DKIM-verifies, and a
    delivered message of its own in the log (never captured)."""
    assert received.mail_from == ""  # MAIL FROM:<>: no bounce of this bounce
    mail = [
        e.text
        for e in sink.events
        if e.connection_id == received.connection_id and e.text.upper().startswith("MAIL ")
    ]
    assert mail and all(m.split(" ")[1] == "FROM:<>" for m in mail), mail
    dsn = parse_dsn("", {}, received.data)  # multipart/report, delivery-status, headers
    assert dsn.subject == subject
    assert dsn.message["To"] == rcpt
    assert dsn.message["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>"
    assert dsn.message["Auto-Submitted"] == "auto-replied"
    assert dsn.per_message["reporting-mta"] == f"dns; {HOSTNAME}"
    assert dsn.about() == about
    assert BODY_MARKER.encode() not in received.data  # the original's header only
    # Signed as example.test (the hostname's parent domain), and it verifies.
    records = dkim_txt_records(server, "example.test")

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes:
        key = (name.decode() if isinstance(name, bytes) else name).rstrip(".").lower()
        return records.get(key, "").encode()

    assert b"d=example.test" in received.data.split(b"\r\n\r\n", 1)[0]
    assert dkim.verify(received.data, dnsfunc=dnsfunc)
    # In the message log like any delivery: from <>, delivered, with its history.
    [logged] = find_dsns(server, about)
    assert (logged.entry["mail_from"], logged.entry["rcpt_to"]) == ("", [rcpt])
    wait_status(server, logged.queue_id, "delivered")
    [attempt] = history(server, logged.queue_id)
    assert (attempt.outcome, attempt.recipient) == ("delivered", rcpt)
    return dsn


def _no_loop(server: DeliveryServer, about: str, dsn_id: str) -> None:
    """One DSN about the message, none about the DSN, a while later."""
    time.sleep(QUIET)
    assert len(find_dsns(server, about)) == 1
    assert find_dsns(server, dsn_id) == []


# ------------------------------------------------------------------ mx mode


def test_mx_bounce_is_delivered_to_the_senders_mx(mx: Mx) -> None:
    queue_id = submit_one(
        mx.server,
        ALICE,
        ["nobody@hard.test"],
        "mx: to a user who is not there",
        body=BODY_MARKER + "\r\n",
    )
    wait_status(mx.server, queue_id, "failed")
    received = _wait_dsn(mx.mailbox, ALICE.address, queue_id)
    dsn = _check_arrived(
        mx.server,
        mx.mailbox,
        received,
        rcpt=ALICE.address,
        subject="Undelivered Mail Returned to Sender",
        about=queue_id,
    )
    [block] = dsn.recipients
    assert block["final-recipient"] == "rfc822; nobody@hard.test"
    assert (block["action"], block["status"]) == ("failed", "5.1.1")
    assert block["diagnostic-code"] == "smtp; 550 5.1.1 <nobody@hard.test>: No such user"
    assert "Subject: mx: to a user who is not there" in dsn.headers
    assert mx.mailbox.commands(received.connection_id).count("DATA") == 1
    [logged] = find_dsns(mx.server, queue_id)
    [attempt] = history(mx.server, logged.queue_id)
    assert attempt.host == f"mx.example.test[{mx.mailbox.host}]:{mx.mailbox.port}"
    created = mx.server.wait_for_event("dsn.created", lambda e: e.get("about") == queue_id)
    assert (created["queue_id"], created["rcpt"]) == (logged.queue_id, ALICE.address)
    _no_loop(mx.server, queue_id, logged.queue_id)
    assert len(_dsns_to(mx.mailbox, ALICE.address, queue_id)) == 1


def test_mx_delay_warning_is_delivered_to_the_sender(mx: Mx) -> None:
    queue_id = submit_one(mx.server, ALICE, ["busy@hard.test"], "mx: a busy mailbox")
    received = _wait_dsn(mx.mailbox, ALICE.address, queue_id)
    dsn = _check_arrived(
        mx.server,
        mx.mailbox,
        received,
        rcpt=ALICE.address,
        subject="Delayed Mail (still being retried)",
        about=queue_id,
    )
    [block] = dsn.recipients
    assert (block["action"], block["status"]) == ("delayed", "4.2.0")
    assert "still being retried" in dsn.note
    assert mx.server.message(queue_id)["status"] == "queued"  # still being retried
    delete_leftovers(mx.server)


def test_a_bounce_the_senders_mailbox_refuses_is_recorded_and_not_bounced(mx: Mx) -> None:
    queue_id = submit_one(mx.server, BOB, ["nobody@hard.test"], "mx: bounce refused")
    wait_status(mx.server, queue_id, "failed")
    [dsn] = wait_dsns(mx.server, queue_id, 1)
    wait_status(mx.server, dsn.queue_id, "failed")  # the 550 for the DSN is final
    [attempt] = history(mx.server, dsn.queue_id)
    assert (attempt.outcome, attempt.recipient) == ("failed", BOB.address)
    assert attempt.reply.startswith("550 5.7.1 We take no bounces"), attempt
    failed = mx.server.wait_for_event(
        "delivery.failed", lambda e: e.get("queue_id") == dsn.queue_id
    )
    assert failed["rcpt"] == BOB.address
    _no_loop(mx.server, queue_id, dsn.queue_id)
    assert not [m for m in mx.mailbox.messages if m.rcpt_to == [BOB.address]]


def test_routes_apply_to_bounces(mx: Mx) -> None:
    """carol@routed.test has no MX at all: her bounce takes the route's smarthost."""
    queue_id = submit_one(mx.server, CAROL, ["nobody@hard.test"], "mx: bounce by a route")
    wait_status(mx.server, queue_id, "failed")
    received = _wait_dsn(mx.routed, CAROL.address, queue_id)
    _check_arrived(
        mx.server,
        mx.routed,
        received,
        rcpt=CAROL.address,
        subject="Undelivered Mail Returned to Sender",
        about=queue_id,
    )
    assert not _dsns_to(mx.mailbox, CAROL.address, queue_id)


def test_bounce_to_capture_keeps_the_bounce_in_the_log(mx: Mx) -> None:
    before = len(mx.mailbox.messages)
    queue_id = submit_one(mx.capture, ALICE, ["nobody@hard.test"], "mx: captured bounce")
    wait_status(mx.capture, queue_id, "failed")
    [dsn] = wait_dsns(mx.capture, queue_id, 1)
    assert dsn.entry["status"] == "captured"
    assert (dsn.entry["mail_from"], dsn.entry["rcpt_to"]) == ("", [ALICE.address])
    assert dsn.subject == "Undelivered Mail Returned to Sender"
    assert history(mx.capture, dsn.queue_id) == []  # never sent anywhere
    time.sleep(QUIET)
    assert len(mx.mailbox.messages) == before
    assert not _dsns_to(mx.mailbox, ALICE.address, queue_id)


# ------------------------------------------------------------------ smarthost mode


def test_smarthost_bounce_goes_back_through_the_smarthost(smarthost: Smarthost) -> None:
    server, relay = smarthost.server, smarthost.relay
    queue_id = submit_one(
        server, ALICE, ["nobody@hard.test"], "smarthost: 550", body=BODY_MARKER + "\r\n"
    )
    wait_status(server, queue_id, "failed")
    received = _wait_dsn(relay, ALICE.address, queue_id)
    dsn = _check_arrived(
        server,
        relay,
        received,
        rcpt=ALICE.address,
        subject="Undelivered Mail Returned to Sender",
        about=queue_id,
    )
    [block] = dsn.recipients
    assert (block["action"], block["status"]) == ("failed", "5.1.1")
    [logged] = find_dsns(server, queue_id)
    _no_loop(server, queue_id, logged.queue_id)
    assert len(_dsns_to(relay, ALICE.address, queue_id)) == 1


def test_smarthost_delay_warning_goes_back_through_the_smarthost(smarthost: Smarthost) -> None:
    server, relay = smarthost.server, smarthost.relay
    queue_id = submit_one(server, ALICE, ["busy@hard.test"], "smarthost: 451")
    received = _wait_dsn(relay, ALICE.address, queue_id)
    dsn = _check_arrived(
        server,
        relay,
        received,
        rcpt=ALICE.address,
        subject="Delayed Mail (still being retried)",
        about=queue_id,
    )
    [block] = dsn.recipients
    assert (block["action"], block["status"]) == ("delayed", "4.2.0")
    delete_leftovers(server)
