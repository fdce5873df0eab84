"""End to end: delivery against hostile or broken remote hosts and domains (issue 7).

A real relaygate in mx mode looks domains up in ``FakeDNS`` and delivers to
``SMTPSink``s on fresh 127.66.x.y addresses. The remote side misbehaves:
replies that are not UTF-8 (and carry NUL, bare CR, several lines, header
shapes) at every step of the dialog, domain names DNS cannot hold, MX records
that point into our own networks, DNS that never answers and hosts that never
greet. What must hold: every message ends delivered exactly once, or deferred,
or failed with a well-formed bounce; no row is stranded ``sending``; nothing
logs ``internal.error``; and such domains cannot hold the delivery slots.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pytest

from fakes.dns_server import FakeDNS
from fakes.smtp_sink import SMTPSink

from .delivery_helpers import (
    DSN,
    WAIT,
    DeliveryServer,
    delete_leftovers,
    delivery_toml,
    find_dsns,
    history,
    loopback_address,
    new_server,
    queue_rows_for,
    start_sinks,
    submit_one,
    wait_dsns,
    wait_status,
)
from .helpers import ServerPool, User, free_ports, make_message, session, wait_until

SENDER = User("alice@example.test", "Alice-hostile-pw-4Qz8Rm2x")
FINAL = ("delivered", "failed", "partly failed")


@dataclass
class World:
    dns: FakeDNS
    port: int
    server: DeliveryServer  # allow_private_targets = true (the sinks are on loopback)
    pool: ServerPool

    def mx(self, domain: str, host: str) -> None:
        self.dns.add_mx(domain, [(10, f"mx.{domain}")])
        self.dns.add_a(f"mx.{domain}", host)

    def sinks(self, count: int, **options: Any) -> AbstractContextManager[list[SMTPSink]]:
        return start_sinks([loopback_address() for _ in range(count)], self.port, **options)


def _toml(dns: FakeDNS, port: int, **extra: Any) -> str:
    settings: dict[str, Any] = {
        "mode": "mx",
        "resolvers": [dns.address],
        "mx_port": port,
        "allow_private_targets": True,
        "retry_schedule": [1],
        "delay_warning_after": 0,
        "per_destination": 2,
        "connect_timeout": 3,
        "command_timeout": 10,
        "bounce_to": "capture",  # the bounces stay in the message log, where they are read
    }
    settings.update(extra)
    return delivery_toml({k: v for k, v in settings.items() if v is not None})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("e2e-delivery-hostile")
    [port] = free_ports(1)
    pool = ServerPool(base / "servers")
    with FakeDNS() as dns:
        try:
            server = new_server(pool, "hostile", extra_toml=_toml(dns, port), users=[SENDER])
            yield World(dns, port, server, pool)
        finally:
            problems = pool.finish()
            if problems:
                pytest.fail("\n".join(problems), pytrace=False)


def _no_internal_errors(server: DeliveryServer) -> None:
    errors = server.log_events("internal.error") + server.log_events("delivery.error")
    assert errors == [], errors


def _only_bounce(server: DeliveryServer, queue_id: str) -> DSN:
    [dsn] = wait_dsns(server, queue_id, 1, 3.0)
    assert dsn.subject == "Undelivered Mail Returned to Sender"
    assert dsn.entry["mail_from"] == "" and dsn.entry["rcpt_to"] == [SENDER.address]
    return dsn


def _submit_utf8(server: DeliveryServer, rcpt: str, subject: str) -> str:
    """One message with SMTPUTF8 (for recipients with non-ASCII domains)."""
    with session(server, user=SENDER) as client:
        assert client.command(f"MAIL FROM:<{SENDER.address}> SMTPUTF8").status == "250 2.1.0"
        reply = client.command(f"RCPT TO:<{rcpt}>")
        assert reply.status == "250 2.1.5", str(reply)
        message = make_message(
            from_addr=SENDER.address, to=["someone@example.test"], subject=subject
        )
        reply = client.data(message)
        assert reply.status == "250 2.0.0", str(reply)
        client.command("QUIT")
        return reply.text.rsplit(" ", 1)[-1]


# ------------------------------------------------------------------ item 2: non-UTF-8 replies


def test_non_utf8_replies_at_every_step_deliver_exactly_once(world: World) -> None:
    """Banner, EHLO, MAIL, RCPT (2xx, 4xx, 5xx), DATA and end-of-data replies all
    carry invalid UTF-8, NUL and bare CR; each recipient gets exactly one copy,
    also across a restart; the history keeps the replies, escaped."""
    server = world.server
    with world.sinks(1) as [sink]:
        sink.reply_to("CONNECT", b"220 mx.bytes.test \xff\xfe ESMTP \x00 bare\rCR", times=None)
        sink.reply_to(
            "EHLO",
            b"250 mx.bytes.test gr\xe9ets you \xff\nPIPELINING\n8BITMIME\nSMTPUTF8\n"
            b"ENHANCEDSTATUSCODES",
            times=None,
        )
        sink.reply_to("MAIL", b"250 2.1.0 s\xe9nder \xff ok \x00", times=None)
        # 2xx for every RCPT the recipient rules below do not refuse.
        sink.reply_to("RCPT", b"250 2.1.5 r\xe9cipient \xff ok \x00", times=None)
        sink.reply_to("DATA", b"354 go \xe9 \xff", times=None)
        sink.reply_to("DATA_END", b"250 2.0.0 Ok: queued as X \xe9t\xe9 \x00 bare\rCR", times=None)
        sink.reject_recipient("later@bytes.test", b"451 4.2.0 busy \xff\xe9 \x00")
        sink.reject_recipient("bad@bytes.test", b"550 5.1.1 n\xe9 \xff such \x00 user\rX")
        world.mx("bytes.test", sink.host)
        rcpts = ["good@bytes.test", "later@bytes.test", "bad@bytes.test"]
        queue_id = submit_one(server, SENDER, rcpts, "hostile: non-UTF-8 everywhere")

        # The 4xx recipient is deferred first; then its mailbox "frees up".
        wait_until(
            lambda: any(a.outcome == "deferred" for a in history(server, queue_id)),
            WAIT,
            0.1,
            "the 451 deferral",
        )
        sink.accept_recipient("later@bytes.test")
        wait_status(server, queue_id, "partly failed")
        assert queue_rows_for(server, queue_id) == []

        # A restart must not send anything again (rows stranded 'sending' would be).
        server.stop()
        server.start()
        time.sleep(1.5)  # three polls of the queue
        copies = [r for m in sink.messages for r in m.rcpt_to]
        assert sorted(copies) == ["good@bytes.test", "later@bytes.test"], copies
        assert queue_rows_for(server, queue_id) == []

    attempts = {(a.recipient, a.outcome): a for a in history(server, queue_id)}
    assert set(attempts) == {
        ("good@bytes.test", "delivered"),
        ("later@bytes.test", "deferred"),
        ("later@bytes.test", "delivered"),
        ("bad@bytes.test", "failed"),
    }
    delivered = attempts[("good@bytes.test", "delivered")].reply
    assert delivered == "250 2.0.0 Ok: queued as X \\xe9t\\xe9 \\x00 bare\\x0dCR", delivered
    assert attempts[("later@bytes.test", "deferred")].reply == "451 4.2.0 busy \\xff\\xe9 \\x00"
    failed = attempts[("bad@bytes.test", "failed")].reply
    assert failed == "550 5.1.1 n\\xe9 \\xff such \\x00 user\\x0dX", failed
    dsn = _only_bounce(server, queue_id)
    [block] = dsn.recipients
    assert block["final-recipient"] == "rfc822; bad@bytes.test"
    assert block["status"] == "5.1.1"
    assert block["diagnostic-code"] == f"smtp; {failed}"
    _no_internal_errors(server)


@dataclass(frozen=True)
class Step:
    command: str
    reply: bytes
    escaped: str  # how the history must show it
    permanent: bool


STEPS = [
    Step("CONNECT", b"554 5.3.2 n\xf6 service \xff\x00", "5.3.2 n\\xf6 service \\xff\\x00", True),
    Step("EHLO", b"421 4.3.2 try l\xe4ter \xff", "4.3.2 try l\\xe4ter \\xff", False),
    Step("MAIL", b"550 5.7.1 s\xe9nder refused\rnow", "5.7.1 s\\xe9nder refused\\x0dnow", True),
    Step("RCPT", b"452 4.2.2 full \xff\xfe", "452 4.2.2 full \\xff\\xfe", False),
    Step("DATA", b"554 5.6.0 no \xe9 \x00 thanks", "554 5.6.0 no \\xe9 \\x00 thanks", True),
    Step("DATA_END", b"451 4.3.0 \xffspool\xff", "451 4.3.0 \\xffspool\\xff", False),
]


def test_a_non_utf8_refusal_at_each_step_defers_or_bounces(world: World) -> None:
    """One domain per step; its MX refuses at that step once, with bytes that are not
    UTF-8. A 4xx is retried and delivered once; a 5xx fails with a parsable bounce."""
    server = world.server
    with world.sinks(len(STEPS)) as sinks:
        ids: dict[str, str] = {}
        for step, sink in zip(STEPS, sinks, strict=True):
            domain = f"step-{step.command.lower().replace('_', '-')}.test"
            sink.reply_to(step.command, step.reply, times=1)
            world.mx(domain, sink.host)
            ids[step.command] = submit_one(server, SENDER, [f"user@{domain}"], step.command)
        for step, sink in zip(STEPS, sinks, strict=True):
            queue_id = ids[step.command]
            status = wait_status(server, queue_id, "failed" if step.permanent else "delivered")
            attempts = history(server, queue_id)
            assert step.escaped in attempts[0].reply, (step, attempts)
            assert queue_rows_for(server, queue_id) == []
            if step.permanent:
                assert status == "failed" and sink.messages == []
                [block] = _only_bounce(server, queue_id).recipients
                assert block["status"] == re.findall(r"[245]\.\d+\.\d+", step.escaped)[0]
                assert step.escaped in block["diagnostic-code"], block
            else:
                assert [a.outcome for a in attempts] == ["deferred", "delivered"], attempts
                assert len(sink.messages) == 1, sink.messages
                assert find_dsns(server, queue_id) == []
    _no_internal_errors(server)


# ------------------------------------------------------------------ item 8: bounces


def test_bounce_of_a_multiline_hostile_reply_is_complete_and_well_formed(world: World) -> None:
    """A 5xx RCPT reply over several lines, one shaped like a header field, with
    non-ASCII text and a very long word: the bounce is stored with the failure
    and parses back with one Diagnostic-Code holding the whole reply."""
    server = world.server
    lines = [
        "550-5.1.1 The email account that you tried to reach does not exist",
        "550-X-Injected: yes",
        "550-",
        "550-Content-Type: text/html",
        "550 5.1.1 caf\u00e9 " + "x" * 1200,
    ]
    with world.sinks(1) as [sink]:
        sink.reject_recipient("gone@multiline.test", "\n".join(lines))
        world.mx("multiline.test", sink.host)
        queue_id = submit_one(server, SENDER, ["gone@multiline.test"], "hostile: multi-line")
        wait_status(server, queue_id, "failed")
    dsn = _only_bounce(server, queue_id)
    assert all(len(line) <= 998 for line in dsn.raw.split(b"\r\n"))
    [block] = dsn.recipients
    assert set(block) == {"final-recipient", "action", "status", "remote-mta", "diagnostic-code"}
    assert block["final-recipient"] == "rfc822; gone@multiline.test"
    assert block["action"] == "failed"
    assert block["status"] == "5.1.1"
    diagnostic = block["diagnostic-code"]
    assert diagnostic.startswith(
        "smtp; 550 5.1.1 The email account that you tried to reach does not exist"
        " X-Injected: yes Content-Type: text/html 5.1.1 caf\\xe9 xxxx"
    ), diagnostic
    assert diagnostic.endswith("..."), diagnostic  # cut, not dropped
    # The delivery-status part folds the field: no line of it is longer than the
    # longest unbreakable word, and each continuation starts with white space.
    status_part = dsn.raw.decode().split("Content-Type: message/delivery-status")[1]
    field = status_part.split("Diagnostic-Code:")[1].split("\r\n\r\n")[0]
    continuation = field.split("\r\n")[1:]
    assert continuation and all(line[:1] == " " for line in continuation), field
    assert "x-injected" not in block and "content-type" not in block
    [attempt] = history(server, queue_id)
    assert attempt.outcome == "failed"
    assert attempt.reply.startswith("550 5.1.1 The email account"), attempt
    _no_internal_errors(server)


# ------------------------------------------------------------------ item 9: domain names


def test_a_recipient_domain_longer_than_dns_allows_is_refused_at_rcpt(world: World) -> None:
    long_label = "\u00fc" * 70
    with session(world.server, user=SENDER) as client:
        assert client.command(f"MAIL FROM:<{SENDER.address}> SMTPUTF8").status == "250 2.1.0"
        reply = client.command(f"RCPT TO:<u@{long_label}.test>")
        assert reply.status == "553 5.1.3", str(reply)
        reply = client.command("RCPT TO:<u@" + ".".join(["a" * 63] * 3) + ".test>")
        assert reply.status == "250 2.1.5", str(reply)  # long, but within the limits
        client.command("RSET")
        reply = client.command(f"MAIL FROM:<u@{long_label}.test> SMTPUTF8")
        assert reply.status == "553 5.1.7", str(reply)
        client.command("QUIT")


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        ("\ufffd.test", "IDNA refuses the label"),
        ("\u3002x.test", "an IDNA full stop: an empty label"),
    ],
)
def test_a_domain_dns_cannot_look_up_bounces_instead_of_stranding(
    world: World, domain: str, why: str
) -> None:
    server = world.server
    queue_id = _submit_utf8(server, f"user@{domain}", f"hostile: {why}")
    wait_status(server, queue_id, "failed")
    assert queue_rows_for(server, queue_id) == []
    [attempt] = history(server, queue_id)
    assert attempt.reply.startswith("550 5.1.2"), attempt
    [block] = _only_bounce(server, queue_id).recipients
    assert block["status"] == "5.1.2"
    _no_internal_errors(server)


# ------------------------------------------------------------------ private MX targets


def test_mx_in_a_private_range_is_refused_by_default(world: World) -> None:
    """An MX pointing at loopback (a service on this machine's port 25, say) fails
    with a bounce by default; ``allow_private_targets = true`` delivers there."""
    strict = new_server(
        world.pool,
        "private-default",
        extra_toml=_toml(world.dns, world.port, allow_private_targets=None),
        users=[SENDER],
    )
    with world.sinks(1) as [sink]:
        world.mx("inside.test", sink.host)
        refused = submit_one(strict, SENDER, ["user@inside.test"], "private: default")
        wait_status(strict, refused, "failed")
        [attempt] = history(strict, refused)
        assert attempt.reply.startswith("554 5.4.4"), attempt
        assert sink.host in attempt.reply and "allow_private_targets" in attempt.reply
        [block] = _only_bounce(strict, refused).recipients
        assert block["status"] == "5.4.4"
        assert sink.connections == 0

        allowed = submit_one(world.server, SENDER, ["user@inside.test"], "private: allowed")
        wait_status(world.server, allowed, "delivered")
        assert [m.rcpt_to for m in sink.messages] == [["user@inside.test"]]
    _no_internal_errors(strict)


# ------------------------------------------------------------------ slow destinations


def test_slow_dns_and_silent_hosts_do_not_hold_the_delivery_slots(world: World) -> None:
    """concurrency = 2: three domains whose DNS never answers and two whose MX
    never greets are queued first; mail for a normal domain still leaves within
    a few seconds, because no slot is held while resolving and each attempt has
    a destination_timeout (2 s) for DNS and connecting."""
    slow = new_server(
        world.pool,
        "slow-destinations",
        extra_toml=_toml(
            world.dns,
            world.port,
            concurrency=2,
            per_destination=1,
            destination_timeout=2,
            connect_timeout=20,
            command_timeout=20,
            retry_schedule=[30],
        ),
        users=[SENDER],
    )
    with world.sinks(3) as (silent_1, silent_2, good):
        for sink in (silent_1, silent_2):
            sink.delay_reply("CONNECT", 25, times=None)  # accepts, never greets in time
        world.mx("silent-1.test", silent_1.host)
        world.mx("silent-2.test", silent_2.host)
        world.mx("flowing.test", good.host)
        for n in (1, 2, 3):
            world.dns.drop_queries(f"no-dns-{n}.test")
        stuck = [
            submit_one(slow, SENDER, [f"user@{domain}"], f"slow: {domain}")
            for domain in ("no-dns-1.test", "no-dns-2.test", "no-dns-3.test")
        ] + [
            submit_one(slow, SENDER, [f"user@{domain}"], f"slow: {domain}")
            for domain in ("silent-1.test", "silent-2.test")
        ]
        time.sleep(0.7)  # the slow ones are claimed and under way
        started = time.monotonic()
        queue_id = submit_one(slow, SENDER, ["user@flowing.test"], "slow: the normal one")
        wait_status(slow, queue_id, "delivered", timeout=10.0)
        elapsed = time.monotonic() - started
        assert elapsed < 4.0, elapsed
        assert len(good.messages) == 1

        # The slow ones were deferred by the budget, not left hanging.
        def all_deferred() -> bool:
            return all(
                any(a.outcome == "deferred" for a in history(slow, stuck_id)) for stuck_id in stuck
            )

        wait_until(all_deferred, 6.0, 0.2, "every slow message deferred")
        replies = [history(slow, stuck_id)[0].reply for stuck_id in stuck]
        assert all(r.startswith("451 4.4.") for r in replies), replies
        assert any("destination_timeout" in r for r in replies[:3]), replies
        delete_leftovers(slow)
    _no_internal_errors(slow)


def test_waiting_for_a_slot_does_not_use_up_the_destination_budget(world: World) -> None:
    """concurrency = 1 and a 2 s budget: a message waits ~3 s for the one slot
    (a slow but honest 1 s transaction, then that connection's 2 s keep-alive)
    and is still delivered at its first attempt; the budget covers DNS and
    connecting, not the queue for a slot."""
    single = new_server(
        world.pool,
        "one-slot",
        extra_toml=_toml(
            world.dns,
            world.port,
            concurrency=1,
            per_destination=1,
            destination_timeout=2,
            retry_schedule=[30],
        ),
        users=[SENDER],
    )
    with world.sinks(2) as (busy, other):
        busy.delay_reply("DATA_END", 1.0)
        world.mx("busy-slot.test", busy.host)
        world.mx("after-slot.test", other.host)
        first = submit_one(single, SENDER, ["user@busy-slot.test"], "slot: slow transaction")
        busy.wait_until(lambda: "DATA" in busy.commands(), WAIT)
        second = submit_one(single, SENDER, ["user@after-slot.test"], "slot: waits its turn")
        wait_status(single, first, "delivered")
        wait_status(single, second, "delivered")
        [attempt] = history(single, second)
        assert attempt.outcome == "delivered", attempt
    _no_internal_errors(single)
