"""Scripted SMTP dialogs against the sans-IO session: what a client sees.

Most dialogs run on an implicit-TLS listener (``tls_active=True``), where AUTH
is offered at once; STARTTLS dialogs use ``STARTTLS_LISTENER`` in plaintext.
"""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from dialog import (
    ENVELOPE,
    HOSTNAME,
    LOGIN,
    SETTINGS,
    Dialog,
    Driver,
    b64,
    converse,
    dialog,
    plain,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.sasl import Credentials
from relaygate.smtp import replies
from relaygate.smtp.events import (
    AuthRequest,
    Close,
    MessageReady,
    RecipientRequest,
    Refused,
    SenderRequest,
    StartTLS,
)
from relaygate.smtp.session import (
    ALLOWED,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_QUEUED_REPLIES,
    PROXY_NOT_EXPECTED_REASON,
    WRONG_STATE,
    Session,
    Settings,
    State,
)

STARTTLS_LISTENER = Settings(HOSTNAME, starttls_available=True)
COMMAND_STATES = (State.CONNECTED, State.GREETED, State.MAIL, State.RCPT)


def text(reply: bytes) -> str:
    """A reply constant as the line a client reads."""
    return reply.decode().removesuffix("\r\n")


def refuse_with(reply: bytes) -> Any:
    return lambda _event: reply


# ------------------------------------------------------------ greeting, EHLO, HELO


def test_greeting_has_no_enhanced_code() -> None:
    d = Dialog()
    assert d.output == b"220 mx.example ESMTP relaygate\r\n"


def test_ehlo_on_starttls_listener_before_tls_offers_starttls_not_auth() -> None:
    d = dialog("C: EHLO client.example", STARTTLS_LISTENER, tls_active=False)
    assert d.replies() == [
        "250-mx.example",
        "250-PIPELINING",
        "250-SIZE 26214400",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250-CHUNKING",
        "250 STARTTLS",
    ]


def test_ehlo_after_tls_offers_auth_not_starttls() -> None:
    d = dialog(
        """
        C: EHLO client.example
        S~ 250 STARTTLS
        C: STARTTLS
        S: 220 2.0.0 Ready to start TLS
        C: EHLO client.example
        """,
        STARTTLS_LISTENER,
        tls_active=False,
    )
    lines = d.replies()
    assert lines[0] == "250-mx.example"
    assert lines[-1] == "250 AUTH PLAIN LOGIN SCRAM-SHA-256"
    assert not any("STARTTLS" in line for line in lines)


def test_ehlo_on_implicit_tls_listener() -> None:
    d = dialog("C: EHLO client.example")
    assert d.replies()[-2:] == ["250-CHUNKING", "250 AUTH PLAIN LOGIN SCRAM-SHA-256"]


def test_ehlo_without_tls_or_starttls_offers_neither() -> None:
    d = dialog("C: EHLO client.example", tls_active=False)
    assert d.replies()[-1] == "250 CHUNKING"


def test_size_advertised_is_the_limit() -> None:
    d = dialog("C: EHLO c\nS~ 250-SIZE 1234\nS~ 250 AUTH", Settings(HOSTNAME, 1234))
    assert d.session.state is State.GREETED


def test_helo_is_one_line_without_extensions() -> None:
    d = dialog(
        f"""
        C: HELO client.example
        S: 250 mx.example
        C: AUTH PLAIN {plain()}
        S: 235 2.7.0 Authentication successful
        """
    )
    assert not d.session.esmtp
    assert d.session.helo_name == "client.example"


@pytest.mark.parametrize(("verb", "last"), [("EHLO", "250 AUTH"), ("HELO", "250 mx.example")])
def test_greeting_needs_a_name(verb: str, last: str) -> None:
    dialog(f"C: {verb}\nS: 501 5.5.4 Syntax: {verb} hostname\nC: {verb} ok\nS~ {last}")


def test_ehlo_in_a_transaction_resets_it_but_keeps_the_login() -> None:
    dialog(
        ENVELOPE
        + """
        C: EHLO client.example
        S~ 250 AUTH
        C: RCPT TO:<rcpt@dest.example>
        S: 503 5.5.1 Send MAIL first
        C: MAIL FROM:<sender@client.example>
        S: 250 2.1.0
        """
    )


def test_verbs_are_case_insensitive() -> None:
    dialog(
        f"""
        C: ehlo client.example
        S~ 250 AUTH
        C: auth plain {plain()}
        S: 235 2.7.0
        C: mail from:<a@b.example>
        S: 250 2.1.0
        C: Rcpt To:<c@d.example>
        S: 250 2.1.5
        """
    )


# ------------------------------------------------------------ simple commands


def test_commands_allowed_before_ehlo() -> None:
    dialog(
        """
        C: NOOP
        S: 250 2.0.0 Ok
        C: HELP
        S: 214 2.0.0
        C: VRFY postmaster
        S: 252 2.5.0
        C: EXPN staff
        S: 502 5.5.1
        C: RSET
        S: 250 2.0.0 Ok
        C: QUIT
        S: 221 2.0.0 Bye
        """
    )


def test_vrfy_never_confirms_an_account() -> None:
    d = dialog(LOGIN + "C: VRFY user\nC: VRFY <user@mx.example>\nC: VRFY")
    assert d.replies() == [text(replies.VRFY)] * 3


def test_quit_closes_and_ignores_the_rest() -> None:
    d = dialog("C: QUIT\nC: NOOP\nS: 221 2.0.0 Bye")
    assert d.session.closed
    assert d.of_type(Close) == [Close("quit")]
    d.send(b"NOOP\r\n")
    assert d.replies() == []


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"FOO\r\n", replies.UNRECOGNIZED),
        (b"\r\n", replies.UNRECOGNIZED),
        (b"MAIL\tFROM:<a@b.example>\r\n", replies.UNRECOGNIZED),
        (b"NOOP \x00\r\n", replies.NUL_IN_COMMAND),
        (b"NOOP \xff\xfe\r\n", replies.BAD_UTF8),
        (b"EHLO a\rb\r\n", replies.BARE_CR_IN_COMMAND),
        (b"EHLO a\rRCPT TO:<x@y.example>\r\n", replies.BARE_CR_IN_COMMAND),
    ],
)
def test_malformed_command_lines(line: bytes, reply: bytes) -> None:
    d = Dialog()
    d.send(line)
    assert d.replies() == [text(reply)]
    assert d.session.bad_commands == 1
    assert d.session.helo_name == ""


def test_bare_lf_ends_a_command_line() -> None:
    dialog("C~ EHLO client.example\\nNOOP\\n\nS~ 250 AUTH\nS: 250 2.0.0")


# ------------------------------------------------------------ authentication


@pytest.mark.parametrize("command", ["MAIL FROM:<a@b.example>", "RCPT TO:<a@b.example>", "DATA"])
def test_transaction_needs_auth(command: str) -> None:
    dialog(f"C: EHLO c\nS~ 250 AUTH\nC: {command}\nS: 530 5.7.0 Authentication required")
    dialog(
        f"C: EHLO c\nS~ 250 STARTTLS\nC: {command}\nS: 530 5.7.0 Must issue a STARTTLS command",
        STARTTLS_LISTENER,
        tls_active=False,
    )


def test_auth_before_tls_is_refused() -> None:
    dialog(
        f"C: EHLO c\nS~ 250 STARTTLS\nC: AUTH PLAIN {plain()}\nS: 538 5.7.11",
        STARTTLS_LISTENER,
        tls_active=False,
    )


def test_auth_without_tls_when_configured() -> None:
    dialog(
        f"C: EHLO c\nS~ 250 AUTH PLAIN LOGIN\nC: AUTH PLAIN {plain()}\nS: 235 2.7.0",
        Settings(HOSTNAME, auth_without_tls=True),
        tls_active=False,
    )


def test_auth_plain_with_initial_response() -> None:
    d = dialog(f"C: EHLO c\nS~ 250 AUTH\nC: AUTH PLAIN {plain('bob', 'pw', 'admin')}\nS: 235 2.7.0")
    assert d.of_type(AuthRequest) == [AuthRequest("PLAIN", Credentials("bob", "pw", "admin"))]
    assert d.session.authenticated_user == "bob"


def test_auth_plain_without_initial_response_gets_empty_challenge() -> None:
    d = dialog(
        f"""
        C: EHLO c
        S~ 250 AUTH
        C: AUTH PLAIN
        S: 334
        C: {plain("bob", "pw")}
        S: 235 2.7.0
        """
    )
    assert d.output.count(b"334 \r\n") == 1
    assert d.of_type(AuthRequest) == [AuthRequest("PLAIN", Credentials("bob", "pw"))]


def test_auth_login() -> None:
    d = dialog(
        f"""
        C: EHLO c
        S~ 250 AUTH
        C: auth login
        S: 334 VXNlcm5hbWU6
        C: {b64("bob")}
        S: 334 UGFzc3dvcmQ6
        C: {b64("pw")}
        S: 235 2.7.0
        """
    )
    assert d.of_type(AuthRequest) == [AuthRequest("LOGIN", Credentials("bob", "pw"))]


def test_auth_login_with_initial_user_name() -> None:
    d = dialog(
        f"""
        C: EHLO c
        S~ 250 AUTH
        C: AUTH LOGIN {b64("bob")}
        S: 334 UGFzc3dvcmQ6
        C: {b64("pw")}
        S: 235 2.7.0
        """
    )
    assert d.session.authenticated_user == "bob"


@pytest.mark.parametrize(
    "exchange",
    [
        "C: AUTH PLAIN\nS: 334 \nC: *",
        "C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6\nC: *",
        f"C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6\nC: {b64('bob')}\nS: 334 UGFzc3dvcmQ6\nC: *",
    ],
)
def test_star_cancels_auth(exchange: str) -> None:
    d = dialog(
        f"""
        C: EHLO c
        S~ 250 AUTH
        {exchange}
        S: 501 5.0.0 Authentication cancelled
        C: MAIL FROM:<a@b.example>
        S: 530 5.7.0
        C: AUTH PLAIN {plain()}
        S: 235 2.7.0
        """
    )
    assert len(d.of_type(AuthRequest)) == 1


@pytest.mark.parametrize(
    "exchange",
    [
        "C: AUTH PLAIN !!!!",
        "C: AUTH PLAIN AHVzZXIAcGFzcw",  # padding missing
        "C: AUTH PLAIN \u00e9\u00e9\u00e9\u00e9",
        "C: AUTH PLAIN\nS: 334 \nC: not base64",
        "C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6\nC: bob@example",
    ],
)
def test_bad_base64_is_501(exchange: str) -> None:
    dialog(f"C: EHLO c\nS~ 250 AUTH\n{exchange}\nS: 501 5.5.2 Cannot decode base64")


@pytest.mark.parametrize(
    "exchange",
    [
        "C: AUTH PLAIN =",  # "=" is an empty initial response: PLAIN needs three fields
        f"C: AUTH PLAIN {b64('no separators')}",
        f"C: AUTH PLAIN {b64(chr(0) + 'user' + chr(0))}",
        "C: AUTH PLAIN\nS: 334 \nC: /w==",  # not UTF-8
    ],
)
def test_malformed_sasl_message_is_501(exchange: str) -> None:
    dialog(f"C: EHLO c\nS~ 250 AUTH\n{exchange}\nS: 501 5.5.2 Malformed authentication")


def test_a_command_during_auth_is_a_sasl_response() -> None:
    d = dialog("C: EHLO c\nS~ 250 AUTH\nC: AUTH PLAIN\nS: 334 \nC: QUIT\nS: 501 5.5.2\nC: NOOP")
    assert d.replies() == ["250 2.0.0 Ok"]
    assert not d.session.closed


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("AUTH CRAM-MD5", replies.UNKNOWN_MECHANISM),
        ("AUTH XOAUTH2 abc", replies.UNKNOWN_MECHANISM),
        ("AUTH", replies.AUTH_SYNTAX),
        ("AUTH PLAIN a b", replies.AUTH_SYNTAX),
    ],
)
def test_auth_command_errors(command: str, reply: bytes) -> None:
    dialog(f"C: EHLO c\nS~ 250 AUTH\nC: {command}\nS: {text(reply)}")


def test_mechanism_not_configured_is_unknown() -> None:
    dialog(
        f"C: EHLO c\nS~ 250 AUTH PLAIN\nC: AUTH LOGIN\nS: {text(replies.UNKNOWN_MECHANISM)}",
        Settings(HOSTNAME, auth_mechanisms=("PLAIN",)),
    )


def test_auth_twice() -> None:
    dialog(LOGIN + f"C: AUTH PLAIN {plain()}\nS: 503 5.5.1 Already authenticated")


def test_failed_auth_can_be_retried() -> None:
    answers = iter([replies.AUTH_FAILED, None])
    d = dialog(
        f"""
        C: EHLO c
        S~ 250 AUTH
        C: AUTH PLAIN {plain(password="wrong")}
        S: 535 5.7.8 Authentication credentials invalid
        C: MAIL FROM:<a@b.example>
        S: 530 5.7.0
        C: AUTH PLAIN {plain()}
        S: 235 2.7.0
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        """,
        driver=Driver(auth=lambda _: next(answers)),
    )
    assert d.session.auth_failures == 1


def test_auth_response_line_limit_is_12288() -> None:
    longest = "A" * (MAX_AUTH_LINE - 2)  # read as a line (then found not to be base64)
    dialog(
        f"""
        C: EHLO c
        S~ 250 AUTH
        C: AUTH PLAIN
        S: 334
        C: {"A" * (MAX_AUTH_LINE - 4)}
        S: 501 5.5.2 Malformed authentication response
        C: AUTH PLAIN
        S: 334
        C: {longest}
        S: 501 5.5.2 Cannot decode base64
        C: AUTH PLAIN
        S: 334
        C: {longest}A
        S: 500 5.5.2 Line too long
        C: NOOP
        S: 250 2.0.0
        """
    )


def test_auth_command_line_may_carry_a_long_initial_response() -> None:
    # Issue 12: OAuth tokens of a few KB come as initial responses, so an AUTH
    # line gets RFC 4954's 12,288 octets (real clients send them so), not 1,000.
    initial = "A" * (MAX_COMMAND_LINE * 5)
    dialog(f"C: EHLO c\nS~ 250 AUTH\nC: AUTH PLAIN {initial}\nS: 501 5.5.2 Malformed")
    too_long = "A" * MAX_AUTH_LINE
    dialog(f"C: EHLO c\nS~ 250 AUTH\nC: AUTH PLAIN {too_long}\nS: 500 5.5.2 Line too long")


def test_other_command_lines_keep_1000_octets() -> None:
    long_helo = "h" * MAX_COMMAND_LINE
    dialog(f"C: EHLO c\nS~ 250 AUTH\nC: NOOP {long_helo}\nS: 500 5.5.2 Line too long")
    # A line merely starting like AUTH but without the space is no AUTH line.
    dialog(f"C: EHLO c\nS~ 250 AUTH\nC: AUTHX{long_helo}\nS: 500 5.5.2 Line too long")


# ------------------------------------------------------------ MAIL and RCPT


def test_null_sender_goes_to_the_policy() -> None:
    d = dialog(
        LOGIN + "C: MAIL FROM:<>\nS: 550 5.7.1 Null sender refused",
        driver=Driver(sender=refuse_with(b"550 5.7.1 Null sender refused\r\n")),
    )
    assert d.of_type(SenderRequest) == [SenderRequest("", {})]
    assert d.session.state is State.GREETED


def test_mail_from_with_space_and_parameters() -> None:
    d = dialog(
        LOGIN + "C: MAIL FROM: <a@b.example> size=100 BODY=8bitmime AUTH=<> SMTPUTF8\nS: 250 2.1.0"
    )
    [request] = d.of_type(SenderRequest)
    assert request.address == "a@b.example"
    assert request.parameters == {"SIZE": "100", "BODY": "8bitmime", "AUTH": "<>", "SMTPUTF8": None}


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("MAIL TO:<a@b.example>", replies.MAIL_SYNTAX),
        ("MAIL", replies.MAIL_SYNTAX),
        ("MAIL FROM:a@b.example", replies.MAIL_SYNTAX),
        ("MAIL FROM:<a@b.example", replies.MAIL_SYNTAX),
        ("MAIL FROM:<a@b.example>SIZE=1", replies.MAIL_SYNTAX),
        ("MAIL FROM:<a@>", replies.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<@b.example>", replies.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<a b@c.example>", replies.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<a..b@c.example>", replies.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<postmaster>", replies.BAD_SENDER_SYNTAX),
        ("MAIL FROM:<j\u00f6rg@b.example>", replies.NEED_SMTPUTF8),
        ("MAIL FROM:<a@b.example> SIZE=big", replies.BAD_PARAMETER),
        ("MAIL FROM:<a@b.example> SIZE", replies.BAD_PARAMETER),
        ("MAIL FROM:<a@b.example> SIZE=-1", replies.BAD_PARAMETER),
        ("MAIL FROM:<a@b.example> SIZE=\u00b2", replies.BAD_PARAMETER),
        ("MAIL FROM:<a@b.example> SIZE=\u0661\u0662", replies.BAD_PARAMETER),
        ("MAIL FROM:<a@b.example> SIZE=" + "1" * 21, replies.BAD_PARAMETER),
        ("MAIL FROM:<a@b.example> SIZE=26214401", replies.SIZE_EXCEEDED),
        ("MAIL FROM:<a@b.example> SIZE=1 size=2", replies.DUPLICATE_PARAMETER),
        ("MAIL FROM:<a@b.example> BODY=BINARYMIME", replies.UNSUPPORTED_PARAMETER),
        ("MAIL FROM:<a@b.example> BODY", replies.UNSUPPORTED_PARAMETER),
        ("MAIL FROM:<a@b.example> SMTPUTF8=yes", replies.BAD_PARAMETER),
        ("MAIL FROM:<a@b.example> RET=FULL ENVID=x", replies.UNSUPPORTED_PARAMETER),
        ("MAIL FROM:<a@b.example> =x", replies.UNSUPPORTED_PARAMETER),
    ],
)
def test_mail_refusals(command: str, reply: bytes) -> None:
    d = dialog(LOGIN + f"C: {command}\nS: {text(reply)}\nC: MAIL FROM:<a@b.example>\nS: 250 2.1.0")
    assert len(d.of_type(SenderRequest)) == 1


def test_size_equal_to_the_limit_is_fine() -> None:
    dialog(LOGIN + "C: MAIL FROM:<a@b.example> SIZE=26214400\nS: 250 2.1.0")


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("RCPT FROM:<c@d.example>", replies.RCPT_SYNTAX),
        ("RCPT", replies.RCPT_SYNTAX),
        ("RCPT TO:c@d.example", replies.BAD_RECIPIENT_SYNTAX),
        ("RCPT TO:<>", replies.BAD_RECIPIENT_SYNTAX),
        ("RCPT TO:<c@d.example>x", replies.BAD_RECIPIENT_SYNTAX),
        ("RCPT TO:<rcpt>", replies.BAD_RECIPIENT_SYNTAX),
        ("RCPT TO:<c@[300.0.0.1]>", replies.BAD_RECIPIENT_SYNTAX),
        ("RCPT TO:<c@[IPv6:fe80::1%eth0]>", replies.BAD_RECIPIENT_SYNTAX),
        ("RCPT TO:<\u00e4@d.example>", replies.NEED_SMTPUTF8),
        ("RCPT TO:<c@d.example> NOTIFY=NEVER", replies.UNSUPPORTED_PARAMETER),
    ],
)
def test_rcpt_refusals(command: str, reply: bytes) -> None:
    d = dialog(
        LOGIN
        + f"""
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        C: {command}
        S: {text(reply)}
        C: RCPT TO:<c@d.example>
        S: 250 2.1.5
        """
    )
    assert d.of_type(RecipientRequest) == [RecipientRequest("c@d.example")]


def test_smtputf8_addresses_and_flags() -> None:
    d = dialog(
        LOGIN
        + """
        C: MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8 BODY=8BITMIME
        S: 250 2.1.0
        C: RCPT TO:<\u00e4@\u00f6.example>
        S: 250 2.1.5
        C: DATA
        S: 354
        C: gr\u00fc\u00dfe
        C: .
        S: 250 2.0.0 Ok: queued as Q1
        """
    )
    [message] = d.of_type(MessageReady)
    assert message.mail_from == "j\u00f6rg@b\u00fccher.example"
    assert message.recipients == ["\u00e4@\u00f6.example"]
    assert message.smtputf8
    assert message.eight_bit
    assert message.body == "gr\u00fc\u00dfe\r\n".encode()


def test_seven_bit_is_not_eight_bit() -> None:
    d = dialog(ENVELOPE.replace("<sender@client.example>", "<s@c.example> BODY=7BIT"))
    d.run("C: DATA\nS: 354\nC: .\nS: 250 2.0.0")
    [message] = d.of_type(MessageReady)
    assert not message.eight_bit
    assert not message.smtputf8


def test_source_route_is_dropped_and_literals_kept() -> None:
    d = dialog(
        LOGIN
        + """
        C: MAIL FROM:<@relay.example,@other.example:a@b.example>
        S: 250 2.1.0
        C: RCPT TO:<"john doe"@[192.0.2.1]>
        S: 250 2.1.5
        C: RCPT TO:<x@[IPv6:2001:db8::1]>
        S: 250 2.1.5
        """
    )
    assert d.of_type(SenderRequest)[0].address == "a@b.example"
    assert [r.address for r in d.of_type(RecipientRequest)] == [
        '"john doe"@[192.0.2.1]',
        "x@[IPv6:2001:db8::1]",
    ]


def test_too_many_recipients() -> None:
    d = dialog(
        LOGIN
        + """
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        C: RCPT TO:<r1@d.example>
        C: RCPT TO:<r2@d.example>
        C: RCPT TO:<r3@d.example>
        S: 250 2.1.5
        S: 250 2.1.5
        S: 452 4.5.3 Too many recipients
        C: DATA
        S: 354
        C: .
        S: 250 2.0.0
        """,
        Settings(HOSTNAME, max_recipients=2),
    )
    assert d.of_type(MessageReady)[0].recipients == ["r1@d.example", "r2@d.example"]


def test_refused_recipients_leave_the_transaction_open() -> None:
    def recipient(event: RecipientRequest) -> bytes | None:
        return b"550 5.1.1 No such user\r\n" if event.address.startswith("bad") else None

    d = dialog(
        LOGIN
        + """
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        C: RCPT TO:<bad@d.example>
        S: 550 5.1.1 No such user
        C: DATA
        S: 554 5.5.1 No valid recipients
        C: RCPT TO:<good@d.example>
        S: 250 2.1.5
        C: DATA
        S: 354
        C: .
        S: 250 2.0.0
        """,
        driver=Driver(recipient=recipient),
    )
    assert d.of_type(MessageReady)[0].recipients == ["good@d.example"]


def test_nested_mail() -> None:
    dialog(ENVELOPE + "C: MAIL FROM:<x@y.example>\nS: 503 5.5.1 Sender already specified")


def test_driver_421_closes() -> None:
    d = dialog(
        LOGIN + "C: MAIL FROM:<a@b.example>\nC: NOOP\nS: 421 4.7.0 Go away",
        driver=Driver(sender=refuse_with(b"421 4.7.0 Go away\r\n")),
    )
    assert d.session.closed
    assert d.events[-1] == Close("refused with 421")


# ------------------------------------------------------------ DATA


def test_message_is_delivered_dot_unstuffed() -> None:
    d = dialog(
        ENVELOPE
        + """
        C: DATA
        S: 354 End data with <CR><LF>.<CR><LF>
        C: Subject: dots
        C:
        C: ..
        C: ...
        C: ..leading
        C: middle.dot.
        C:  .space first
        C: .
        S: 250 2.0.0 Ok: queued as Q1
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        """
    )
    [message] = d.of_type(MessageReady)
    assert (
        message.body
        == b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle.dot.\r\n .space first\r\n"
    )
    assert message.mail_from == "sender@client.example"
    assert message.recipients == ["rcpt@dest.example"]
    assert d.session.messages_accepted == 1


def test_empty_message() -> None:
    d = dialog(ENVELOPE + "C: DATA\nC: .\nS: 354\nS: 250 2.0.0")
    assert d.of_type(MessageReady)[0].body == b""


def test_data_with_argument() -> None:
    dialog(ENVELOPE + "C: DATA now\nS: 501 5.5.4\nC: DATA\nS: 354")


def test_refused_message_ends_the_transaction() -> None:
    d = dialog(
        ENVELOPE
        + """
        C: DATA
        S: 354
        C: hello
        C: .
        S: 451 4.3.0 Local error in processing
        C: RCPT TO:<c@d.example>
        S: 503 5.5.1 Send MAIL first
        """,
        driver=Driver(message=refuse_with(replies.LOCAL_ERROR)),
    )
    assert d.session.messages_accepted == 0


SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r.\n",
    b"\n.\r",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\n\n.\n\n",
    b"\r\r\n.\r\r\n",
]
SMUGGLED = (
    b"MAIL FROM:<spoof@evil.example>\r\nRCPT TO:<victim@dest.example>\r\n"
    b"DATA\r\nFrom: spoof@evil.example\r\n\r\nsmuggled\r\n.\r\n"
)


@pytest.mark.parametrize("variant", SMUGGLING, ids=repr)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_smuggling_never_ends_data(variant: bytes, bytewise: bool) -> None:
    d = dialog(ENVELOPE + "C: DATA\nS: 354")
    stream = b"Subject: hi\r\n\r\nhello" + variant + SMUGGLED + b"RSET\r\n"
    for chunk in [stream[i : i + 1] for i in range(len(stream))] if bytewise else [stream]:
        d.send(chunk)
    assert d.replies() == [text(replies.BARE_LINE_ENDING), "250 2.0.0 Ok"]
    assert len(d.of_type(SenderRequest)) == 1  # the smuggled MAIL was never a command
    assert d.of_type(MessageReady) == []
    assert d.of_type(Refused) == [Refused("DATA", replies.BARE_LINE_ENDING)]


@pytest.mark.parametrize("variant", [b"\r\n\x00.\r\n", b"\r\n .\r\n", b"\r\n.\x00\r\n"], ids=repr)
def test_lookalike_end_without_bare_line_ending_is_just_text(variant: bytes) -> None:
    d = dialog(ENVELOPE + "C: DATA\nS: 354")
    d.send(b"hello" + variant + SMUGGLED)
    assert d.replies() == ["250 2.0.0 Ok: queued as Q1"]
    [message] = d.of_type(MessageReady)
    # ...apart from the dot a line may start with, which is stuffing.
    assert message.body == (b"hello" + variant + SMUGGLED[:-3]).replace(b"\r\n.", b"\r\n")
    assert len(d.of_type(SenderRequest)) == 1


@pytest.mark.parametrize(
    "body",
    [b"bare\nlf\r\n", b"bare\rcr\r\n", b"\n\r\n", b"end\r\r\n", b"a\r\n\nb\r\n", b".\n.\r\n"],
    ids=repr,
)
def test_bare_line_endings_refuse_the_message(body: bytes) -> None:
    d = dialog(ENVELOPE + "C: DATA\nS: 354")
    d.send(body + b".\r\n")
    assert d.replies() == [text(replies.BARE_LINE_ENDING)]
    d.run(
        """
        C: RCPT TO:<c@d.example>
        S: 503 5.5.1 Send MAIL first
        C: RSET
        S: 250 2.0.0
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        """
    )
    assert d.of_type(MessageReady) == []


def test_dot_inside_a_line_is_not_the_end() -> None:
    d = dialog(ENVELOPE + "C: DATA\nS: 354\nC~ a.\\r\\n.b\\r\\n .\\r\\n\\r\\n.\\r\\n\nS: 250 2.0.0")
    assert d.of_type(MessageReady)[0].body == b"a.\r\nb\r\n .\r\n\r\n"


SMALL = Settings(HOSTNAME, max_message_size=100, max_recipients=3, max_bad_commands=5)


def _sized_body(size: int) -> bytes:
    """A body of ``size`` octets ending in CRLF."""
    return b"x" * (size - 2) + b"\r\n"


@pytest.mark.parametrize(
    ("size", "accepted"), [(99, True), (100, True), (101, False), (102, False)]
)
def test_data_size_limit_is_exact_however_the_input_is_cut(size: int, accepted: bool) -> None:
    stream = b"DATA\r\n" + _sized_body(size) + b".\r\nNOOP\r\n"
    for cut in range(len(stream) + 1):
        d = dialog(ENVELOPE, SMALL)
        d.send(stream[:cut])
        d.send(stream[cut:])
        expected = "250 2.0.0 Ok: queued as Q1" if accepted else text(replies.SIZE_EXCEEDED)
        assert d.replies() == [text(replies.START_DATA), expected, "250 2.0.0 Ok"], cut


def test_huge_message_is_refused_without_being_kept() -> None:
    d = dialog(ENVELOPE + "C: DATA\nS: 354", SMALL)
    for _ in range(100):
        d.send(b"y" * 98 + b"\r\n")
        assert len(d.session._buffer) <= SMALL.max_message_size + 4
    d.send(b".\r\nNOOP\r\n")
    assert d.replies() == [text(replies.SIZE_EXCEEDED), "250 2.0.0 Ok"]
    assert d.session.state is State.GREETED


def test_body_may_be_pipelined_with_data() -> None:
    d = dialog(ENVELOPE + "C: DATA\nC: hi\nC: .\nC: QUIT\nS: 354\nS: 250 2.0.0\nS: 221 2.0.0")
    assert d.of_type(MessageReady)[0].body == b"hi\r\n"


# ------------------------------------------------------------ pipelining


def test_replies_wait_for_pending_decisions_and_come_out_in_order() -> None:
    session = Session(SETTINGS, tls_active=True)
    session.greeting()
    session.receive(f"EHLO c\r\nAUTH PLAIN {plain()}\r\n".encode())
    assert isinstance(session.next_event(), AuthRequest)
    session.auth_succeeded("user")
    assert session.next_event() is None
    session.take_output()

    session.receive(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\n"
        b"DATA\r\nhello\r\n.\r\nNOOP\r\n"
    )
    assert session.next_event() == SenderRequest("a@b.example", {})
    assert session.next_event() is None  # nothing else is read while the sender is pending
    assert session.take_output() == b""
    session.accept_sender()
    assert session.next_event() == RecipientRequest("c@d.example")
    session.refuse(b"550 5.1.1 No such user\r\n")
    assert session.next_event() == RecipientRequest("e@f.example")
    assert session.take_output() == b"250 2.1.0 Sender ok\r\n550 5.1.1 No such user\r\n"
    session.accept_recipient()
    event = session.next_event()
    assert isinstance(event, MessageReady)
    assert event.recipients == ["e@f.example"]
    assert event.body == b"hello\r\n"
    session.message_queued("Q7")
    assert session.next_event() is None
    assert session.take_output() == (
        b"250 2.1.5 Recipient ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as Q7\r\n250 2.0.0 Ok\r\n"
    )


def test_pipelined_group_after_refused_sender() -> None:
    dialog(
        LOGIN
        + """
        C: MAIL FROM:<a@b.example>
        C: RCPT TO:<c@d.example>
        C: DATA
        C: NOOP
        S: 550 5.7.1 Not your address
        S: 503 5.5.1 Send MAIL first
        S: 503 5.5.1 Send MAIL first
        S: 250 2.0.0 Ok
        """,
        driver=Driver(sender=refuse_with(b"550 5.7.1 Not your address\r\n")),
    )


def test_answering_without_a_question_is_an_error() -> None:
    session = Session(SETTINGS)
    with pytest.raises(RuntimeError):
        session.accept_sender()
    with pytest.raises(RuntimeError):
        session.tls_started()


# ------------------------------------------------------------ RSET


def test_rset_ends_the_transaction_and_keeps_the_login() -> None:
    dialog(
        ENVELOPE
        + """
        C: RSET
        S: 250 2.0.0 Ok
        C: RCPT TO:<c@d.example>
        S: 503 5.5.1 Send MAIL first
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        """
    )


def test_rset_before_ehlo_does_not_greet() -> None:
    dialog("C: RSET\nS: 250 2.0.0\nC: STARTTLS\nS: 503 5.5.1 Send EHLO or HELO first")


# ------------------------------------------------------------ STARTTLS


def test_starttls_discards_pipelined_commands() -> None:
    d = dialog(
        """
        C: EHLO client.example
        S~ 250 STARTTLS
        C: STARTTLS
        C: MAIL FROM:<injected@evil.example>
        C: RCPT TO:<victim@dest.example>
        C: EHLO evil
        S: 220 2.0.0 Ready to start TLS
        C: EHLO client.example
        S~ 250 AUTH PLAIN LOGIN
        """,
        STARTTLS_LISTENER,
        tls_active=False,
    )
    assert d.of_type(StartTLS) == [StartTLS()]
    assert d.of_type(SenderRequest) == []
    assert d.session.tls_active


def test_bytes_arriving_during_the_handshake_are_dropped() -> None:
    d = dialog(
        "C: EHLO c\nS~ 250 STARTTLS\nC: STARTTLS\nS: 220 2.0.0",
        STARTTLS_LISTENER,
        tls_active=False,
        driver=Driver(finish_tls=False),
    )
    d.send(b"EHLO evil\r\nNOOP\r\n")
    assert d.replies() == []
    d.session.tls_started()
    d.run("C: AUTH PLAIN x\nS: 503 5.5.1 Send EHLO or HELO first\nC: EHLO c\nS~ 250 AUTH")
    assert d.session.helo_name == "c"


def test_starttls_forgets_the_login() -> None:
    d = dialog(
        f"""
        C: EHLO c
        S~ 250 AUTH
        C: AUTH PLAIN {plain()}
        S: 235 2.7.0
        C: STARTTLS
        S: 220 2.0.0
        C: EHLO c
        S~ 250 AUTH
        C: MAIL FROM:<a@b.example>
        S: 530 5.7.0 Authentication required
        """,
        Settings(HOSTNAME, starttls_available=True, auth_without_tls=True),
        tls_active=False,
    )
    assert d.session.authenticated_user is None


@pytest.mark.parametrize(
    ("script", "listener", "tls_active"),
    [
        ("C: STARTTLS now", STARTTLS_LISTENER, False),
        ("C: STARTTLS", SETTINGS, False),
        ("C: STARTTLS", STARTTLS_LISTENER, True),
    ],
)
def test_starttls_refusals(script: str, listener: Settings, tls_active: bool) -> None:
    expected = {
        "C: STARTTLS now": replies.NO_PARAMETERS,
        "C: STARTTLS": replies.TLS_NOT_AVAILABLE if not tls_active else replies.TLS_ALREADY_ACTIVE,
    }[script]
    d = dialog("C: EHLO c\n" + script, listener, tls_active=tls_active)
    assert d.replies()[-1] == text(expected)
    assert d.of_type(StartTLS) == []


# ------------------------------------------------------------ BDAT


def test_bdat_chunks_split_across_receives() -> None:
    d = dialog(ENVELOPE)
    d.send(b"BDAT 7\r\nhel")
    assert d.replies() == []
    d.send(b"lo\r\nBD")
    assert d.replies() == ["250 2.0.0 7 octets received"]
    d.send(b"AT 12 LAST\r\n.\r\n.\r\nQ")
    assert d.replies() == []
    d.send(b"UIT\r\n")
    d.send(b"QU")
    assert d.replies() == ["250 2.0.0 Ok: queued as Q1"]
    d.send(b"IT\r\n")
    assert d.replies() == ["221 2.0.0 Bye"]
    [message] = d.of_type(MessageReady)
    # BDAT content is opaque: no dot-unstuffing, no terminator, no commands.
    assert message.body == b"hello\r\n.\r\n.\r\nQUIT\r\n"


def test_bdat_zero_last_ends_the_message() -> None:
    d = dialog(
        ENVELOPE
        + """
        C~ BDAT 4\\r\\nab\\r\\nBDAT 0 LAST\\r\\n
        S: 250 2.0.0 4 octets received
        S: 250 2.0.0 Ok: queued as Q1
        """
    )
    assert d.of_type(MessageReady)[0].body == b"ab\r\n"


def test_bdat_zero_last_alone_is_an_empty_message() -> None:
    d = dialog(ENVELOPE + "C: BDAT 0 LAST\nS: 250 2.0.0 Ok: queued")
    assert d.of_type(MessageReady)[0].body == b""


@pytest.mark.parametrize(
    ("opening", "reply"),
    [
        (LOGIN, replies.NEED_MAIL),
        (LOGIN + "C: MAIL FROM:<a@b.example>\nS: 250 2.1.0", replies.NO_VALID_RECIPIENTS),
    ],
)
def test_refused_bdat_chunk_is_consumed(opening: str, reply: bytes) -> None:
    d = dialog(opening, SETTINGS, tls_active=True)
    d.send(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
    assert d.replies() == [text(reply), "250 2.0.0 Ok"]
    assert not d.session.closed
    assert d.of_type(Refused)[-1] == Refused("BDAT", reply)


@pytest.mark.parametrize(
    ("opening", "reply", "listener", "tls_active"),
    [
        ("C: EHLO c\nS~ 250 AUTH", replies.AUTH_REQUIRED, SETTINGS, True),
        ("C: EHLO c\nS~ 250 STARTTLS", replies.STARTTLS_FIRST, STARTTLS_LISTENER, False),
        ("", replies.AUTH_REQUIRED, SETTINGS, True),
    ],
)
def test_bdat_before_login_hangs_up(
    opening: str, reply: bytes, listener: Settings, tls_active: bool
) -> None:
    """Reading a chunk nobody may send would let an anonymous client hold us for
    gigabytes (BDAT 999999999999, then a trickle): the reply, then the door."""
    d = dialog(opening, listener, tls_active=tls_active)
    d.send(b"BDAT 999999999999 LAST\r\nQUIT\r\n")
    assert d.replies() == [text(reply)]
    assert d.session.closed
    assert isinstance(d.events[-1], Close)


def test_bdat_without_recipient_ends_the_transaction() -> None:
    dialog(
        LOGIN
        + """
        C: MAIL FROM:<a@b.example>
        S: 250 2.1.0
        C~ BDAT 2\\r\\nhi
        S: 554 5.5.1
        C: RCPT TO:<c@d.example>
        S: 503 5.5.1 Send MAIL first
        """
    )


def test_bdat_size_limits() -> None:
    """A chunk that would take the message over the limit: 552, then hang up
    (rather than read what could be gigabytes only to throw it away)."""
    d = dialog(
        ENVELOPE
        + """
        C~ BDAT 60\\r\\n
        C~ {}
        S: 250 2.0.0 60 octets received
        C~ BDAT 41 LAST\\r\\n
        S: 552 5.3.4
        """.format("x" * 60),
        SMALL,
    )
    assert d.session.closed
    d = dialog(
        ENVELOPE
        + """
        C~ BDAT 100 LAST\\r\\n{}
        S: 250 2.0.0 Ok: queued
        """.format("w" * 98 + "\\r\\n"),
        SMALL,
    )
    assert [len(m.body) for m in d.of_type(MessageReady)] == [100]


@pytest.mark.parametrize(
    "command", ["BDAT", "BDAT x", "BDAT -1", "BDAT 5 FIRST", "BDAT 5 LAST now", "BDAT \u00b2"]
)
def test_bdat_syntax_error_hangs_up(command: str) -> None:
    # Without a size the chunk cannot be skipped, so the session cannot go on.
    d = dialog(ENVELOPE + f"C: {command}\nC: NOOP\nS: {text(replies.BDAT_SYNTAX)}")
    assert d.session.closed
    assert d.events[-1] == Close("bad BDAT syntax")


def test_data_after_bdat() -> None:
    dialog(ENVELOPE + "C~ BDAT 2\\r\\nhi\nS: 250 2.0.0 2 octets\nC: DATA\nS: 503 5.5.1 DATA not")


def test_rset_between_chunks_discards_them() -> None:
    d = dialog(
        ENVELOPE
        + """
        C~ BDAT 3\\r\\nold
        S: 250 2.0.0
        C: RSET
        S: 250 2.0.0
        C: MAIL FROM:<a@b.example>
        C: RCPT TO:<c@d.example>
        C~ BDAT 5 LAST\\r\\nnew\\r\\n
        S: 250 2.1.0
        S: 250 2.1.5
        S: 250 2.0.0 Ok: queued
        """
    )
    assert d.of_type(MessageReady)[0].body == b"new\r\n"


def test_bdat_message_with_bare_lf_is_refused() -> None:
    dialog(ENVELOPE + "C~ BDAT 4 LAST\\r\\na\\nb\\n\nS: 550 5.5.2\nC: RSET\nS: 250 2.0.0")


# ------------------------------------------------------------ limits and closing


def test_command_line_limit_is_1000_octets_with_crlf() -> None:
    longest = "NOOP " + "x" * (MAX_COMMAND_LINE - 7)
    dialog(
        f"C: {longest}\nS: 250 2.0.0\nC: {longest}x\nS: 500 5.5.2 Line too long\nC: NOOP\nS: 250"
    )


def test_over_long_line_without_lf_is_answered_at_once() -> None:
    d = Dialog(Settings(HOSTNAME, max_bad_commands=2))
    d.send(b"x" * MAX_COMMAND_LINE)
    assert d.replies() == [text(replies.LINE_TOO_LONG)]
    assert d.of_type(Refused) == [Refused("", replies.LINE_TOO_LONG)]
    d.send(b"x" * 5000)
    d.send(b"x\r\nNOOP\r\n")  # the tail of the long line is dropped, the next line counts
    assert d.replies() == ["250 2.0.0 Ok"]
    d.send(b"y" * MAX_COMMAND_LINE)
    assert d.replies() == [text(replies.LINE_TOO_LONG), text(replies.TOO_MANY_ERRORS)]
    assert d.events[-1] == Close("too many errors")  # delivered now, not on the next read


def test_too_many_bad_commands() -> None:
    d = dialog(
        """
        C: FOO
        C: BAR
        C: BAZ
        C: NOOP
        S: 500 5.5.2
        S: 500 5.5.2
        S: 500 5.5.2
        S: 421 4.7.0 Too many errors
        """,
        Settings(HOSTNAME, max_bad_commands=3),
    )
    assert d.session.closed
    assert d.events[-1] == Close("too many errors")


@pytest.mark.parametrize(
    "request_line", ["GET / HTTP/1.1", "POST /login HTTP/1.1", "CONNECT mx.example:25 HTTP/1.1"]
)
def test_http_request_is_answered_once_and_closed(request_line: str) -> None:
    d = dialog(f"C: {request_line}\nC: Host: mx.example\nC:\nS: 421 4.7.0 This is an SMTP server")
    assert d.session.closed
    assert d.events == [Close("not an SMTP client")]


@pytest.mark.parametrize(
    ("action", "reply", "reason"),
    [
        (Session.timeout, replies.TIMEOUT, "timeout"),
        (Session.shutdown, replies.SHUTTING_DOWN, "server shutting down"),
    ],
)
def test_timeout_and_shutdown(action: Any, reply: bytes, reason: str) -> None:
    d = dialog(ENVELOPE + "C: DATA\nS: 354\nC~ half a mess")
    assert d.session.has_partial_input
    action(d.session)
    d.send(b"age\r\n.\r\n")
    assert d.replies() == [text(reply)]
    assert d.events[-1] == Close(reason)
    assert d.of_type(MessageReady) == []
    action(d.session)  # a second call changes nothing
    d.send(b"")
    assert d.replies() == []


# ------------------------------------------------------------ the transition table

WALK = Settings(HOSTNAME, starttls_available=True, auth_without_tls=True)
WALK_COMMANDS = {
    "EHLO": "EHLO client.example",
    "HELO": "HELO client.example",
    "MAIL": "MAIL FROM:<a@b.example>",
    "RCPT": "RCPT TO:<c@d.example>",
    "DATA": "DATA",
    "BDAT": "BDAT 0 LAST",
    "RSET": "RSET",
    "NOOP": "NOOP",
    "QUIT": "QUIT",
    "HELP": "HELP",
    "VRFY": "VRFY user",
    "EXPN": "EXPN staff",
    "STARTTLS": "STARTTLS",
    "AUTH": f"AUTH PLAIN {plain()}",
}
# The first reply line when the verb is allowed in the state.
WALK_ALLOWED = {
    "EHLO": "250-mx.example",
    "HELO": "250 mx.example",
    "MAIL": text(replies.SENDER_OK),
    "RCPT": text(replies.RECIPIENT_OK),
    "DATA": text(replies.START_DATA),
    "RSET": text(replies.RSET_OK),
    "NOOP": text(replies.NOOP_OK),
    "QUIT": text(replies.BYE),
    "HELP": text(replies.HELP),
    "VRFY": text(replies.VRFY),
    "EXPN": text(replies.EXPN),
    "STARTTLS": text(replies.READY_TLS),
    "AUTH": text(replies.ALREADY_AUTHENTICATED),  # the handler ran: we are logged in
}
WALK_BDAT = {
    State.CONNECTED: text(replies.NEED_MAIL),
    State.GREETED: text(replies.NEED_MAIL),
    State.MAIL: text(replies.NO_VALID_RECIPIENTS),
    State.RCPT: "250 2.0.0 Ok: queued as Q1",
}


def reach(state: State) -> Dialog:
    """A logged-in session in ``state``."""
    d = Dialog(WALK, tls_active=False, driver=Driver(finish_tls=False))
    if state is State.CONNECTED:
        # Not reachable by protocol (tls_started forgets the login), but the
        # table answers for it anyway: put the session there by hand.
        d.session.authenticated_user = "user"
        return d
    d.run(f"C: EHLO c\nS~ 250 AUTH\nC: AUTH PLAIN {plain()}\nS: 235 2.7.0")
    if state in (State.MAIL, State.RCPT):
        d.run("C: MAIL FROM:<a@b.example>\nS: 250 2.1.0")
    if state is State.RCPT:
        d.run("C: RCPT TO:<c@d.example>\nS: 250 2.1.5")
    assert d.session.state is state
    return d


def test_every_refused_transition_has_its_own_reply() -> None:
    refused = {(v, s) for v in ALLOWED for s in COMMAND_STATES if s not in ALLOWED[v]}
    assert set(WRONG_STATE) == refused
    assert set(ALLOWED) == set(WALK_COMMANDS)


@pytest.mark.parametrize("state", COMMAND_STATES, ids=lambda s: s.value)
@pytest.mark.parametrize("verb", sorted(ALLOWED))
def test_transition_table(verb: str, state: State) -> None:
    d = reach(state)
    refused_before = len(d.of_type(Refused))
    d.send(WALK_COMMANDS[verb].encode() + b"\r\n")
    first = d.replies()[0]
    if state in ALLOWED[verb]:
        assert first == (WALK_BDAT[state] if verb == "BDAT" else WALK_ALLOWED[verb])
    else:
        assert first == text(WRONG_STATE[(verb, state)])
        assert d.session.state is state
        assert d.of_type(Refused)[refused_before:] == [Refused(verb, WRONG_STATE[(verb, state)])]


# ------------------------------------------------------------ every reply, once


@dataclass
class Case:
    script: str
    settings: Settings = SETTINGS
    tls_active: bool = True
    driver: Driver = field(default_factory=Driver)
    then: Any = None  # called with the session after the script


_EHLO = "C: EHLO c\nS~ 250 AUTH\n"
_MAIL = LOGIN + "C: MAIL FROM:<a@b.example>\nS: 250 2.1.0\n"
_TLS_FIRST = "C: EHLO c\nS~ 250 STARTTLS\n"

REPLY_CASES: dict[str, Case] = {
    "OK": Case("C: NOOP"),
    "SENDER_OK": Case(LOGIN + "C: MAIL FROM:<a@b.example>"),
    "RECIPIENT_OK": Case(_MAIL + "C: RCPT TO:<c@d.example>"),
    "START_DATA": Case(ENVELOPE + "C: DATA"),
    "BYE": Case("C: QUIT"),
    "HELP": Case("C: HELP"),
    "VRFY": Case("C: VRFY user"),
    "EXPN": Case("C: EXPN staff"),
    "READY_TLS": Case(_TLS_FIRST + "C: STARTTLS", STARTTLS_LISTENER, False),
    "AUTH_OK": Case(_EHLO + f"C: AUTH PLAIN {plain()}"),
    "UNRECOGNIZED": Case("C: FOO"),
    "LINE_TOO_LONG": Case("C: NOOP " + "x" * MAX_COMMAND_LINE),
    "BAD_UTF8": Case("C~ NOOP \\xff\\r\\n"),
    "NUL_IN_COMMAND": Case("C~ NOOP \\x00\\r\\n"),
    "BARE_CR_IN_COMMAND": Case("C~ EHLO a\\rb\\r\\n"),
    "NO_PARAMETERS": Case(ENVELOPE + "C: DATA now"),
    "EHLO_SYNTAX": Case("C: EHLO"),
    "HELO_SYNTAX": Case("C: HELO"),
    "MAIL_SYNTAX": Case(LOGIN + "C: MAIL TO:<a@b.example>"),
    "RCPT_SYNTAX": Case(_MAIL + "C: RCPT FROM:<c@d.example>"),
    "BDAT_SYNTAX": Case(LOGIN + "C: BDAT x"),
    "AUTH_SYNTAX": Case(_EHLO + "C: AUTH"),
    "BAD_PARAMETER": Case(LOGIN + "C: MAIL FROM:<a@b.example> SIZE=big"),
    "DUPLICATE_PARAMETER": Case(LOGIN + "C: MAIL FROM:<a@b.example> SIZE=1 SIZE=2"),
    "UNSUPPORTED_PARAMETER": Case(LOGIN + "C: MAIL FROM:<a@b.example> RET=FULL"),
    "BAD_SENDER_SYNTAX": Case(LOGIN + "C: MAIL FROM:<a@>"),
    "BAD_RECIPIENT_SYNTAX": Case(_MAIL + "C: RCPT TO:<rcpt>"),
    "SENDER_DOMAIN_TOO_LONG": Case(LOGIN + f"C: MAIL FROM:<a@{'b' * 64}.example>"),
    "RECIPIENT_DOMAIN_TOO_LONG": Case(
        LOGIN + "C: MAIL FROM:<a@b.example> SMTPUTF8\nS: 250\n"
        "C: RCPT TO:<u@" + "\u00fc" * 70 + ".example>"
    ),
    "NEED_SMTPUTF8": Case(LOGIN + "C: MAIL FROM:<j\u00f6rg@b.example>"),
    "NEED_EHLO": Case("C: AUTH PLAIN"),
    "NESTED_MAIL": Case(_MAIL + "C: MAIL FROM:<a@b.example>"),
    "NEED_MAIL": Case(LOGIN + "C: RCPT TO:<c@d.example>"),
    "NO_VALID_RECIPIENTS": Case(_MAIL + "C: DATA"),
    "NOT_IN_TRANSACTION": Case(_MAIL + "C: AUTH PLAIN"),
    "DATA_AFTER_BDAT": Case(ENVELOPE + "C~ BDAT 2\\r\\nhi\nS: 250 2.0.0\nC: DATA"),
    "TOO_MANY_RECIPIENTS": Case(
        ENVELOPE + "C: RCPT TO:<x@y.example>", Settings(HOSTNAME, max_recipients=1)
    ),
    "TOO_MANY_ERRORS": Case("C: FOO", Settings(HOSTNAME, max_bad_commands=1)),
    "TOO_MANY_COMMANDS": Case(
        "C: NOOP\nS: 250\nC: NOOP", Settings(HOSTNAME, max_commands_before_login=1)
    ),
    "NOT_SMTP": Case("C: GET / HTTP/1.0"),
    "PROXY_NOT_EXPECTED": Case("C: PROXY TCP4 192.0.2.1 192.0.2.2 4000 587"),
    "SIZE_EXCEEDED": Case(LOGIN + "C: MAIL FROM:<a@b.example> SIZE=999999999"),
    "BARE_LINE_ENDING": Case(ENVELOPE + "C: DATA\nS: 354\nC~ a\\nb\\r\\n.\\r\\n"),
    "TLS_ALREADY_ACTIVE": Case(_EHLO + "C: STARTTLS"),
    "TLS_NOT_AVAILABLE": Case("C: EHLO c\nS~ 250 CHUNKING\nC: STARTTLS", tls_active=False),
    "STARTTLS_FIRST": Case(
        _TLS_FIRST + "C: MAIL FROM:<a@b.example>", STARTTLS_LISTENER, tls_active=False
    ),
    "AUTH_REQUIRED": Case(_EHLO + "C: MAIL FROM:<a@b.example>"),
    "ENCRYPTION_REQUIRED": Case(_TLS_FIRST + "C: AUTH PLAIN", STARTTLS_LISTENER, False),
    "ALREADY_AUTHENTICATED": Case(LOGIN + "C: AUTH PLAIN"),
    "UNKNOWN_MECHANISM": Case(_EHLO + "C: AUTH CRAM-MD5"),
    "AUTH_CANCELLED": Case(_EHLO + "C: AUTH LOGIN\nS: 334 VXNlcm5hbWU6\nC: *"),
    "BAD_BASE64": Case(_EHLO + "C: AUTH PLAIN !!!!"),
    "BAD_SASL_MESSAGE": Case(_EHLO + f"C: AUTH PLAIN {b64('no separators')}"),
    # Replies the driver chooses and the session passes on.
    "AUTH_FAILED": Case(
        _EHLO + f"C: AUTH PLAIN {plain()}", driver=Driver(auth=refuse_with(replies.AUTH_FAILED))
    ),
    "AUTH_TEMPORARY_FAILURE": Case(
        _EHLO + f"C: AUTH PLAIN {plain()}",
        driver=Driver(auth=refuse_with(replies.AUTH_TEMPORARY_FAILURE)),
    ),
    "SERVICE_ERROR": Case(LOGIN, then=lambda s: s.fail(replies.SERVICE_ERROR)),
    "LOCAL_ERROR": Case(
        ENVELOPE + "C: DATA\nS: 354\nC: .",
        driver=Driver(message=refuse_with(replies.LOCAL_ERROR)),
    ),
    "TIMEOUT": Case("C: NOOP\nS: 250", then=Session.timeout),
    "SHUTTING_DOWN": Case("C: NOOP\nS: 250", then=Session.shutdown),
}
# Defined in replies.py but never sent by the session.
NOT_SESSION_REPLIES = {
    "TOO_BUSY": "sent by the listener instead of a banner, before any session exists",
    "TOO_MANY_FROM_ADDRESS": "sent by the listener (per-IP limit), before any session exists",
    "AUTH_TOO_MANY_FAILURES": "chosen by the driver; see test_auth_failed_with_421_closes",
    "SESSION_MESSAGES": "chosen by the driver at MAIL; see test_e2e_revocation.py",
    "SESSION_TOO_LONG": "chosen by the driver; see test_e2e_revocation.py",
}


def test_auth_failed_with_421_closes() -> None:
    session = Session(SETTINGS, tls_active=True)
    session.greeting()
    session.receive(b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n")
    seen = []
    while (event := session.next_event()) is not None:
        seen.append(event)
        if isinstance(event, AuthRequest):
            session.auth_failed(replies.AUTH_TOO_MANY_FAILURES)
    assert session.take_output().endswith(replies.AUTH_TOO_MANY_FAILURES)
    assert session.closed
    assert isinstance(seen[-1], Close)


def _reply_constants() -> dict[str, bytes]:
    return {
        name: value
        for name, value in vars(replies).items()
        if name.isupper() and isinstance(value, bytes)
    }


def test_every_reply_is_covered() -> None:
    constants = _reply_constants()
    covered = {constants[name] for name in REPLY_CASES}
    missing = {
        name
        for name, value in constants.items()
        if value not in covered and name not in NOT_SESSION_REPLIES
    }
    assert missing == set()


@pytest.mark.parametrize("name", sorted(REPLY_CASES))
def test_every_reply(name: str) -> None:
    case = REPLY_CASES[name]
    d = Dialog(case.settings, case.tls_active, case.driver).run(case.script)
    if case.then is not None:
        case.then(d.session)
        d.send(b"")
    assert d.replies()[-1] == text(_reply_constants()[name])


def test_every_reply_has_an_enhanced_code_matching_its_class() -> None:
    for name, value in _reply_constants().items():
        code, _, rest = value.decode().partition(" ")
        if code.startswith("3"):
            continue  # intermediate replies have no enhanced code (RFC 3463 classes 2, 4, 5)
        enhanced = rest.split(" ")[0]
        assert enhanced[0] == code[0], name
        assert all(part.isdigit() for part in enhanced.split(".")), name
        assert value.endswith(b"\r\n") and value.count(b"\r\n") == 1, name


# ------------------------------------------------------------ input cut anywhere

TRANSCRIPT = (
    b"EHLO client.example\r\n"
    b"AUTH LOGIN\r\n" + b64("user").encode() + b"\r\n" + b64("secret").encode() + b"\r\n"
    b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\n"
    b"RCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\n"
    b"DATA\r\nSubject: x\r\n\r\n..stuffed\r\nbody\r\n.\r\n"
    b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
    b"BDAT 5\r\nhelloBDAT 7 LAST\r\n\r\n.\r\n\r\n"
    b"NOOP " + b"x" * 1200 + b"\r\n"
    b"RSET\r\nVRFY x\r\nFOO\r\nQUIT\r\n"
)
SMUGGLING_TRANSCRIPT = (
    f"EHLO c\r\nAUTH PLAIN {plain()}\r\n".encode()
    + b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nhi\n.\n"
    + SMUGGLED
    + b"RSET\r\n"
)


def test_transcripts_do_what_they_should() -> None:
    output, events = converse([TRANSCRIPT], SMALL)
    assert [e.body for e in events if isinstance(e, MessageReady)] == [
        b"Subject: x\r\n\r\n.stuffed\r\nbody\r\n",
        b"hello\r\n.\r\n\r\n",
    ]
    assert output.endswith(
        b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n252 2.5.0 Cannot VRFY user;"
        b" send mail and delivery will be attempted\r\n500 5.5.2 Command "
        b"unrecognized\r\n221 2.0.0 Bye\r\n"
    )
    output, events = converse([SMUGGLING_TRANSCRIPT])
    assert b"550 5.5.2" in output
    assert not any(isinstance(e, MessageReady) for e in events)


@pytest.mark.parametrize(
    "transcript", [TRANSCRIPT, SMUGGLING_TRANSCRIPT], ids=["normal", "smuggle"]
)
def test_cut_at_every_byte_boundary(transcript: bytes) -> None:
    whole = converse([transcript], SMALL)
    for i in range(len(transcript) + 1):
        assert converse([transcript[:i], transcript[i:]], SMALL) == whole, i
    assert converse([bytes([b]) for b in transcript], SMALL) == whole


@settings(max_examples=150, deadline=None)
@given(
    transcript=st.sampled_from([TRANSCRIPT, SMUGGLING_TRANSCRIPT]),
    cuts=st.lists(st.integers(min_value=0, max_value=len(TRANSCRIPT)), max_size=30),
)
def test_cut_anywhere_many_times(transcript: bytes, cuts: list[int]) -> None:
    points = [0, *sorted(c for c in cuts if c <= len(transcript)), len(transcript)]
    chunks = [transcript[a:b] for a, b in itertools.pairwise(points)]
    assert converse(chunks, SMALL) == converse([transcript], SMALL)


def test_pipelined_commands_stop_when_replies_pile_up() -> None:
    """The core hands out at most MAX_QUEUED_REPLIES replies before the driver sends them."""
    session = Session(Settings(HOSTNAME, max_commands_before_login=0), tls_active=True)
    session.receive(b"NOOP\r\n" * (3 * MAX_QUEUED_REPLIES + 5))
    assert session.next_event() is None
    assert session.output_backlogged
    first = session.take_output()
    assert first.count(b"\r\n") == MAX_QUEUED_REPLIES
    total = MAX_QUEUED_REPLIES
    while (out := (session.next_event(), session.take_output())[1]) != b"":
        total += out.count(b"\r\n")
    assert total == 3 * MAX_QUEUED_REPLIES + 5
    assert not session.output_backlogged


def test_commands_before_login_count_auth_lines_and_stop_after_login() -> None:
    session = Session(Settings(HOSTNAME, max_commands_before_login=3), tls_active=True)
    session.receive(b"EHLO c\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    assert isinstance(session.next_event(), Close)
    assert session.take_output().endswith(replies.TOO_MANY_COMMANDS)


def test_fail_closes_from_any_state_and_knows_a_transaction() -> None:
    """A local error mid-transaction (the driver answers 451) or outside one (421)."""
    d = Dialog(SETTINGS, True).run(LOGIN + "C: MAIL FROM:<a@b.example>")
    assert d.session.state is State.MAIL
    assert d.session.in_transaction
    d.session.fail(replies.LOCAL_ERROR)
    assert d.session.closed
    assert d.session.take_output().endswith(replies.LOCAL_ERROR)
    idle = Dialog(SETTINGS, True).run(LOGIN)
    assert not idle.session.in_transaction


def test_logout_refuses_and_forgets_the_login() -> None:
    d = Dialog(SETTINGS, True, Driver(sender=lambda _: None)).run(LOGIN)
    session = d.session
    session.receive(b"MAIL FROM:<a@b.example>\r\n")
    assert isinstance(session.next_event(), SenderRequest)
    session.logout(replies.login_revoked("account disabled"))
    assert session.authenticated_user is None
    assert session.state is State.GREETED
    assert session.take_output().endswith(
        b"530 5.7.0 Login no longer valid (account disabled), authenticate again\r\n"
    )
    session.receive(b"MAIL FROM:<a@b.example>\r\n")
    assert session.next_event() is not None  # Refused: 530, must log in again
    assert session.take_output().startswith(b"530 5.7.0")


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 587\r\nEHLO c\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12) + b"EHLO c\r\n",
    ],
    ids=["v1", "v2"],
)
def test_a_proxy_header_without_proxy_protocol_closes_before_any_smtp(header: bytes) -> None:
    session = Session(Settings(HOSTNAME))
    session.receive(header)
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    # v2's signature opens with two empty lines: they get their usual 500 first.
    assert events[-1] == Close(PROXY_NOT_EXPECTED_REASON)
    assert len(events) == (1 if header.startswith(b"PROXY") else 3)
    assert session.take_output().endswith(replies.PROXY_NOT_EXPECTED)  # and no EHLO reply
    assert session.state is State.CLOSED


def test_proxy_later_in_a_session_is_only_an_unknown_command() -> None:
    session = Session(Settings(HOSTNAME))
    session.receive(b"EHLO c\r\nPROXY TCP4 192.0.2.1 192.0.2.2 4000 587\r\n")
    while session.next_event() is not None:
        pass
    assert session.take_output().endswith(replies.UNRECOGNIZED)
    assert session.state is State.GREETED
