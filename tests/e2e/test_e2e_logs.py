"""The log file: one parseable line per event, stable keys, no secrets.

This module runs its own server so it knows every line in its log.
"""

from __future__ import annotations

import base64
import binascii
import re

import pytest

from .helpers import (
    ALICE,
    BOB,
    CAROL,
    SENT_SECRETS,
    RawSMTP,
    Server,
    ServerPool,
    b64,
    make_message,
    parse_log_line,
    queue_id_of,
    remember_credentials,
    session,
)

RCPT = "rcpt@example.net"


@pytest.fixture(scope="module")
def logged(servers: ServerPool) -> Server:
    return servers.create("logs", users=[ALICE, BOB, CAROL], limits={"max_message_size": 10000})


def _events_since(server: Server, mark: int, name: str) -> list[dict[str, str]]:
    events = server.log_events(name, since=mark)
    assert events, f"no {name} event"
    return events


def test_every_line_is_one_event(logged: Server) -> None:
    with session(logged, user=ALICE) as client:
        client.send_mail(
            ALICE.address, [RCPT], make_message(from_addr=ALICE.address, to=[RCPT], subject="one")
        )
    text = logged.log_text()
    lines = text[: text.rfind("\n") + 1].splitlines()  # not a line being written now
    assert lines
    for line in lines:
        event = parse_log_line(line)  # raises on anything else
        assert event["event"]


def test_accepted_message_keys(logged: Server) -> None:
    mark = logged.log_mark()
    with session(logged, user=ALICE) as client:
        queue_id = client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject="keys"),
        )
    accepted = logged.wait_for_event("message.accepted", since=mark)
    assert accepted["queue_id"] == queue_id
    assert accepted["user"] == ALICE.address
    assert accepted["client_ip"] == "127.0.0.1"
    assert re.fullmatch(r"[0-9a-f]{6,}", accepted["session"]), accepted
    session_id = accepted["session"]
    # The same session id ties the connection's other events together.
    names = [e["event"] for e in logged.log_events(since=mark) if e.get("session") == session_id]
    assert names[0] == "connect"
    assert "auth.ok" in names
    assert "message.accepted" in names
    disconnect = logged.wait_for_event(
        "disconnect", lambda e: e.get("session") == session_id, since=mark
    )
    assert disconnect["user"] == ALICE.address
    assert disconnect["client_ip"] == "127.0.0.1"


def test_accepted_message_has_reply_key(logged: Server) -> None:
    mark = logged.log_mark()
    with session(logged, user=ALICE) as client:
        client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject="reply key"),
        )
    accepted = logged.wait_for_event("message.accepted", since=mark)
    assert accepted.get("reply", "").startswith("250"), accepted


def test_refusal_keys(logged: Server) -> None:
    mark = logged.log_mark()
    with session(logged) as client:
        assert client.auth_plain(ALICE.address, "Wrong-pw-for-logs-1").code == 535
        assert client.command(f"MAIL FROM:<{ALICE.address}>").code == 530
        client.login(ALICE.address, ALICE.password)
        assert client.command(f"MAIL FROM:<{BOB.address}>").code == 553
        client.transaction(ALICE.address, [RCPT])
        message = make_message(from_addr=BOB.address, to=[RCPT], subject="foreign from")
        assert client.data(message).code == 550

    fail = _events_since(logged, mark, "auth.fail")[0]
    assert fail["user"] == ALICE.address
    assert fail["reply"] == "535"
    assert fail["client_ip"] == "127.0.0.1"
    session_id = fail["session"]

    refused = _events_since(logged, mark, "command.refused")[0]
    assert refused["session"] == session_id
    assert refused["command"] == "MAIL"
    assert refused["reply"].startswith("530 5.7.0")

    mail = _events_since(logged, mark, "mail.refused")[0]
    assert (mail["session"], mail["user"], mail["mail_from"]) == (
        session_id,
        ALICE.address,
        BOB.address,
    )
    assert mail["reply"].startswith("553 5.7.1")

    header = _events_since(logged, mark, "message.refused")[0]
    assert (header["session"], header["user"]) == (session_id, ALICE.address)
    assert header["reply"].startswith("550 5.7.1")
    assert not logged.log_events("message.accepted", since=mark)


def test_client_chosen_values_cannot_forge_fields(logged: Server) -> None:
    mark = logged.log_mark()
    forged_user = 'x" event=auth.ok user="admin@example.com'
    with session(logged) as client:
        assert client.auth_plain(forged_user, "Forged-pw-0Yt5").code == 535
        client.login(ALICE.address, ALICE.password)
        # "=" is a legal address character: the value must be quoted, not split.
        assert client.command("MAIL FROM:<user=root@example.com>").code == 553
    fail = _events_since(logged, mark, "auth.fail")[0]
    assert fail["user"] == forged_user
    assert not [e for e in logged.log_events("auth.ok", since=mark) if e["user"] != ALICE.address]
    mail = _events_since(logged, mark, "mail.refused")[0]
    assert mail["mail_from"] == "user=root@example.com"
    assert mail["user"] == ALICE.address


def test_no_secret_ever_reaches_the_log(logged: Server) -> None:
    """Every way a password or AUTH payload can be sent; none may appear in the log."""
    extra: list[str] = []

    def secret(text: str) -> str:
        extra.append(text)
        return text

    with session(logged) as client:
        # PLAIN, initial response: right, wrong, unknown user, disabled account.
        client.login(ALICE.address, ALICE.password)
    for user, password in [
        (ALICE.address, "Wrong-pw-Logs-8Kq"),
        ("ghost@example.com", "Ghost-pw-Logs-3Vb"),
        (CAROL.address, CAROL.password),
    ]:
        with session(logged) as client:
            assert client.auth_plain(user, password).code == 535
    with session(logged) as client:
        # PLAIN after an empty challenge.
        assert client.command("AUTH PLAIN").code == 334
        assert client.command(b64(f"\0{BOB.address}\0{BOB.password}")).code == 235
    with session(logged) as client:
        # LOGIN, wrong then right.
        assert client.auth_login(BOB.address, "Wrong-pw-Login-4Hs").code == 535
        assert client.auth_login(BOB.address, BOB.password).code == 235
    with session(logged) as client:
        # LOGIN with the user name as initial response.
        assert client.command(f"AUTH LOGIN {b64(ALICE.address)}").code == 334
        assert client.command(b64(ALICE.password)).code == 235
    with session(logged) as client:
        # Malformed and undecodable payloads that hold a password.
        bad = secret("Not-base64-Secret-7Jd!")
        assert client.command(f"AUTH PLAIN {bad}").status == "501 5.5.2"
        one_nul = secret(b64("Malformed-Secret-2Pw\0only-one-nul"))
        assert client.command(f"AUTH PLAIN {one_nul}").status == "501 5.5.2"
        proxy = secret(b64(f"{BOB.address}\0{ALICE.address}\0{ALICE.password}"))
        assert client.command(f"AUTH PLAIN {proxy}").status == "535 5.7.8"
        assert client.command("AUTH LOGIN").code == 334
        assert client.command(secret("Login-Bad-b64-Secret-9Qa?")).status == "501 5.5.2"
        long_line = secret(b64("Too-Long-Secret-" + "p" * 13000))
        assert client.command(f"AUTH PLAIN {long_line}").status == "500 5.5.2"
    with RawSMTP.connect(logged.starttls_port) as client:
        # In plaintext, where AUTH is refused.
        client.ehlo()
        plain_payload = secret(b64(f"\0{ALICE.address}\0{ALICE.password}"))
        assert client.command(f"AUTH PLAIN {plain_payload}").status == "538 5.7.11"
    for user, password in [(ALICE.address, ALICE.password), (BOB.address, BOB.password)]:
        remember_credentials(user, password)

    leaked = logged.secrets_in_log(SENT_SECRETS | set(extra))
    assert not leaked, leaked
    # Nothing that looks like a PLAIN payload either (base64 of text with NULs).
    for token in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", logged.log_text()):
        try:
            decoded = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            continue
        assert b"\0" not in decoded, token
    # The events themselves are there, with the user names in the clear.
    users = {e["user"] for e in logged.log_events("auth.fail")}
    assert {ALICE.address, "ghost@example.com", CAROL.address, BOB.address} <= users


def test_queue_id_in_reply_matches_log(logged: Server) -> None:
    mark = logged.log_mark()
    with session(logged, implicit=False, user=BOB) as client:
        client.transaction(BOB.address, [RCPT, "two@example.net"])
        reply = client.data(make_message(from_addr=BOB.address, to=[RCPT], subject="ids"))
    queue_id = queue_id_of(reply.text)
    accepted = logged.wait_for_event("message.accepted", since=mark)
    assert accepted["queue_id"] == queue_id
    assert accepted["rcpts"] == "2"
    assert accepted["user"] == BOB.address
    tls = _events_since(logged, mark, "tls")[0]
    assert tls["session"] == accepted["session"]
    assert tls["version"] in ("TLSv1.2", "TLSv1.3")
