"""Envelope address syntax: split_path, check_mailbox, parse_parameters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.smtp.address import (
    MAX_ADDRESS,
    MAX_LOCAL_PART,
    AddressSyntaxError,
    check_mailbox,
    parse_parameters,
    split_path,
)

# ------------------------------------------------------------ split_path


@pytest.mark.parametrize(
    ("argument", "path", "rest"),
    [
        ("<a@b.example>", "a@b.example", ""),
        (" <a@b.example>", "a@b.example", ""),
        ("<>", "", ""),
        ("<a@b.example> SIZE=10 BODY=8BITMIME", "a@b.example", "SIZE=10 BODY=8BITMIME"),
        ("<a@b.example>   SIZE=10  ", "a@b.example", "SIZE=10"),
        ('<"a>b"@c.example>', '"a>b"@c.example', ""),
        ('<"a\\">"@c.example> X=1', '"a\\">"@c.example', "X=1"),
        ("<@r.example:a@b.example>", "@r.example:a@b.example", ""),
    ],
)
def test_split_path(argument: str, path: str, rest: str) -> None:
    assert split_path(argument) == (path, rest)


@pytest.mark.parametrize(
    "argument",
    ["", "a@b.example", "<a@b.example", "<a@b.example>SIZE=1", '<"a>b@c.example', "\t<a@b>"],
)
def test_split_path_errors(argument: str) -> None:
    with pytest.raises(AddressSyntaxError):
        split_path(argument)


# ------------------------------------------------------------ check_mailbox


@pytest.mark.parametrize(
    "address",
    [
        "a@b.example",
        "first.last+tag@sub.b.example",
        "!#$%&'*+/=?^_`{|}~-@b.example",
        "a@b",
        "a@123.example",
        "a@x-y.example",
        '"john doe"@b.example',
        '"a@b"@c.example',
        '"a\\"b"@c.example',
        '"a\\\\b"@c.example',
        '""@c.example',
        "a@[192.0.2.1]",
        "a@[IPv6:2001:db8::1]",
        "a@[ipv6:::1]",
        "a@[IPv6:::ffff:192.0.2.1]",
        "x" * MAX_LOCAL_PART + "@b.example",
    ],
)
def test_valid_addresses(address: str) -> None:
    assert check_mailbox(address, smtputf8=False) == address


@pytest.mark.parametrize(
    ("path", "mailbox"),
    [
        ("@relay.example:a@b.example", "a@b.example"),
        ("@r1.example,@r2.example:a@b.example", "a@b.example"),
    ],
)
def test_source_route_is_dropped(path: str, mailbox: str) -> None:
    assert check_mailbox(path, smtputf8=False) == mailbox


@pytest.mark.parametrize(
    "address",
    [
        "",
        "a",
        "a@",
        "@b.example",
        "@relay.example",  # a source route without the mailbox
        "@relay.example:",
        "a..b@c.example",
        ".a@c.example",
        "a.@c.example",
        "a b@c.example",
        "a@b@c.example",
        "a@-b.example",
        "a@b-.example",
        "a@b..example",
        "a@b.example.",
        "a@.b.example",
        "a@b_c.example",
        "a@" + "x" * 64 + ".example",
        '"unterminated@c.example',
        '"a"b@c.example',
        '"a\x01"@c.example',
        '"a\\\x01"@c.example',
        "a\x00@c.example",
        "a\r@c.example",
        "a@[300.0.0.1]",
        "a@[192.0.2.01]",
        "a@[192.0.2.1",
        "a@[]",
        "a@[IPv6:zz::1]",
        "a@[IPv6:fe80::1%eth0]",
        "a@[IPv6:fe80::1%\r]",
        "a@[2001:db8::1]",  # IPv6 needs its tag
        "a@[tag:content]",  # general address literals are not accepted
        "x" * (MAX_LOCAL_PART + 1) + "@b.example",
    ],
)
def test_invalid_addresses(address: str) -> None:
    with pytest.raises(AddressSyntaxError) as info:
        check_mailbox(address, smtputf8=True)
    assert not info.value.non_ascii


def test_length_limit_is_254_octets() -> None:
    domain = ".".join(["d" * 60] * 4)  # 243 octets
    longest = "a" * (MAX_ADDRESS - len(domain) - 1) + "@" + domain
    assert len(longest) == MAX_ADDRESS
    assert check_mailbox(longest, smtputf8=False) == longest
    with pytest.raises(AddressSyntaxError):
        check_mailbox("a" + longest, smtputf8=False)


def test_length_limit_counts_utf8_octets() -> None:
    # 30 two-octet characters: 60 octets, within the local-part limit.
    local = "\u00e9" * 30
    domain = "\u00e9" * 100 + ".example"  # 208 octets, 108 characters
    address = f"{local}@{domain}"
    assert len(address) < MAX_ADDRESS < len(address.encode())
    with pytest.raises(AddressSyntaxError):
        check_mailbox(address, smtputf8=True)


def test_local_part_limit_counts_utf8_octets() -> None:
    check_mailbox("\u00e9" * 32 + "@b.example", smtputf8=True)
    with pytest.raises(AddressSyntaxError):
        check_mailbox("\u00e9" * 33 + "@b.example", smtputf8=True)


@pytest.mark.parametrize(
    "address",
    [
        "j\u00f6rg@b\u00fccher.example",
        "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a",
        "\u00e4@b.example",
        "a@\u00f6.example",
        '"j\u00f6rg doe"@b.example',
    ],
)
def test_smtputf8_addresses(address: str) -> None:
    assert check_mailbox(address, smtputf8=True) == address
    with pytest.raises(AddressSyntaxError) as info:
        check_mailbox(address, smtputf8=False)
    assert info.value.non_ascii  # the session answers 553 5.6.7 for these


@pytest.mark.parametrize("address", ["\u00e4..b@c.example", "\u00e4@-b.example", "\u00e4@"])
def test_malformed_utf8_addresses(address: str) -> None:
    with pytest.raises(AddressSyntaxError) as info:
        check_mailbox(address, smtputf8=True)
    assert not info.value.non_ascii


# ------------------------------------------------------------ parameters


@pytest.mark.parametrize(
    ("text", "params"),
    [
        ("", {}),
        ("SMTPUTF8", {"SMTPUTF8": None}),
        ("size=10 Body=8bitmime", {"SIZE": "10", "BODY": "8bitmime"}),
        ("AUTH=<> X=a=b", {"AUTH": "<>", "X": "a=b"}),
        ("SIZE=", {"SIZE": ""}),
        ("  A=1   B  ", {"A": "1", "B": None}),
    ],
)
def test_parse_parameters(text: str, params: dict[str, str | None]) -> None:
    assert parse_parameters(text) == params


@pytest.mark.parametrize("text", ["SIZE=1 SIZE=2", "size=1 SIZE=1", "A A"])
def test_repeated_parameter(text: str) -> None:
    assert parse_parameters(text) is None


# ------------------------------------------------------------ any text

address_text = st.text(
    alphabet=st.one_of(st.sampled_from(list('ab.@"\\[]:,-_ <>%')), st.characters(codec="utf-8")),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(address_text, st.booleans())
def test_any_text_is_accepted_or_refused_cleanly(text: str, smtputf8: bool) -> None:
    try:
        mailbox = check_mailbox(text, smtputf8=smtputf8)
    except AddressSyntaxError:
        return
    assert len(mailbox.encode()) <= MAX_ADDRESS
    assert "@" in mailbox
    assert not any(ch in mailbox for ch in "\r\n\0")
    assert smtputf8 or mailbox.isascii()


@settings(max_examples=500, deadline=None)
@given(address_text)
def test_split_path_any_text(text: str) -> None:
    try:
        path, rest = split_path(text)
    except AddressSyntaxError:
        return
    assert f"<{path}>" in text
    assert rest == rest.strip(" ")
