"""Admin changes reach sessions that are already logged in (issue 7, item 5).

Before the fix, a session that logged in kept its account, credential and
sender patterns for as long as it stayed connected (a NOOP now and then kept
it for ever): it queued ``MAIL FROM:<ceo@corp.test>`` after its senders were
narrowed and its account disabled. Now every write to accounts or credentials
changes a signal the workers map into memory, and a session re-reads its login
at its next MAIL or end of data; sessions also have a maximum length and a
maximum number of messages.
"""

from __future__ import annotations

import time

from .helpers import (
    ALICE,
    BOB,
    RawSMTP,
    Server,
    ServerPool,
    User,
    make_message,
    session,
)
from .security_helpers import new_credential

RCPT = "rcpt@example.net"


def _message(sender: str, subject: str) -> bytes:
    return make_message(from_addr=sender, to=[RCPT], subject=subject)


def _mail(client: RawSMTP, sender: str) -> str:
    return client.command(f"MAIL FROM:<{sender}>").status


def test_disabling_an_account_stops_its_open_sessions(fresh_servers: ServerPool) -> None:
    user = User("dora@example.com", "Dora-pw-4Tg8kLm2")
    server = fresh_servers.create("disable", workers=2, users=[user])
    with session(server, user=user) as first, session(server, user=user) as second:
        first.send_mail(user.address, [RCPT], _message(user.address, "before"))
        server.cli("user", "disable", user.address)
        reply = first.command(f"MAIL FROM:<{user.address}>")
        assert reply.status == "530 5.7.0", str(reply)
        assert "account disabled" in reply.text
        # The login is gone: MAIL needs a new AUTH, and that fails now.
        assert _mail(first, user.address) == "530 5.7.0"
        assert first.auth_plain(user.address, user.password).status == "535 5.7.8"
        assert _mail(second, user.address) == "530 5.7.0"  # the other worker too
    event = server.wait_for_event("auth.revoked")
    assert event["reason"] == "account disabled" and event["user"] == user.address
    assert server.subjects() == {"before"}


def test_narrowed_senders_apply_to_open_sessions(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("senders", users=[BOB])
    with session(server, user=BOB) as client:
        assert _mail(client, "bob@alias.test") == "250 2.1.0"
        assert client.command("RSET").code == 250
        server.cli("user", "senders", BOB.address, "@example.org")
        assert _mail(client, "bob@alias.test") == "553 5.7.1"
        assert _mail(client, "bob@example.org") == "250 2.1.0"


def test_a_revoked_credential_stops_its_sessions(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("revoke", users=[ALICE])
    secret = new_credential(server, ALICE.address, "webapp")
    with session(server) as client:
        client.login(ALICE.address, secret)
        client.send_mail(ALICE.address, [RCPT], _message(ALICE.address, "with the credential"))
        server.cli("credential", "revoke", ALICE.address, "webapp")
        reply = client.command(f"MAIL FROM:<{ALICE.address}>")
        assert reply.status == "530 5.7.0" and "credential revoked" in reply.text, str(reply)
    # A password session of the same account is not affected by that.
    with session(server, user=ALICE) as client:
        client.send_mail(ALICE.address, [RCPT], _message(ALICE.address, "with the password"))


def test_a_password_change_stops_sessions_logged_in_with_the_old_one(
    fresh_servers: ServerPool,
) -> None:
    user = User("erin@example.com", "Erin-pw-6Hs2qWx9")
    server = fresh_servers.create("passwd", users=[user])
    with session(server, user=user) as client:
        server.set_password(user.address, "Erin-new-pw-3Kd8")
        reply = client.command(f"MAIL FROM:<{user.address}>")
        assert reply.status == "530 5.7.0" and "password changed" in reply.text, str(reply)
        client.login(user.address, "Erin-new-pw-3Kd8")
        client.send_mail(user.address, [RCPT], _message(user.address, "new password"))


def test_disabling_during_data_refuses_the_message(fresh_servers: ServerPool) -> None:
    user = User("fay@example.com", "Fay-pw-7Jd3sPq1")
    server = fresh_servers.create("during-data", users=[user])
    with session(server, user=user) as client:
        client.transaction(user.address, [RCPT])
        assert client.command("DATA").code == 354
        client.send(_message(user.address, "half way"))
        server.cli("user", "disable", user.address)
        client.send(b".\r\n")
        assert client.reply().status == "530 5.7.0"
    assert "half way" not in server.subjects()


def test_messages_per_session_are_capped(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create(
        "per-session", users=[ALICE], limits={"max_messages_per_session": 2}
    )
    with session(server, user=ALICE) as client:
        for n in range(2):
            client.send_mail(ALICE.address, [RCPT], _message(ALICE.address, f"m{n}"))
        reply = client.command(f"MAIL FROM:<{ALICE.address}>")
        assert reply.status == "421 4.7.0", str(reply)
        assert client.wait_closed(5)
    with session(server, user=ALICE) as client:  # a new connection goes on
        client.send_mail(ALICE.address, [RCPT], _message(ALICE.address, "m2"))


def test_a_session_cannot_be_kept_for_ever(fresh_servers: ServerPool) -> None:
    server: Server = fresh_servers.create(
        "duration", users=[ALICE], limits={"max_session_duration": 2}
    )
    with session(server, user=ALICE) as client:
        started = time.monotonic()
        closed = None
        while time.monotonic() - started < 8:
            try:
                reply = client.command("NOOP")
            except Exception:
                break
            if reply.code == 421:
                closed = reply
                break
            time.sleep(0.3)
        assert closed is not None and closed.status == "421 4.4.2", closed
        assert 2 <= time.monotonic() - started < 5
        assert client.wait_closed(5)
