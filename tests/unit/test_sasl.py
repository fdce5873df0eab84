"""SASL PLAIN and LOGIN as step machines (base64 and ``*`` belong to the session)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate import sasl
from relaygate.sasl import Challenge, Credentials, Malformed


def test_create() -> None:
    plain = sasl.create("plain")
    login = sasl.create("LOGIN")
    assert plain is not None and plain.name == "PLAIN"
    assert login is not None and login.name == "LOGIN"
    assert sasl.create("CRAM-MD5") is None
    assert sasl.create("") is None
    assert sasl.create("LOGIN") is not login  # one object per exchange, no shared state


def test_credentials_repr_hides_the_password() -> None:
    credentials = Credentials("bob", "hunter2", "admin")
    assert "hunter2" not in repr(credentials)
    assert "bob" in repr(credentials)
    assert "hunter2" not in str(credentials)


# ------------------------------------------------------------ PLAIN (RFC 4616)


def _plain() -> sasl.Mechanism:
    mechanism = sasl.create("PLAIN")
    assert mechanism is not None
    return mechanism


def test_plain_without_initial_response_sends_an_empty_challenge() -> None:
    plain = _plain()
    assert plain.start(None) == Challenge(b"")
    assert plain.respond(b"\0bob\0pw") == Credentials("bob", "pw", "")


def test_plain_with_initial_response() -> None:
    assert _plain().start(b"admin\0bob\0pw") == Credentials("bob", "pw", "admin")


def test_plain_utf8_fields() -> None:
    step = _plain().start("\0j\u00f6rg\0p\u00e4ss w\u00f6rd".encode())
    assert step == Credentials("j\u00f6rg", "p\u00e4ss w\u00f6rd")


@pytest.mark.parametrize(
    "message",
    [
        b"",  # "AUTH PLAIN =" sends this
        b"bob",
        b"\0bob",
        b"\0bob\0pw\0",
        b"a\0b\0c\0d",
        b"\0\0pw",  # no user name
        b"\0bob\0",  # no password
        b"\0b\xffb\0pw",
        b"\0bob\0p\xc3",
        b"\xff\0bob\0pw",
    ],
)
def test_plain_malformed(message: bytes) -> None:
    assert isinstance(_plain().start(message), Malformed)
    assert isinstance(_plain().respond(message), Malformed)


# ------------------------------------------------------------ LOGIN


def _login() -> sasl.Mechanism:
    mechanism = sasl.create("LOGIN")
    assert mechanism is not None
    return mechanism


def test_login_asks_for_user_then_password() -> None:
    login = _login()
    assert login.start(None) == Challenge(b"Username:")
    assert login.respond(b"bob") == Challenge(b"Password:")
    assert login.respond(b"pw") == Credentials("bob", "pw")


def test_login_with_initial_user_name() -> None:
    login = _login()
    assert login.start(b"bob") == Challenge(b"Password:")
    assert login.respond("p\u00e4ss".encode()) == Credentials("bob", "p\u00e4ss")


@pytest.mark.parametrize("step", [0, 1])
def test_login_refuses_non_utf8(step: int) -> None:
    login = _login()
    login.start(None)
    if step:
        login.respond(b"bob")
    assert isinstance(login.respond(b"\xff"), Malformed)


# ------------------------------------------------------------ any bytes


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=40), min_size=1, max_size=4), st.sampled_from(["PLAIN", "LOGIN"])
)
def test_any_responses_give_a_step(responses: list[bytes], name: str) -> None:
    mechanism = sasl.create(name)
    assert mechanism is not None
    step = mechanism.start(responses[0])
    for response in responses[1:]:
        if not isinstance(step, Challenge):
            break
        step = mechanism.respond(response)
    assert isinstance(step, Challenge | Credentials | Malformed)
    if isinstance(step, Credentials) and name == "PLAIN":
        assert step.username and step.password
