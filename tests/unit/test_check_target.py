"""HOST[:PORT] for `relaygate check` and its default ports."""

from __future__ import annotations

import errno
import socket

import pytest

from relaygate.audit.client import describe_os_error
from relaygate.audit.target import Target, parse_target


@pytest.mark.parametrize(
    ("text", "implicit", "target"),
    [
        ("mail.example.com", False, Target("mail.example.com", 587, False)),
        ("mail.example.com", True, Target("mail.example.com", 465, True)),
        ("mail.example.com:2525", False, Target("mail.example.com", 2525, False)),
        ("192.0.2.1:465", True, Target("192.0.2.1", 465, True)),
        ("[::1]:587", False, Target("::1", 587, False)),
        ("[::1]", True, Target("::1", 465, True)),
        ("::1", False, Target("::1", 587, False)),
        ("[2001:db8::25]:10587", False, Target("2001:db8::25", 10587, False)),
    ],
)
def test_parse(text: str, implicit: bool, target: Target) -> None:
    assert parse_target(text, implicit=implicit) == target


def test_display_puts_ipv6_in_brackets() -> None:
    assert str(parse_target("[::1]:587", implicit=False)) == "[::1]:587"
    assert str(parse_target("localhost", implicit=True)) == "localhost:465"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host:",
        "host:0",
        "host:65536",
        "host:abc",
        "[::1",
        "[nothost]:25",
        "[::1]x",
        "a:b:c",
        "user@host",
        "ho st:25",
        ":587",
        "host:-1",
    ],
)
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text, implicit=False)


def test_connection_errors_read_well() -> None:
    # A name that does not resolve: getaddrinfo's code is not an errno (no DNS
    # query in tests: traffic stays on loopback, so the error is made here).
    unresolved = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe_os_error(unresolved) == "cannot resolve the host: Name or service not known"
    refused = OSError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 1)")
    assert describe_os_error(refused) == "Connection refused"
    assert describe_os_error(ConnectionResetError()) == "ConnectionResetError"
