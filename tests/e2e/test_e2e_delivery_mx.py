"""End to end: delivery to MX hosts, retries, bounces (DSNs), TLS policy.

A real relaygate (``[delivery] mode = "mx"``) looks domains up in ``FakeDNS``
(``resolvers = ["127.0.0.1:PORT"]``) and delivers to SMTP sinks listening on
fresh 127.66.x.y addresses, all on the one ``mx_port``. Each test has its own
domains and sinks, so the module shares one server (retry_schedule = [1]);
expiry and delay warnings need other timing and get a server of their own.

The sender, alice@example.test, is a local account and these servers keep the
old behaviour, ``bounce_to = "capture"``: her bounces stay here ("captured",
in ``messages list``), where the tests read and parse them. Bounces delivered
to the sender's own mailbox (``bounce_to = "sender"``): test_e2e_bounces.py.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pytest

from fakes.dns_server import FakeDNS
from fakes.smtp_sink import SMTPSink, make_tls_context

from .delivery_helpers import (
    DSN,
    WAIT,
    DeliveryServer,
    ca_bundle,
    delete_leftovers,
    delivery_toml,
    find_dsns,
    history,
    loopback_address,
    max_concurrent_connections,
    message_ids_by_connection,
    new_server,
    queue_rows_for,
    start_sinks,
    status_of,
    submit,
    submit_one,
    wait_dsns,
    wait_status,
)
from .helpers import ServerPool, User, free_ports, wait_until

SENDER = User("alice@example.test", "Alice-mx-pw-8Tn3Lw5q")
# May send as anyone at far.test, which is no local account: its bounces leave.
FAR_SENDER = User("bob@example.test", "Bob-mx-pw-2Vc9Ks4e", senders=("@far.test",))
TLS_REQUIRED_CLEAR = "tls-required-clear.test"  # policy: required; its MX offers no STARTTLS
TLS_REQUIRED_OK = "tls-required-ok.test"  # policy: required; its MX has a trusted cert
TRUSTED_MX = f"mx.{TLS_REQUIRED_OK}"
BODY_MARKER = "The body text that a bounce must not carry: 5b1f0c9e."
DSN_WAIT = 3.0  # a DSN is stored right after the failure it reports is committed


@dataclass
class World:
    dns: FakeDNS
    port: int  # every MX sink listens on this port (relaygate's mx_port)
    server: DeliveryServer
    trusted_tls: ssl.SSLContext  # for TRUSTED_MX; its CA is in relaygate's SSL_CERT_FILE
    untrusted_tls: ssl.SSLContext  # from a CA relaygate does not know
    pool: ServerPool

    def mx(self, domain: str, *hosts: tuple[int, str, str | None]) -> None:
        """MX records (preference, host name, address or None for no A record)."""
        self.dns.add_mx(domain, [(preference, name) for preference, name, _ in hosts])
        for _, name, address in hosts:
            if address is not None:
                self.dns.add_a(name, address)

    def sinks(self, count: int, **options: Any) -> AbstractContextManager[list[SMTPSink]]:
        """``count`` sinks on fresh addresses, all on ``port``."""
        hosts = [loopback_address() for _ in range(count)]
        return start_sinks(hosts, self.port, **options)


def _server_toml(dns: FakeDNS, port: int, **extra: float | list[float]) -> str:
    return delivery_toml(
        {
            "mode": "mx",
            "resolvers": [dns.address],
            "mx_port": port,
            "allow_private_targets": True,  # the sinks are on 127.66.x.y
            "retry_schedule": [1],
            "delay_warning_after": 0,
            "per_destination": 2,
            "connect_timeout": 3,
            "command_timeout": 10,
            "bounce_to": "capture",
            **extra,
        },
        tls_policy={TLS_REQUIRED_CLEAR: "required", TLS_REQUIRED_OK: "required"},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("e2e-delivery-mx")
    trusted, trusted_ca = make_tls_context(TRUSTED_MX, base / "tls", ips=())
    untrusted, _ = make_tls_context("mx.untrusted.test", base / "tls", ips=())
    bundle = ca_bundle(base / "trusted-cas.pem", [trusted_ca])
    [port] = free_ports(1)
    pool = ServerPool(base / "servers")
    with FakeDNS() as dns:
        try:
            server = new_server(
                pool,
                "mx",
                extra_toml=_server_toml(dns, port),
                users=[SENDER, FAR_SENDER],
                env={"SSL_CERT_FILE": str(bundle)},
            )
            yield World(dns, port, server, trusted, untrusted, pool)
        finally:
            problems = pool.finish()
            if problems:
                pytest.fail("\n".join(problems), pytrace=False)


def _bounce(world: World, queue_id: str) -> DSN:
    [dsn] = wait_dsns(world.server, queue_id, 1, DSN_WAIT)
    return dsn


def _check_bounce(
    dsn: DSN, *, sender: str, recipients: list[str], status_prefix: str = "5."
) -> None:
    """A failure DSN from <> to ``sender`` about exactly ``recipients``."""
    assert dsn.entry["mail_from"] == ""  # the null sender: no bounce of a bounce
    assert dsn.entry["rcpt_to"] == [sender]
    assert dsn.message["To"] == sender
    assert str(dsn.message["From"]).startswith("Mail Delivery System <MAILER-DAEMON@")
    assert dsn.message["Auto-Submitted"] == "auto-replied"
    assert dsn.subject == "Undelivered Mail Returned to Sender"
    assert dsn.per_message["reporting-mta"] == "dns; localhost"
    assert [r["final-recipient"] for r in dsn.recipients] == [f"rfc822; {r}" for r in recipients]
    for block in dsn.recipients:
        assert block["action"] == "failed", block
        assert block["status"].startswith(status_prefix), block
        assert block["diagnostic-code"].startswith("smtp; "), block


# ------------------------------------------------------------------ MX selection


def test_mx_preference_order_lowest_first(world: World) -> None:
    with world.sinks(2) as (first, second):
        # Listed high preference first: relaygate must sort, not take DNS order.
        world.mx(
            "pref.test",
            (20, "mx-b.pref.test", second.host),
            (10, "mx-a.pref.test", first.host),
        )
        queue_id = submit_one(world.server, SENDER, ["user@pref.test"], "mx: preference")
        wait_status(world.server, queue_id, "delivered")
        [received] = first.wait_for_messages(1, WAIT)
        assert received.rcpt_to == ["user@pref.test"]
        assert second.connections == 0
        [attempt] = history(world.server, queue_id)
        assert attempt.host == f"mx-a.pref.test[{first.host}]:{world.port}"


def test_mx_fallback_when_the_first_refuses_connections(world: World) -> None:
    nobody = loopback_address()  # nothing listens here: the connection is refused
    with world.sinks(2) as (closing, good):
        closing.refuse_connections()  # accepts, then closes before the banner
        world.mx(
            "fallback.test",
            (10, "mx1.fallback.test", nobody),
            (20, "mx2.fallback.test", closing.host),
            (30, "mx3.fallback.test", good.host),
        )
        queue_id = submit_one(world.server, SENDER, ["user@fallback.test"], "mx: fallback")
        wait_status(world.server, queue_id, "delivered")
        assert len(good.wait_for_messages(1, WAIT)) == 1
        assert closing.messages == [] and closing.connections == 1
        [attempt] = history(world.server, queue_id)
        assert attempt.outcome == "delivered"
        assert attempt.host == f"mx3.fallback.test[{good.host}]:{world.port}"


def test_implicit_mx_is_the_domain_itself(world: World) -> None:
    with world.sinks(1) as [sink]:
        world.dns.add_a("implicit-mx.test", sink.host)  # an A record, no MX
        queue_id = submit_one(world.server, SENDER, ["user@implicit-mx.test"], "mx: implicit")
        wait_status(world.server, queue_id, "delivered")
        assert sink.wait_for_messages(1, WAIT)[0].rcpt_to == ["user@implicit-mx.test"]
        [attempt] = history(world.server, queue_id)
        assert attempt.host == f"implicit-mx.test[{sink.host}]:{world.port}"


def test_permanent_failures_are_final(world: World) -> None:
    """Null MX, NXDOMAIN, a 550 and a 550 for one of two: failed at the first
    attempt, never retried (the bounces themselves: the tests below)."""
    world.dns.null_mx("final-nullmx.test")
    with world.sinks(1) as [sink]:
        sink.reject_recipient("nobody@final-550.test", "550 5.1.1 No such user")
        sink.reject_recipient("bad@final-mixed.test", "550 5.1.1 No such user")
        world.mx("final-550.test", (10, "mx.final-550.test", sink.host))
        world.mx("final-mixed.test", (10, "mx.final-mixed.test", sink.host))
        cases = {
            "user@final-nullmx.test": ("failed", "556 5.1.10"),
            "user@final-nxdomain.test": ("failed", "550 5.1.2"),
            "nobody@final-550.test": ("failed", "550 5.1.1"),
        }
        ids = {rcpt: submit_one(world.server, SENDER, [rcpt], f"final: {rcpt}") for rcpt in cases}
        mixed = submit_one(
            world.server,
            SENDER,
            ["good@final-mixed.test", "bad@final-mixed.test"],
            "final: mixed",
        )
        for queue_id in ids.values():
            wait_status(world.server, queue_id, "failed")
        wait_status(world.server, mixed, "partly failed")
        time.sleep(1.3)  # past retry_schedule[0] (+20%): nothing is tried again
        for rcpt, (outcome, reply) in cases.items():
            [attempt] = history(world.server, ids[rcpt])
            assert (attempt.recipient, attempt.outcome) == (rcpt, outcome), attempt
            assert attempt.reply.startswith(reply), attempt
            assert queue_rows_for(world.server, ids[rcpt]) == []
        outcomes = {(a.recipient, a.outcome) for a in history(world.server, mixed)}
        assert outcomes == {
            ("good@final-mixed.test", "delivered"),
            ("bad@final-mixed.test", "failed"),
        }
        [received] = sink.messages
        assert received.rcpt_to == ["good@final-mixed.test"]
        assert sink.commands().count("DATA") == 1


def test_null_mx_fails_at_once_with_a_bounce(world: World) -> None:
    world.dns.null_mx("nullmx.test")
    queue_id = submit_one(world.server, SENDER, ["user@nullmx.test"], "mx: null MX")
    wait_status(world.server, queue_id, "failed")
    dsn = _bounce(world, queue_id)
    _check_bounce(dsn, sender=SENDER.address, recipients=["user@nullmx.test"])
    [block] = dsn.recipients
    assert block["status"] == "5.1.10", block
    assert "null MX" in block["diagnostic-code"], block
    [attempt] = history(world.server, queue_id)
    assert attempt.outcome == "failed" and attempt.reply.startswith("556 5.1.10"), attempt


def test_nxdomain_fails_at_once_with_a_bounce(world: World) -> None:
    queue_id = submit_one(world.server, SENDER, ["user@no-such-domain.test"], "mx: nxdomain")
    wait_status(world.server, queue_id, "failed")
    dsn = _bounce(world, queue_id)
    _check_bounce(dsn, sender=SENDER.address, recipients=["user@no-such-domain.test"])
    assert dsn.recipients[0]["status"] == "5.1.2"
    assert "does not exist" in dsn.recipients[0]["diagnostic-code"]


def test_dns_servfail_defers_and_does_not_bounce(world: World) -> None:
    world.dns.servfail("servfail.test")
    queue_id = submit_one(world.server, SENDER, ["user@servfail.test"], "mx: servfail")
    wait_until(
        lambda: any(r["attempts"] >= 1 for r in queue_rows_for(world.server, queue_id)),
        WAIT,
        0.1,
        "a deferred attempt",
    )
    [row] = queue_rows_for(world.server, queue_id)
    assert str(row["last_reply"]).startswith("451 4.4.3"), row
    assert status_of(world.server, queue_id) == "queued"
    assert find_dsns(world.server, queue_id) == []
    delete_leftovers(world.server)


# ------------------------------------------------------------------ retries


def test_temporary_failure_is_retried_then_delivered(world: World) -> None:
    with world.sinks(1, tls=world.untrusted_tls) as [sink]:
        sink.reply_to("RCPT", "451 4.3.0 Greylisted, come back later")
        world.mx("retry.test", (10, "mx.retry.test", sink.host))
        queue_id = submit_one(world.server, SENDER, ["user@retry.test"], "mx: 451 then ok")
        wait_status(world.server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.tls
        deferred, delivered = history(world.server, queue_id)
        assert deferred.outcome == "deferred"
        assert deferred.reply == "451 4.3.0 Greylisted, come back later"
        assert deferred.host == f"mx.retry.test[{sink.host}]:{world.port}"
        assert delivered.outcome == "delivered"
        assert delivered.host == deferred.host
        assert delivered.tls.startswith(str(received.tls_version)), delivered
        assert delivered.tls.endswith(" unverified"), delivered
        assert delivered.reply.startswith("250"), delivered
        # Two transactions (on one kept-alive connection or on two).
        assert sink.commands().count("MAIL") == 2
        assert sink.connections in (1, 2)
        assert find_dsns(world.server, queue_id) == []


def test_connection_dropped_during_data_is_retried_and_delivered_once(world: World) -> None:
    with world.sinks(1) as [sink]:
        sink.drop_during_data()
        world.mx("drop.test", (10, "mx.drop.test", sink.host))
        queue_id = submit_one(world.server, SENDER, ["user@drop.test"], "mx: dropped in DATA")
        wait_status(world.server, queue_id, "delivered")
        time.sleep(0.6)  # one more poll: nothing is sent twice
        assert len(sink.messages) == 1
        assert [e.kind for e in sink.events].count("drop") == 1
        deferred, delivered = history(world.server, queue_id)
        assert deferred.outcome == "deferred"
        assert deferred.reply.startswith("451 4.4.2"), deferred
        assert "lost" in deferred.reply, deferred
        assert delivered.outcome == "delivered"
        assert find_dsns(world.server, queue_id) == []


def test_recipients_beyond_the_remote_limit_are_retried(world: World) -> None:
    """452 4.5.3 for the second recipient: the first is delivered, the second later."""
    with world.sinks(1, max_recipients=1) as [sink]:
        world.mx("limited.test", (10, "mx.limited.test", sink.host))
        rcpts = ["one@limited.test", "two@limited.test"]
        queue_id = submit_one(world.server, SENDER, rcpts, "mx: 452 too many recipients")
        wait_status(world.server, queue_id, "delivered")
        first, second = sink.wait_for_messages(2, WAIT)
        assert (first.rcpt_to, second.rcpt_to) == (["one@limited.test"], ["two@limited.test"])
        assert [(a.recipient, a.outcome) for a in history(world.server, queue_id)] == [
            ("one@limited.test", "delivered"),
            ("two@limited.test", "deferred"),
            ("two@limited.test", "delivered"),
        ]
        assert find_dsns(world.server, queue_id) == []


def test_recipients_in_two_domains_each_go_to_their_mx(world: World) -> None:
    with world.sinks(2) as (north, south):
        world.mx("north.test", (10, "mx.north.test", north.host))
        world.mx("south.test", (10, "mx.south.test", south.host))
        rcpts = ["a@north.test", "b@south.test", "c@north.test"]
        queue_id = submit_one(world.server, SENDER, rcpts, "mx: two domains")
        wait_status(world.server, queue_id, "delivered")
        [to_north] = north.wait_for_messages(1, WAIT)
        [to_south] = south.wait_for_messages(1, WAIT)
        assert to_north.rcpt_to == ["a@north.test", "c@north.test"]
        assert to_south.rcpt_to == ["b@south.test"]
        assert to_north.data == to_south.data  # the same message, DKIM aside (no key here)
        assert sorted(a.recipient for a in history(world.server, queue_id)) == sorted(rcpts)


# ------------------------------------------------------------------ bounces


def test_permanent_failure_bounces_to_the_local_sender(world: World) -> None:
    with world.sinks(1) as [sink]:
        sink.reject_recipient("nobody@hard.test", "550 5.1.1 <nobody@hard.test>: No such user")
        world.mx("hard.test", (10, "mx.hard.test", sink.host))
        subject = "mx: 550 bounce"
        queue_id = submit_one(
            world.server, SENDER, ["nobody@hard.test"], subject, body=BODY_MARKER + "\r\n"
        )
        wait_status(world.server, queue_id, "failed")
        assert sink.messages == []
        assert "DATA" not in sink.commands()  # refused at RCPT: no message was sent
        dsn = _bounce(world, queue_id)

    # "The bounce arrives in the sender's capture": alice is a local account.
    assert dsn.entry["status"] == "captured"
    assert dsn.entry["account"] == SENDER.address
    _check_bounce(dsn, sender=SENDER.address, recipients=["nobody@hard.test"])
    [block] = dsn.recipients
    assert block["status"] == "5.1.1"
    assert block["diagnostic-code"] == "smtp; 550 5.1.1 <nobody@hard.test>: No such user"
    assert block["remote-mta"].startswith("dns; mx.hard.test"), block
    assert dsn.about() == queue_id
    assert "arrival-date" in dsn.per_message
    assert "nobody@hard.test" in dsn.note
    # The original's header, not its body.
    original = world.server.raw(queue_id)
    assert f"Subject: {subject}" in dsn.headers
    assert "Message-ID: <" in dsn.headers
    assert f"id {queue_id}" in dsn.headers  # our own Received field
    assert dsn.headers.strip() == original.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n", "\n")
    assert BODY_MARKER.encode() in original
    assert BODY_MARKER.encode() not in dsn.raw
    [attempt] = history(world.server, queue_id)
    assert attempt.outcome == "failed"


def test_mixed_recipients_one_refused_is_partly_failed(world: World) -> None:
    with world.sinks(1) as [sink]:
        sink.reject_recipient("bad@mixed.test", "550 5.1.1 No such user here")
        world.mx("mixed.test", (10, "mx.mixed.test", sink.host))
        rcpts = ["good@mixed.test", "bad@mixed.test"]
        queue_id = submit_one(world.server, SENDER, rcpts, "mx: one good, one bad")
        wait_status(world.server, queue_id, "partly failed")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.rcpt_to == ["good@mixed.test"]
        dsn = _bounce(world, queue_id)
        _check_bounce(dsn, sender=SENDER.address, recipients=["bad@mixed.test"])
        assert "good@mixed.test" not in dsn.raw.decode().split("Content-Type: text/rfc822")[0]
        outcomes = {(a.recipient, a.outcome) for a in history(world.server, queue_id)}
        assert outcomes == {("good@mixed.test", "delivered"), ("bad@mixed.test", "failed")}
        time.sleep(0.6)
        assert len(find_dsns(world.server, queue_id)) == 1


def test_a_bounce_that_cannot_be_delivered_is_not_bounced(world: World) -> None:
    """No loops: the DSN (from <>) to a remote sender fails too, and nothing follows."""
    sender = "someone@far.test"
    with world.sinks(2) as (dead_end, far):
        dead_end.reject_recipient("user@dead-end.test", "550 5.1.1 No such user")
        far.reply_to("MAIL", "550 5.7.1 We take no mail from anyone", times=None)
        world.mx("dead-end.test", (10, "mx.dead-end.test", dead_end.host))
        world.mx("far.test", (10, "mx.far.test", far.host))
        queue_id = submit_one(
            world.server, FAR_SENDER, ["user@dead-end.test"], "mx: loop", mail_from=sender
        )
        wait_status(world.server, queue_id, "failed")
        dsn = _bounce(world, queue_id)
        assert dsn.entry["rcpt_to"] == [sender]
        assert dsn.entry["mail_from"] == ""
        # Not a local account: the DSN is queued for far.test, whose MX refuses it.
        wait_status(world.server, dsn.queue_id, "failed")
        far.wait_until(lambda: any(e.text.startswith("MAIL FROM:<> ") for e in far.events))
        assert far.messages == []
        [attempt] = history(world.server, dsn.queue_id)
        assert attempt.outcome == "failed"
        assert attempt.reply.startswith("550 5.7.1"), attempt
        time.sleep(1.0)  # two polls: a DSN of the DSN would exist by now
        assert find_dsns(world.server, dsn.queue_id) == []
        assert len(find_dsns(world.server, queue_id)) == 1
        assert far.connections == 1


# ------------------------------------------------------------------ TLS policy


def test_required_starttls_not_offered_defers_and_sends_nothing_in_clear(world: World) -> None:
    with world.sinks(1) as [sink]:  # no tls: STARTTLS is not offered
        world.mx(TLS_REQUIRED_CLEAR, (10, f"mx.{TLS_REQUIRED_CLEAR}", sink.host))
        queue_id = submit_one(
            world.server, SENDER, [f"user@{TLS_REQUIRED_CLEAR}"], "tls: required, not offered"
        )
        wait_until(
            lambda: any(r["attempts"] >= 2 for r in queue_rows_for(world.server, queue_id)),
            WAIT,
            0.1,
            "two deferred attempts",
        )
        [row] = queue_rows_for(world.server, queue_id)
        assert row["status"] in ("queued", "sending")
        assert "does not offer STARTTLS" in str(row["last_reply"]), row
        assert str(row["last_reply"]).startswith("451 4.7.5"), row
        assert status_of(world.server, queue_id) == "queued"
        assert sink.messages == []
        commands = sink.commands()
        assert "MAIL" not in commands and "RCPT" not in commands and "DATA" not in commands
        assert set(commands) <= {"EHLO", "QUIT"}, commands
        assert {a.outcome for a in history(world.server, queue_id)} == {"deferred"}
        assert find_dsns(world.server, queue_id) == []
        delete_leftovers(world.server)


def test_required_starttls_with_a_trusted_certificate_is_verified(world: World) -> None:
    with world.sinks(1, tls=world.trusted_tls, hostname=TRUSTED_MX) as [sink]:
        world.mx(TLS_REQUIRED_OK, (10, TRUSTED_MX, sink.host))
        queue_id = submit_one(
            world.server, SENDER, [f"user@{TLS_REQUIRED_OK}"], "tls: required, trusted"
        )
        wait_status(world.server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.tls
        commands = sink.commands(received.connection_id)
        assert commands.index("STARTTLS") < commands.index("MAIL")
        [attempt] = history(world.server, queue_id)
        assert attempt.tls.endswith(" verified") and "unverified" not in attempt.tls, attempt


def test_required_starttls_with_an_untrusted_certificate_is_deferred(world: World) -> None:
    """The policy domain's MX offers STARTTLS, but relaygate cannot verify it."""
    with world.sinks(1, tls=world.untrusted_tls) as [sink]:
        domain = TLS_REQUIRED_OK
        world.dns.remove(domain, "MX")
        world.mx(domain, (10, "mx2.tls-required-ok.test", sink.host))
        queue_id = submit_one(world.server, SENDER, [f"user@{domain}"], "tls: untrusted")
        wait_until(
            lambda: any(r["attempts"] >= 1 for r in queue_rows_for(world.server, queue_id)),
            WAIT,
            0.1,
            "a deferred attempt",
        )
        [row] = queue_rows_for(world.server, queue_id)
        assert str(row["last_reply"]).startswith("451 "), row
        assert sink.messages == [] and "MAIL" not in sink.commands()
        delete_leftovers(world.server)
        world.dns.remove(domain, "MX")


def test_opportunistic_starttls_with_an_untrusted_certificate(world: World) -> None:
    with world.sinks(1, tls=world.untrusted_tls) as [sink]:
        world.mx("opportunistic.test", (10, "mx.opportunistic.test", sink.host))
        queue_id = submit_one(
            world.server, SENDER, ["user@opportunistic.test"], "tls: opportunistic"
        )
        wait_status(world.server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.tls and received.tls_version is not None
        [attempt] = history(world.server, queue_id)
        assert attempt.tls == attempt.tls.strip()
        assert attempt.tls.startswith(received.tls_version), attempt
        assert attempt.tls.endswith(" unverified"), attempt


def test_no_starttls_offered_is_delivered_in_clear_by_default(world: World) -> None:
    with world.sinks(1) as [sink]:
        world.mx("cleartext.test", (10, "mx.cleartext.test", sink.host))
        queue_id = submit_one(world.server, SENDER, ["user@cleartext.test"], "tls: none offered")
        wait_status(world.server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert not received.tls
        [attempt] = history(world.server, queue_id)
        assert attempt.tls == "none"


# ------------------------------------------------------------------ connections


def test_queued_messages_share_connections(world: World) -> None:
    with world.sinks(1) as [sink]:
        # The first connection waits for its banner while the rest are queued.
        sink.delay_reply("CONNECT", 1.5)
        world.mx("reuse.test", (10, "mx.reuse.test", sink.host))
        ids = submit(world.server, SENDER, ["user@reuse.test"], "connections: reuse", count=5)
        for queue_id in ids:
            wait_status(world.server, queue_id, "delivered")
        received = sink.wait_for_messages(5, WAIT)
        assert len(received) == 5
        assert sorted(str(m.message()["Subject"]) for m in received) == [
            f"connections: reuse #{n}" for n in range(1, 6)
        ]
        per_connection = message_ids_by_connection(sink)
        assert sink.connections < 5, per_connection
        assert len(per_connection) < 5, per_connection
        assert max(per_connection.values()) >= 2, per_connection
        # Each connection said EHLO once, and QUIT once, for all its messages.
        for connection_id, carried in per_connection.items():
            commands = sink.commands(connection_id)
            assert commands.count("EHLO") == 1, commands
            assert commands.count("DATA") == carried, commands


def test_per_destination_limits_concurrent_connections(world: World) -> None:
    with world.sinks(1) as [sink]:
        sink.delay_reply("CONNECT", 1.0)  # let all six be queued
        sink.delay_reply("DATA_END", 0.3, times=None)  # keep each connection busy
        world.mx("limit.test", (10, "mx.limit.test", sink.host))
        ids = submit(world.server, SENDER, ["user@limit.test"], "connections: limit", count=6)
        for queue_id in ids:
            wait_status(world.server, queue_id, "delivered")
        assert len(sink.wait_for_messages(6, WAIT)) == 6
        # per_destination = 2: two connections in parallel, never more.
        assert max_concurrent_connections(sink) == 2, sink.events
        assert sink.connections == 2, message_ids_by_connection(sink)


# ------------------------------------------------------------------ expiry, delay warning


@pytest.fixture(scope="module")
def expiring(world: World) -> DeliveryServer:
    """A server that warns after 1 s and gives up after 12 s: room for the CLI
    checks between the warning and the give-up on a loaded machine (at 6 s a CI
    run saw the message gone before the queue listing ran)."""
    return new_server(
        world.pool,
        "mx-expiring",
        extra_toml=_server_toml(world.dns, world.port, max_age=12, delay_warning_after=1),
        users=[SENDER],
    )


def test_delay_warning_once_then_bounce_after_max_age(
    world: World, expiring: DeliveryServer
) -> None:
    with world.sinks(1) as [sink]:
        sink.reply_to("RCPT", "451 4.2.0 Mailbox busy, try later", times=None)
        world.mx("busy.test", (10, "mx.busy.test", sink.host))
        started = time.monotonic()
        queue_id = submit_one(expiring, SENDER, ["user@busy.test"], "expiry: always 451")

        [warning] = wait_dsns(expiring, queue_id, 1, 10.0)
        # Sent while the message is still being retried.
        assert status_of(expiring, queue_id) == "queued"
        assert queue_rows_for(expiring, queue_id)
        assert warning.subject == "Delayed Mail (still being retried)"
        assert warning.entry["status"] == "captured"
        assert warning.entry["mail_from"] == ""
        [block] = warning.recipients
        assert block["final-recipient"] == "rfc822; user@busy.test"
        assert block["action"] == "delayed"
        assert block["status"] == "4.2.0"
        assert "Mailbox busy" in block["diagnostic-code"]
        assert "still being retried" in warning.note

        wait_status(expiring, queue_id, "failed")
        elapsed = time.monotonic() - started
        assert elapsed >= 12.0, elapsed  # not before max_age
        dsns = wait_dsns(expiring, queue_id, 2, DSN_WAIT)
        subjects = sorted(d.subject for d in dsns)
        assert subjects == [
            "Delayed Mail (still being retried)",
            "Undelivered Mail Returned to Sender",
        ], subjects  # the warning came only once, though several attempts followed it
        [bounce] = [d for d in dsns if d.subject.startswith("Undelivered")]
        [block] = bounce.recipients
        assert block["action"] == "failed"
        assert block["status"][:2] in ("4.", "5."), block
        assert "gave up after" in block["diagnostic-code"], block
        assert "451 4.2.0 Mailbox busy" in block["diagnostic-code"], block
        attempts = history(expiring, queue_id)
        assert [a.outcome for a in attempts[:-1]] == ["deferred"] * (len(attempts) - 1)
        assert attempts[-1].outcome == "failed" and "gave up" in attempts[-1].reply
        # Attempts ~1.3 s apart (1 s +-20% and the 0.5 s poll): one before the
        # warning (age < 1 s), the warning, at least one more, then the give-up.
        assert len(attempts) >= 4, attempts
        assert sink.messages == []
        time.sleep(0.6)
        assert len(find_dsns(expiring, queue_id)) == 2
        assert queue_rows_for(expiring, queue_id) == []
