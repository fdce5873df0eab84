"""App credentials end to end: made with the CLI, used by smtplib over real TLS.

A credential is a server-generated secret an account logs in with (user name =
the account's address, password = the secret). Each test makes its own
credentials (names are unique per account) on one module server.
"""

from __future__ import annotations

import smtplib
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from .helpers import (
    ALICE,
    Server,
    ServerPool,
    User,
    make_message,
    queue_id_of,
    session,
    wait_until,
)
from .security_helpers import (
    AUTH_FAILED,
    SECRET,
    new_credential,
    raw_login,
    scram_exchange,
    smtplib_auth,
    smtplib_session,
)

RCPT = "rcpt@example.net"
DEV = User("dev@example.test", "Dev-pw-4Gh7jK1m", senders=("@example.test",))
SAM = User("sam@example.test", "Sam-pw-9Pl2wE5r")


@pytest.fixture(scope="module")
def cred_server(servers: ServerPool) -> Server:
    return servers.create("credentials", users=[ALICE, DEV, SAM])


def _credentials(server: Server, address: str) -> dict[str, dict[str, Any]]:
    listed = server.quick_json("credential", "list", address, "--json")
    return {c["name"]: c for c in cast(list[dict[str, Any]], listed)}


def _send_with_smtplib(
    server: Server, mechanism: str, user: str, password: str, subject: str
) -> str:
    with smtplib_session(server) as smtp:
        assert smtplib_auth(smtp, mechanism, user, password) == 235
        smtp.mail(user)
        smtp.rcpt(RCPT)
        code, text = smtp.data(make_message(from_addr=user, to=[RCPT], subject=subject))
    assert code == 250, text
    return queue_id_of(text.decode())


# ------------------------------------------------------------------ the happy path


def test_secret_is_shown_once_and_logs_in(cred_server: Server) -> None:
    mark = cred_server.log_mark()
    secret = new_credential(cred_server, DEV.address, "web")
    # Never shown again: not by list, not in JSON.
    table = cred_server.cli("credential", "list", DEV.address).stdout
    listing = cred_server.cli("credential", "list", DEV.address, "--json").stdout
    assert "web" in table and secret not in table
    assert secret not in listing and not SECRET.search(listing)
    assert _credentials(cred_server, DEV.address)["web"]["status"] == "active"

    sent = {
        mechanism: _send_with_smtplib(
            cred_server, mechanism, DEV.address, secret, f"credential web via {mechanism}"
        )
        for mechanism in ("PLAIN", "LOGIN")
    }
    with_password = _send_with_smtplib(
        cred_server, "PLAIN", DEV.address, DEV.password, "dev with the password"
    )
    listed = {m["id"]: m for m in cred_server.messages()}
    for queue_id in sent.values():
        assert listed[queue_id]["credential"] == "web", listed[queue_id]
        assert listed[queue_id]["account"] == DEV.address
    assert listed[with_password]["credential"] is None, listed[with_password]
    # `messages show` names it too.
    shown = cred_server.cli("messages", "show", sent["PLAIN"]).stdout
    assert "credential: web" in shown, shown

    oks = cred_server.log_events("auth.ok", since=mark)
    assert sorted(e["mechanism"] for e in oks if e.get("credential") == "web") == [
        "LOGIN",
        "PLAIN",
    ]
    assert cred_server.secrets_in_log([secret]) == []


def test_last_used_is_recorded(cred_server: Server) -> None:
    secret = new_credential(cred_server, DEV.address, "cron")
    assert _credentials(cred_server, DEV.address)["cron"]["last_used_at"] is None
    before = time.time()
    assert raw_login(cred_server, DEV.address, secret).status == "235 2.7.0"
    after = time.time()
    text = _credentials(cred_server, DEV.address)["cron"]["last_used_at"]
    assert isinstance(text, str) and text.endswith("Z"), text  # RFC 3339, UTC
    used = datetime.fromisoformat(text).timestamp()
    assert before - 1 <= used <= after + 1, (before, used, after)
    table = cred_server.cli("credential", "list", DEV.address).stdout
    row = next(line for line in table.splitlines() if line.startswith("cron "))
    assert not row.rstrip().endswith("never"), row


def test_credential_is_bound_to_its_account(cred_server: Server) -> None:
    secret = new_credential(cred_server, DEV.address, "bound")
    assert str(raw_login(cred_server, ALICE.address, secret)) == AUTH_FAILED
    assert str(raw_login(cred_server, "ghost@example.test", secret)) == AUTH_FAILED
    assert raw_login(cred_server, DEV.address.upper(), secret).code == 235


def test_password_and_credential_are_independent(cred_server: Server) -> None:
    secret = new_credential(cred_server, SAM.address, "indep")
    new_password = "Sam-new-pw-6Tg3hY8u"
    cred_server.set_password(SAM.address, new_password)
    assert raw_login(cred_server, SAM.address, secret).code == 235
    assert raw_login(cred_server, SAM.address, new_password).code == 235
    cred_server.set_password(SAM.address, SAM.password)
    # A credential is not a SCRAM password: the account's keys come from its password.
    with session(cred_server) as client:
        run = scram_exchange(client, "SCRAM-SHA-256", SAM.address, secret)
        assert str(run.last) == AUTH_FAILED


def test_disabled_account_refuses_its_credentials(cred_server: Server) -> None:
    secret = new_credential(cred_server, SAM.address, "while-disabled")
    cred_server.cli("user", "disable", SAM.address)
    try:
        assert str(raw_login(cred_server, SAM.address, secret)) == AUTH_FAILED
    finally:
        cred_server.cli("user", "enable", SAM.address)
    assert raw_login(cred_server, SAM.address, secret).code == 235


# ------------------------------------------------------------------ revocation and expiry


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_revoked_credential_fails(cred_server: Server, mechanism: str) -> None:
    name = f"revoked-{mechanism.lower()}"
    secret = new_credential(cred_server, DEV.address, name)
    with smtplib_session(cred_server) as smtp:
        assert smtplib_auth(smtp, mechanism, DEV.address, secret) == 235
    mark = cred_server.log_mark()
    cred_server.cli("credential", "revoke", DEV.address, name)
    with smtplib_session(cred_server) as smtp:
        assert smtplib_auth(smtp, mechanism, DEV.address, secret) == 535
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(DEV.address, [RCPT], b"Subject: x\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 530
    assert _credentials(cred_server, DEV.address)[name]["status"] == "revoked"
    event = cred_server.wait_for_event("auth.fail", since=mark)
    assert event["user"] == DEV.address
    assert event["reply"] == "535"


def test_expired_credential_fails(cred_server: Server) -> None:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
    secret = new_credential(
        cred_server, DEV.address, "short-lived", "--expires", expires.isoformat()
    )
    listed = _credentials(cred_server, DEV.address)["short-lived"]
    assert listed["expires_at"] == expires.strftime("%Y-%m-%dT%H:%M:%SZ"), listed
    assert raw_login(cred_server, DEV.address, secret).code == 235

    refused_at: list[float] = []

    def refused() -> bool:
        if raw_login(cred_server, DEV.address, secret).code != 535:
            return False
        refused_at.append(time.time())  # the server decided before this moment
        return True

    wait_until(refused, timeout=15, interval=0.25, what="the credential to expire")
    assert refused_at[0] >= expires.timestamp(), "refused before its expiry time"
    assert str(raw_login(cred_server, DEV.address, secret)) == AUTH_FAILED
    assert _credentials(cred_server, DEV.address)["short-lived"]["status"] == "expired"
    # The account password is unaffected.
    assert raw_login(cred_server, DEV.address, DEV.password).code == 235


def test_expiry_in_the_past_is_refused_by_the_cli(cred_server: Server) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat(timespec="seconds")
    result = cred_server.cli(
        "credential", "add", DEV.address, "--name", "stale", "--expires", past, check=False
    )
    assert result.returncode == 2, result
    assert "past" in result.stderr, result.stderr
    assert "stale" not in _credentials(cred_server, DEV.address)


# ------------------------------------------------------------------ networks and senders


def test_network_restriction(cred_server: Server) -> None:
    secret = new_credential(cred_server, DEV.address, "office", "--network", "127.0.1.0/24")
    mark = cred_server.log_mark()
    for source in ("127.0.1.1", "127.0.1.200"):
        assert raw_login(cred_server, DEV.address, secret, source=source).code == 235, source
    for source in ("127.0.0.1", "127.0.2.1"):
        reply = raw_login(cred_server, DEV.address, secret, source=source)
        assert str(reply) == AUTH_FAILED, source
    # smtplib from an allowed address, over STARTTLS this time.
    with smtplib_session(cred_server, source="127.0.1.1", implicit=False) as smtp:
        assert smtplib_auth(smtp, "LOGIN", DEV.address, secret) == 235
    # The account password is not restricted by its credential's networks.
    assert raw_login(cred_server, DEV.address, DEV.password, source="127.0.2.1").code == 235
    failed = cred_server.log_events("auth.fail", since=mark)
    assert sorted(e["client_ip"] for e in failed) == ["127.0.0.1", "127.0.2.1"]


def test_credential_senders_narrow_the_account(cred_server: Server) -> None:
    secret = new_credential(cred_server, DEV.address, "app", "--sender", "app@example.test")
    with session(cred_server) as client:
        client.login(DEV.address, secret)
        refused = client.command("MAIL FROM:<other@example.test>")
        assert refused.status == "553 5.7.1", str(refused)
        # The envelope is fine, the From: field is not: refused at the end of data.
        client.transaction("app@example.test", [RCPT])
        reply = client.data(
            make_message(from_addr="other@example.test", to=[RCPT], subject="forged from")
        )
        assert reply.status == "550 5.7.1", str(reply)
        subject = "app sends as itself"
        queue_id = client.send_mail(
            "app@example.test",
            [RCPT],
            make_message(from_addr="app@example.test", to=[RCPT], subject=subject),
        )
    entry = cred_server.message(queue_id)
    assert (entry["credential"], entry["mail_from"]) == ("app", "app@example.test")
    assert "forged from" not in cred_server.subjects()
    # The account itself may still send as any address of its domain.
    with session(cred_server, user=DEV) as client:
        assert client.command("MAIL FROM:<other@example.test>").status == "250 2.1.0"


def test_credential_cannot_widen_the_account(cred_server: Server) -> None:
    result = cred_server.cli(
        "credential", "add", DEV.address, "--name", "wide", "--sender", "@other.test", check=False
    )
    assert result.returncode == 2, result
    assert "not allowed" in result.stderr, result.stderr
    assert not SECRET.search(result.stdout)
    assert "wide" not in _credentials(cred_server, DEV.address)
