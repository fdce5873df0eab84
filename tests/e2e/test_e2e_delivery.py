"""End to end: onward delivery through a smarthost, the queue CLI, DKIM, a crash.

A real relaygate (``[delivery] mode = "smarthost"``) delivers to SMTP sinks on
127.66.x.y; only the outside world is faked. One module server serves most
tests: its ``[delivery.smarthost]`` wants STARTTLS with a verified certificate
and AUTH, and ``[[delivery.routes]]`` send three test domains elsewhere
(unverified STARTTLS, implicit TLS, and a certificate relaygate must refuse).
The sinks' CA reaches relaygate through SSL_CERT_FILE, as an admin with a
private CA would do it. Its retry_schedule is long ([60]) so that a deferred
message stays put while a test looks at ``queue list`` and uses ``queue
retry`` and ``queue delete``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import dkim
import pytest

from fakes.smtp_sink import SMTPSink, make_tls_context

from .delivery_helpers import (
    WAIT,
    DeliveryServer,
    ca_bundle,
    delivery_toml,
    dkim_txt_records,
    find_dsns,
    history,
    loopback_address,
    new_server,
    password_file,
    queue_rows,
    queue_rows_for,
    status_of,
    submit_one,
    wait_status,
)
from .helpers import (
    ALICE,
    Server,
    ServerPool,
    User,
    field_values,
    make_message,
    session,
    wait_until,
)

SENDER = User("alice@example.test", "Alice-delivery-pw-4Hx8")
RELAY_USER = "relaygate-out"
RELAY_PASSWORD = "Relay-pw-7Qm2Zk9d"  # the smarthost's credential, in a password_file


@dataclass
class Relay:
    server: DeliveryServer
    smarthost: SMTPSink  # STARTTLS, trusted certificate, AUTH required
    unverified: SMTPSink  # route unverified.test: STARTTLS, untrusted cert, verify off
    implicit: SMTPSink  # route implicit.test: implicit TLS, trusted cert
    strict: SMTPSink  # route strict.test: STARTTLS, untrusted cert, verify on

    @property
    def sinks(self) -> list[SMTPSink]:
        return [self.smarthost, self.unverified, self.implicit, self.strict]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    base = tmp_path_factory.mktemp("e2e-delivery")
    tls_dir = base / "tls"
    hosts = [loopback_address() for _ in range(4)]
    trusted_smarthost, smarthost_ca = make_tls_context("smarthost.test", tls_dir, ips=hosts[:1])
    untrusted, _ = make_tls_context("untrusted.test", tls_dir, ips=hosts[1:2] + hosts[3:4])
    trusted_implicit, implicit_ca = make_tls_context("implicit.test", tls_dir, ips=hosts[2:3])
    sinks = [
        SMTPSink(
            hosts[0],
            tls=trusted_smarthost,
            require_auth=(RELAY_USER, RELAY_PASSWORD),
            auth_requires_tls=True,
            hostname="smarthost.test",
        ),
        SMTPSink(hosts[1], tls=untrusted, hostname="unverified.test"),
        SMTPSink(hosts[2], tls=trusted_implicit, implicit_tls=True, hostname="implicit.test"),
        SMTPSink(hosts[3], tls=untrusted, hostname="strict.test"),
    ]
    pool = ServerPool(base / "servers")
    try:
        for sink in sinks:
            sink.start()
        smarthost, unverified, implicit, strict = sinks
        config = delivery_toml(
            {
                "mode": "smarthost",
                "retry_schedule": [60],
                "connect_timeout": 5,
                "command_timeout": 10,
            },
            smarthost={
                "host": hosts[0],
                "port": smarthost.port,
                "tls": "starttls",
                "verify_certificate": True,
                "username": RELAY_USER,
                "password_file": str(password_file(base, RELAY_USER, RELAY_PASSWORD)),
            },
            routes=[
                {
                    "domain": "unverified.test",
                    "host": hosts[1],
                    "port": unverified.port,
                    "tls": "starttls",
                    "verify_certificate": False,
                },
                {
                    "domain": "implicit.test",
                    "host": hosts[2],
                    "port": implicit.port,
                    "tls": "implicit",
                },
                {
                    "domain": "strict.test",
                    "host": hosts[3],
                    "port": strict.port,
                    "tls": "starttls",
                    "verify_certificate": True,
                },
            ],
        )
        bundle = ca_bundle(base / "trusted-cas.pem", [smarthost_ca, implicit_ca])
        server = new_server(
            pool,
            "relay",
            extra_toml=config,
            users=[SENDER],
            env={"SSL_CERT_FILE": str(bundle)},
            dkim=[["example.test"], ["example.test", "--algorithm", "ed25519", "--selector", "ed"]],
        )
        yield Relay(server, smarthost, unverified, implicit, strict)
    finally:
        problems = pool.finish()
        for sink in sinks:
            sink.stop()
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def clean(relay: Relay) -> Iterator[Relay]:
    """Sinks back to normal and empty; nothing of this test left in the queue."""
    for sink in relay.sinks:
        sink.reset_behaviour()
        sink.clear()
    yield relay
    for row in queue_rows(relay.server):
        relay.server.cli("queue", "delete", str(row["id"]), check=False)


def _only_message(sink: SMTPSink, subject: str) -> bytes:
    [received] = [m for m in sink.wait_for_messages(1, WAIT) if m.message()["Subject"] == subject]
    return received.data


# ------------------------------------------------------------------ smarthost TLS and AUTH


def test_smarthost_starttls_verified_with_auth(clean: Relay) -> None:
    server = clean.server
    subject = "smarthost: starttls, verified, auth"
    queue_id = submit_one(server, SENDER, ["friend@elsewhere.test"], subject)
    assert wait_status(server, queue_id, "delivered") == "delivered"

    [received] = clean.smarthost.wait_for_messages(1, WAIT)
    assert received.auth_user == RELAY_USER
    assert received.tls and received.tls_version in ("TLSv1.2", "TLSv1.3")
    assert received.mail_from == SENDER.address
    assert received.rcpt_to == ["friend@elsewhere.test"]
    assert received.helo == "localhost"  # our [server] hostname
    assert received.message()["Subject"] == subject
    # The message as we spooled it: our Received field, then the client's header.
    assert f"id {queue_id}".encode() in received.data
    # AUTH came only after STARTTLS (the sink offers it only then).
    commands = clean.smarthost.commands(received.connection_id)
    assert commands.index("STARTTLS") < commands.index("AUTH") < commands.index("MAIL")

    [attempt] = history(server, queue_id)
    assert attempt.outcome == "delivered"
    assert attempt.recipient == "friend@elsewhere.test"
    assert attempt.host.endswith(f":{clean.smarthost.port}")
    assert attempt.tls.endswith(" verified"), attempt
    assert attempt.tls.startswith(received.tls_version or "?"), attempt
    assert queue_rows_for(server, queue_id) == []
    assert RELAY_PASSWORD not in server.log_text()


def test_smarthost_starttls_unverified_when_verification_is_off(clean: Relay) -> None:
    server = clean.server
    subject = "route: starttls, untrusted certificate, verify_certificate = false"
    queue_id = submit_one(server, SENDER, ["someone@unverified.test"], subject)
    wait_status(server, queue_id, "delivered")
    [received] = clean.unverified.wait_for_messages(1, WAIT)
    assert received.tls and received.auth_user is None
    assert received.rcpt_to == ["someone@unverified.test"]
    assert clean.smarthost.messages == []  # the route, not the smarthost
    [attempt] = history(server, queue_id)
    assert attempt.outcome == "delivered"
    assert attempt.tls.endswith(" unverified"), attempt


def test_smarthost_implicit_tls(clean: Relay) -> None:
    server = clean.server
    subject = "route: implicit TLS, verified"
    queue_id = submit_one(server, SENDER, ["someone@implicit.test"], subject)
    wait_status(server, queue_id, "delivered")
    [received] = clean.implicit.wait_for_messages(1, WAIT)
    assert received.tls and received.tls_version is not None
    # Implicit TLS: TLS from the first byte, so no STARTTLS command at all.
    assert "STARTTLS" not in clean.implicit.commands()
    [attempt] = history(server, queue_id)
    assert attempt.outcome == "delivered"
    assert attempt.tls.startswith(received.tls_version), attempt
    assert attempt.tls.endswith(" verified"), attempt


def test_smarthost_untrusted_certificate_is_refused_when_verifying(clean: Relay) -> None:
    server = clean.server
    queue_id = submit_one(server, SENDER, ["someone@strict.test"], "route: untrusted cert")

    def deferred() -> bool:
        rows = queue_rows_for(server, queue_id)
        return bool(rows) and rows[0]["attempts"] >= 1

    wait_until(deferred, WAIT, 0.1, "the attempt against the untrusted certificate")
    [row] = queue_rows_for(server, queue_id)
    assert row["status"] == "queued"
    assert str(row["last_reply"]).startswith("451 "), row
    assert "certificate" in str(row["last_reply"]).lower(), row
    assert status_of(server, queue_id) == "queued"
    # Nothing went over the connection that failed verification.
    assert clean.strict.messages == []
    assert "MAIL" not in clean.strict.commands()
    assert "AUTH" not in clean.strict.commands()
    [attempt] = history(server, queue_id)
    assert attempt.outcome == "deferred"


# ------------------------------------------------------------------ the queue CLI


def test_queue_list_shows_deferred_and_retry_sends_at_once(clean: Relay) -> None:
    server = clean.server
    clean.smarthost.reply_to("RCPT", "451 4.3.0 Temporary trouble, try later")
    subject = "queue: retry now"
    queue_id = submit_one(server, SENDER, ["later@elsewhere.test"], subject)

    def waiting() -> bool:
        rows = queue_rows_for(server, queue_id)
        return bool(rows) and rows[0]["attempts"] == 1

    wait_until(waiting, WAIT, 0.1, "the first, deferred attempt")
    [row] = queue_rows_for(server, queue_id)
    assert row["status"] == "queued"
    assert row["domain"] == "elsewhere.test"
    assert row["recipients"] == ["later@elsewhere.test"]
    assert row["mail_from"] == SENDER.address
    assert row["last_reply"] == "451 4.3.0 Temporary trouble, try later"
    # retry_schedule = [60] (+-20%): left alone it would wait at least 48 s.
    assert datetime.fromisoformat(row["next_attempt"]).timestamp() - time.time() > 40, row
    table = server.cli("queue", "list").stdout
    assert queue_id in table and "451 4.3.0 Temporary trouble" in table, table
    shown = server.cli("queue", "show", queue_id).stdout
    assert "waiting: elsewhere.test (queued, 1 tries" in shown, shown
    assert clean.smarthost.messages == []

    started = time.monotonic()
    out = server.cli("queue", "retry", queue_id).stdout
    assert "1 delivery(ies) will be tried now" in out, out
    wait_status(server, queue_id, "delivered", timeout=5.0)
    assert time.monotonic() - started < 5.0
    [received] = clean.smarthost.wait_for_messages(1, WAIT)
    assert received.message()["Subject"] == subject
    deferred, delivered = history(server, queue_id)
    assert (deferred.outcome, deferred.reply) == (
        "deferred",
        "451 4.3.0 Temporary trouble, try later",
    )
    assert delivered.outcome == "delivered"
    assert queue_rows_for(server, queue_id) == []


def test_queue_delete_stops_a_deferred_message_without_a_bounce(clean: Relay) -> None:
    server = clean.server
    clean.smarthost.reply_to("RCPT", "451 4.3.0 Temporary trouble, try later")
    queue_id = submit_one(server, SENDER, ["never@elsewhere.test"], "queue: delete")
    wait_until(
        lambda: any(r["attempts"] >= 1 for r in queue_rows_for(server, queue_id)),
        WAIT,
        0.1,
        "the deferred attempt",
    )
    out = server.cli("queue", "delete", queue_id).stdout
    assert f"deleted {queue_id}" in out and "no bounce" in out, out
    assert queue_rows(server) == []
    assert status_of(server, queue_id) == "deleted"
    # Even "retry now" does not bring it back.
    assert server.cli("queue", "retry", queue_id, check=False).returncode != 0
    time.sleep(1.0)  # two polls of the delivery process
    assert clean.smarthost.messages == []
    assert find_dsns(server, queue_id) == []
    assert [a.outcome for a in history(server, queue_id)] == ["deferred"]


# ------------------------------------------------------------------ DKIM


def test_delivered_messages_carry_dkim_signatures_that_verify(clean: Relay) -> None:
    server = clean.server
    subject = "dkim: rsa and ed25519"
    queue_id = submit_one(server, SENDER, ["dkim@elsewhere.test"], subject)
    wait_status(server, queue_id, "delivered")
    data = _only_message(clean.smarthost, subject)

    signatures = field_values(data, "DKIM-Signature")
    assert len(signatures) == 2, signatures
    tags = [
        dict(part.strip().split("=", 1) for part in sig.split(";") if "=" in part)
        for sig in signatures
    ]
    # RSA on top (some verifiers read only the first), then Ed25519.
    assert [(t["a"], t["s"], t["d"]) for t in tags] == [
        ("rsa-sha256", "relaygate", "example.test"),
        ("ed25519-sha256", "ed", "example.test"),
    ]
    records = dkim_txt_records(server, "example.test")
    assert set(records) == {"relaygate._domainkey.example.test", "ed._domainkey.example.test"}

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes:
        key = (name.decode() if isinstance(name, bytes) else name).rstrip(".").lower()
        return records.get(key, "").encode()

    def verifies(message: bytes, index: int) -> bool:
        try:
            return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            return False

    assert verifies(data, 0), "the rsa-sha256 signature does not verify"
    assert verifies(data, 1), "the ed25519-sha256 signature does not verify"
    assert dkim.verify(data, dnsfunc=dnsfunc)
    # A change in transit breaks both: the signatures cover the body and Subject.
    for tampered in (
        data.replace(b"Hello from an end-to-end test.", b"Hello from somebody else."),
        data.replace(f"Subject: {subject}".encode(), b"Subject: something else"),
    ):
        assert tampered != data
        assert not verifies(tampered, 0)
        assert not verifies(tampered, 1)


# ------------------------------------------------------------------ replies, 8-bit and UTF-8 mail


def test_history_of_a_delivery_holds_the_remote_reply(clean: Relay) -> None:
    server = clean.server
    clean.smarthost.reply_to("DATA_END", "250 2.0.0 Ok: queued as REMOTE-ID-4711")
    queue_id = submit_one(server, SENDER, ["reply@elsewhere.test"], "history: remote reply")
    wait_status(server, queue_id, "delivered")
    [attempt] = history(server, queue_id)
    assert attempt.reply == "250 2.0.0 Ok: queued as REMOTE-ID-4711", attempt


def test_smtputf8_recipient_is_delivered(clean: Relay) -> None:
    server = clean.server
    rcpt = "jörg@elsewhere.test"
    with session(server, user=SENDER) as client:
        reply = client.command(f"MAIL FROM:<{SENDER.address}> SMTPUTF8")
        assert reply.code == 250, str(reply)
        reply = client.command(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, str(reply)
        message = make_message(from_addr=SENDER.address, to=[rcpt], subject="smtputf8")
        reply = client.data(message)
        assert reply.code == 250, str(reply)
        queue_id = reply.text.rsplit(" ", 1)[-1]
    try:
        wait_status(server, queue_id, {"delivered", "failed"}, timeout=5.0)
    except AssertionError:
        rows = queue_rows_for(server, queue_id)
        raise AssertionError(f"SMTPUTF8 message stuck: {rows}") from None
    [received] = clean.smarthost.wait_for_messages(1, WAIT)
    assert received.rcpt_to == [rcpt]
    assert "SMTPUTF8" in [o.upper() for o in received.mail_options]


def test_8bitmime_body_is_declared_onward(clean: Relay) -> None:
    server = clean.server
    rcpt = "eight@elsewhere.test"
    with session(server, user=SENDER) as client:
        reply = client.command(f"MAIL FROM:<{SENDER.address}> BODY=8BITMIME")
        assert reply.code == 250, str(reply)
        reply = client.command(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, str(reply)
        message = make_message(
            from_addr=SENDER.address,
            to=[rcpt],
            subject="8bitmime",
            body="Grüße aus Köln.\r\n",
            extra_headers=["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"],
        )
        reply = client.data(message)
        assert reply.code == 250, str(reply)
        queue_id = reply.text.rsplit(" ", 1)[-1]
    wait_status(server, queue_id, "delivered")
    [received] = clean.smarthost.wait_for_messages(1, WAIT)
    assert "Grüße".encode() in received.data
    assert "BODY=8BITMIME" in [o.upper() for o in received.mail_options], received.mail_options


# ------------------------------------------------------------------ capture mode


def test_capture_mode_is_unchanged(server: Server) -> None:
    """The shared capture-mode server: stored as "captured", no delivery rows at all."""
    subject = "capture mode: still captured"
    queue_id = submit_one(server, ALICE, ["someone@example.net"], subject)
    entry = server.message(queue_id)
    assert entry["status"] == "captured"
    shown = server.cli("messages", "show", queue_id).stdout
    assert "status: captured" in shown
    assert "delivery history" not in shown
    assert history(server, queue_id) == []
    assert queue_rows(server) == []
    assert "queue is empty" in server.cli("queue", "list").stdout
    time.sleep(0.6)  # a delivery process would have polled by now: still nothing
    assert server.message(queue_id)["status"] == "captured"
    assert not server.log_events("delivery.start")


# ------------------------------------------------------------------ crash


def test_crash_during_delivery_loses_nothing(fresh_servers: ServerPool, tmp_path: Path) -> None:
    """SIGKILL while the remote holds its reply to the final dot; after a restart
    the message goes again and arrives exactly once.

    The first transaction never completed: the sink holds it until it is stopped
    (as a remote that never said 250 would drop it), so the one accepted message
    is the second attempt's. The remote's 250 was never sent, so this is not
    the documented duplicate window (queue.py), and exactly one copy is right.
    """
    host = loopback_address()
    with SMTPSink(host, hostname="crash.test") as sink:
        sink.delay_reply("DATA_END", 30.0)  # longer than the test: never answered
        server = new_server(
            fresh_servers,
            "crash",
            users=[SENDER],
            extra_toml=delivery_toml(
                {"mode": "smarthost", "retry_schedule": [1]},
                smarthost={"host": host, "port": sink.port, "tls": "none"},
            ),
        )
        subject = "crash: killed mid-delivery"
        queue_id = submit_one(server, SENDER, ["crash@elsewhere.test"], subject)

        def holding() -> bool:
            commands = sink.commands()
            return "DATA" in commands and any(e.kind == "connect" for e in sink.events)

        wait_until(holding, WAIT, 0.05, "relaygate to reach the end of DATA")
        time.sleep(0.3)  # the body and the final dot are on their way
        [row] = queue_rows_for(server, queue_id)
        assert row["status"] == "sending", row
        assert sink.messages == []

        mark = server.log_mark()
        server.kill()  # SIGKILL to the process group: supervisor, worker, delivery
        server.start()
        resumed = server.wait_for_event("delivery.resumed", since=mark, timeout=WAIT)
        assert resumed["rows"] == "1"
        wait_status(server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.message()["Subject"] == subject
        assert received.connection_id != 1  # a new connection, after the restart
        time.sleep(0.6)
        assert len(sink.messages) == 1
        # The first connection got the whole message but never gave a final reply.
        assert "DATA" in sink.commands(1)
        assert not [e for e in sink.events if e.kind == "message" and e.connection_id == 1]
        assert [a.outcome for a in history(server, queue_id)] == ["delivered"]
        assert queue_rows(server) == []
