"""OAUTHBEARER and XOAUTH2 as step machines, and the AUTH dialogue around them:
offered over TLS only, the error challenge then 535, AUTH lines of 12,288 octets."""

from __future__ import annotations

import base64
import json

import pytest
from dialog import HOSTNAME, b64, dialog

from relaygate import sasl
from relaygate.sasl import BearerToken, Challenge, Malformed
from relaygate.smtp import replies
from relaygate.smtp.events import AuthRequest, Close, Refused
from relaygate.smtp.session import MAX_AUTH_LINE, Session, Settings, State

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJlbWFpbCI6ImFAYi5leGFtcGxlIn0.c2lnbmF0dXJl"
MECHANISMS = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")
OAUTH = Settings(HOSTNAME, auth_mechanisms=MECHANISMS)


def bearer(user: str = "alice@example.test", token: str = TOKEN) -> bytes:
    authzid = f"a={user}" if user else ""
    return f"n,{authzid},\x01host=mx.example\x01port=587\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(user: str = "alice@example.test", token: str = TOKEN) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def _mechanism(name: str) -> sasl.Mechanism:
    mechanism = sasl.create(name)
    assert mechanism is not None and mechanism.name == name
    return mechanism


# ------------------------------------------------------------ the step machines


def test_oauthbearer_initial_response() -> None:
    step = _mechanism("OAUTHBEARER").start(bearer())
    assert step == BearerToken("alice@example.test", TOKEN)
    assert TOKEN not in repr(step)


def test_oauthbearer_without_authzid_and_with_escapes() -> None:
    assert _mechanism("OAUTHBEARER").start(bearer(user="")) == BearerToken("", TOKEN)
    escaped = b"y,a=we=2Cird=3Dname@example.test,\x01auth=Bearer t\x01\x01"
    assert _mechanism("OAUTHBEARER").start(escaped) == BearerToken("we,ird=name@example.test", "t")


def test_oauthbearer_continuation_form() -> None:
    mechanism = _mechanism("OAUTHBEARER")
    assert mechanism.start(None) == Challenge(b"")
    assert mechanism.respond(bearer()) == BearerToken("alice@example.test", TOKEN)
    assert _mechanism("OAUTHBEARER").start(b"") == Challenge(b"")  # "AUTH OAUTHBEARER ="


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x01",
        b"p=tls-unique,,\x01auth=Bearer t\x01\x01",  # channel binding: not offered
        b"n,a=x@y\x01auth=Bearer t\x01\x01",  # GS2 header not closed
        b"n,u=x@y,\x01auth=Bearer t\x01\x01",
        b"n,a=bad=escape,\x01auth=Bearer t\x01\x01",
        b"n,,\x01auth=Bearer t\x01",  # no final ^A
        b"n,,\x01auth=Basic dXNlcjpwYXNz\x01\x01",
        b"n,,\x01auth=Bearer \x01\x01",
        b"n,,\x01auth=Bearer t\x7f\x01\x01",
        b"n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",  # a key twice
        b"n,,\x01host\x01\x01",
        b"n,,\xff\xfe",
        b"n,a=" + b"x" * 400 + b"@y,\x01auth=Bearer t\x01\x01",
    ],
)
def test_oauthbearer_malformed(message: bytes) -> None:
    assert isinstance(_mechanism("OAUTHBEARER").respond(message), Malformed)


def test_xoauth2() -> None:
    assert _mechanism("XOAUTH2").start(xoauth2()) == BearerToken("alice@example.test", TOKEN)
    mechanism = _mechanism("XOAUTH2")
    assert mechanism.start(None) == Challenge(b"")
    assert mechanism.respond(xoauth2()) == BearerToken("alice@example.test", TOKEN)
    for bad in (b"auth=Bearer t\x01\x01", b"user=\x01auth=Bearer t\x01\x01", b"user=a@b\x01\x01"):
        assert isinstance(_mechanism("XOAUTH2").respond(bad), Malformed)


def test_bearer_mechanisms_never_ask_for_keys() -> None:
    from relaygate.sasl import StoredKeys

    keys = StoredKeys(b"s", b"k", b"k", 4096)
    assert isinstance(_mechanism("XOAUTH2").provide(keys), Malformed)


def test_failure_challenges() -> None:
    document = json.loads(sasl.failure_challenge("OAUTHBEARER", "openid email", "https://i/r/"))
    assert document == {
        "status": "invalid_token",
        "schemes": "bearer",
        "scope": "openid email",
        "openid-configuration": "https://i/r/.well-known/openid-configuration",
    }
    assert json.loads(sasl.failure_challenge("OAUTHBEARER", None, None)) == {
        "status": "invalid_token",
        "schemes": "bearer",
    }
    gmail = json.loads(sasl.failure_challenge("XOAUTH2", "https://mail.example/", "https://i"))
    assert gmail == {"status": "401", "schemes": "Bearer", "scope": "https://mail.example/"}


# ------------------------------------------------------------ the AUTH dialogue


def test_offered_after_tls_only() -> None:
    starttls = Settings(HOSTNAME, starttls_available=True, auth_mechanisms=MECHANISMS)
    d = dialog("C: EHLO c", starttls, tls_active=False)
    assert not any("OAUTHBEARER" in line for line in d.replies())
    script = "C: EHLO c\nS~ 250 STARTTLS\nC: AUTH OAUTHBEARER\nS: 538 5.7.11"
    dialog(script, starttls, tls_active=False)
    d = dialog("C: EHLO c", OAUTH)
    assert "250 AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2" in d.replies()


def test_a_plaintext_development_port_never_takes_tokens() -> None:
    dev = Settings(HOSTNAME, auth_without_tls=True, auth_mechanisms=MECHANISMS)
    d = dialog("C: EHLO c", dev, tls_active=False)
    assert "250 AUTH PLAIN LOGIN" in d.replies()
    script = f"C: EHLO c\nS~ 250 AUTH\nC: AUTH XOAUTH2 {b64(xoauth2().decode())}\nS: 538 5.7.11"
    d = dialog(script, dev, tls_active=False)
    assert not d.of_type(AuthRequest)


def test_not_offered_without_oauth() -> None:
    d = dialog("C: EHLO c\nS~ 250 AUTH\nC: AUTH OAUTHBEARER\nS: 504 5.5.4")
    assert not d.of_type(AuthRequest)


def _session() -> Session:
    session = Session(OAUTH, tls_active=True)
    session.greeting()
    session.receive(b"EHLO c\r\n")
    assert session.next_event() is None
    session.take_output()
    return session


def _b64line(data: bytes) -> bytes:
    return base64.b64encode(data) + b"\r\n"


def test_initial_response_of_12000_octets_on_the_auth_line() -> None:
    session = _session()
    token = "t" * 8900
    line = b"AUTH OAUTHBEARER " + _b64line(bearer(token=token))
    assert 11_900 < len(line) <= MAX_AUTH_LINE
    session.receive(line)
    event = session.next_event()
    assert isinstance(event, AuthRequest) and event.mechanism == "OAUTHBEARER"
    assert event.credentials == BearerToken("alice@example.test", token)


def test_auth_line_over_12288_octets_is_refused_and_the_session_goes_on() -> None:
    session = _session()
    session.receive(b"AUTH OAUTHBEARER " + b"A" * 13_000 + b"\r\nNOOP\r\n")
    assert session.next_event() == Refused("", replies.LINE_TOO_LONG)
    assert session.next_event() is None
    assert session.take_output() == replies.LINE_TOO_LONG + b"250 2.0.0 Ok\r\n"


def test_continuation_response_carries_the_token() -> None:
    session = _session()
    session.receive(b"AUTH XOAUTH2\r\n")
    assert session.next_event() is None
    assert session.take_output() == b"334 \r\n"
    session.receive(_b64line(xoauth2(token="u" * 9000)))
    event = session.next_event()
    assert isinstance(event, AuthRequest) and event.mechanism == "XOAUTH2"


@pytest.mark.parametrize("dummy", [b"AQ==\r\n", b"\r\n", b"*\r\n", b"not base64!\r\n"])
def test_failure_is_an_error_challenge_then_535(dummy: bytes) -> None:
    session = _session()
    session.receive(b"AUTH OAUTHBEARER " + _b64line(bearer()))
    assert isinstance(session.next_event(), AuthRequest)
    challenge = sasl.failure_challenge("OAUTHBEARER", None, None)
    session.auth_failed(replies.AUTH_FAILED, challenge)
    assert session.take_output() == b"334 " + base64.b64encode(challenge) + b"\r\n"
    assert session.state.value == "auth"
    session.receive(dummy)
    assert session.next_event() is None
    assert session.take_output() == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert session.state is State.GREETED and session.auth_failures == 1
    session.receive(b"NOOP\r\n")  # and the session goes on
    assert session.next_event() is None
    assert session.take_output() == b"250 2.0.0 Ok\r\n"


def test_last_allowed_failure_closes_after_the_dummy_response() -> None:
    session = _session()
    session.receive(b"AUTH XOAUTH2 " + _b64line(xoauth2()))
    assert isinstance(session.next_event(), AuthRequest)
    session.auth_failed(replies.AUTH_TOO_MANY_FAILURES, b'{"status":"401"}')
    assert session.take_output().startswith(b"334 ")
    session.receive(b"\r\n")
    assert isinstance(session.next_event(), Close)
    assert session.take_output() == replies.AUTH_TOO_MANY_FAILURES
    assert session.closed


def test_an_overlong_dummy_response_still_gets_the_owed_reply() -> None:
    session = _session()
    session.receive(b"AUTH OAUTHBEARER " + _b64line(bearer()))
    assert isinstance(session.next_event(), AuthRequest)
    session.auth_failed(replies.AUTH_TOO_MANY_FAILURES, b"{}")
    session.take_output()
    session.receive(b"A" * (MAX_AUTH_LINE + 10))
    assert isinstance(session.next_event(), Close)
    assert session.take_output() == replies.AUTH_TOO_MANY_FAILURES
