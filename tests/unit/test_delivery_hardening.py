"""Unit tests for the delivery side's defences against hostile remote hosts.

remote_text.clean (remote replies made safe once), dsn.build with hostile
replies (parsed back with ``email``), mx.is_public (which MX addresses are
refused by default) and the DNS length limits of envelope domains.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.delivery import dsn
from relaygate.delivery.mx import is_public
from relaygate.delivery.remote_text import MAX_REMOTE_TEXT, clean
from relaygate.smtp.address import AddressSyntaxError, check_mailbox

# What aiosmtplib hands us for "250 Ok \xe9t\xe9 \xff" (surrogateescape).
SURROGATES = b"Ok \xe9t\xe9 \xff".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (SURROGATES, "Ok \\xe9t\\xe9 \\xff"),
        (b"Ok \xe9t\xe9 \xff", "Ok \\xe9t\\xe9 \\xff"),
        ("caf\u00e9 ok", "caf\u00e9 ok"),  # valid UTF-8 is kept
        ("a\x00b", "a\\x00b"),
        ("bare\rCR", "bare\\x0dCR"),
        ("line one\nline two\r\nline three", "line one line two line three"),
        ("5.1.1 no\nX-Injected: yes", "5.1.1 no X-Injected: yes"),
        ("tab\there \x7f \x85 \u2028", "tab\\x09here \\x7f \\x85 \\u2028"),
        ("\ud800 lone", "\\ud800 lone"),  # a surrogate that was no escaped byte
        ("", ""),
    ],
)
def test_clean(raw: str | bytes, expected: str) -> None:
    result = clean(raw)
    assert result == expected
    result.encode("utf-8")  # storable by SQLite, writable to any log
    assert result.splitlines() in ([result], [])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=700), st.text(max_size=700)))
def test_clean_any_input_gives_one_safe_line(raw: str | bytes) -> None:
    result = clean(raw)
    result.encode("utf-8")
    assert len(result) <= MAX_REMOTE_TEXT
    assert result.splitlines() in ([result], [])
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in result)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=1500))
def test_a_bounce_can_be_built_from_any_reply_bytes(raw: bytes) -> None:
    reply = "550 " + raw.decode("utf-8", "surrogateescape")  # as aiosmtplib hands it over
    built = dsn.build(
        hostname="relay.test",
        queue_id="Q1",
        original=b"Subject: s\r\n\r\n",
        sender="a@b.test",
        recipients=[("u@x.test", reply, "mx.x.test")],
        arrival=0.0,
        now=1.0,
    )
    parsed = email.message_from_bytes(built, policy=email.policy.default)
    payload = list(parsed.iter_parts())[1].get_payload()
    assert isinstance(payload, list) and len(payload) == 2
    assert all(len(line) <= 998 for line in built.split(b"\r\n"))


def test_clean_caps_length() -> None:
    result = clean("x" * 5000)
    assert len(result) == MAX_REMOTE_TEXT and result.endswith("...")


def test_cleaned_text_is_storable_in_sqlite() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (reply TEXT)")
    with pytest.raises(UnicodeEncodeError):  # the original defect
        db.execute("INSERT INTO t VALUES (?)", (SURROGATES,))
    db.execute("INSERT INTO t VALUES (?)", (clean(SURROGATES),))


HOSTILE_REPLIES = [
    "550-5.1.1 first line\n550-X-Injected: yes\n550 5.1.1 last line",
    "550 5.1.1 user\nContent-Type: text/html\n\n<b>boom</b>",
    "554 5.7.1 " + SURROGATES + " \x00 \r \u00e9\u00fc\u4e2d",
    "552 5.2.2 " + "long " * 400 + "Z" * 3000,
    '550 5.1.1 semi; comma, colon: <angle> "quoted" (comment)',
]


@pytest.mark.parametrize("reply", HOSTILE_REPLIES)
def test_bounce_with_a_hostile_reply_parses_back(reply: str) -> None:
    raw = dsn.build(
        hostname="relay.test",
        queue_id="Q123",
        original=b"Subject: hello\r\nFrom: a@b.test\r\n\r\nbody\r\n",
        sender="a@b.test",
        recipients=[
            ("u@x.test", reply, "mx.x.test[192.0.2.1]:25"),
            ("v@x.test", "550 5.1.1 ok", None),
        ],
        arrival=1000.0,
        now=2000.0,
    )
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert not parsed.defects
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    payload = parts[1].get_payload()
    assert isinstance(payload, list)
    blocks = [b for b in payload if isinstance(b, email.message.Message)]
    assert [b["Reporting-MTA"] for b in blocks[:1]] == ["dns; relay.test"]
    first, second = blocks[1:]
    assert len(blocks) == 3  # nothing the reply said made a block or field of its own
    assert first["Final-Recipient"] == "rfc822; u@x.test"
    assert first["Action"] == "failed"
    assert first["Status"] == reply[4:9]
    assert first["Remote-MTA"] == "dns; mx.x.test"
    assert set(first.keys()) == {
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
    }
    diagnostic = " ".join(str(first["Diagnostic-Code"]).split())
    assert diagnostic.startswith("smtp; " + reply[:9])
    assert diagnostic.isascii()
    # The reply's words, in order, on one logical line.
    expected = " ".join(
        clean(reply, dsn.MAX_DIAGNOSTIC).encode("ascii", "backslashreplace").decode().split()
    )
    assert diagnostic == "smtp; " + expected
    assert second["Final-Recipient"] == "rfc822; v@x.test"
    assert str(second["Diagnostic-Code"]) == "smtp; 550 5.1.1 ok"


def test_fold_keeps_lines_short_and_words_whole() -> None:
    value = "smtp; " + " ".join(f"word{n}" for n in range(60)) + " " + "L" * 120
    folded = dsn.fold("Diagnostic-Code", value)
    lines = f"Diagnostic-Code: {folded}".split("\n")
    assert all(len(line) <= 78 for line in lines[:-1])
    assert lines[-1] == " " + "L" * 120
    assert " ".join(line.strip() for line in lines).removeprefix("Diagnostic-Code: ") == value


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("192.0.2.1", False),  # documentation
        ("203.0.113.9", False),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("127.66.0.2", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # CGNAT
        ("169.254.169.254", False),  # link-local (cloud metadata)
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("fe80::1", False),
        ("ff02::1", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("not an address", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(address) is public


CJK = "\u5f32\u96db\u5613\u6ea6\u5d17\u8d6a\u8788\u8a72\u7e97\u68df\u5a03\u8c72"


@pytest.mark.parametrize(
    "address",
    [
        "u@" + "\u00fc" * 70 + ".test",  # the reported case: 70 UTF-8 chars, one label
        "u@" + "a" * 64 + ".test",
        # 228 octets as UTF-8, but its A-labels (42 octets each) add up past 253.
        "u@" + ".".join([CJK] * 6) + ".test",
    ],
)
def test_domains_longer_than_dns_allows_are_refused(address: str) -> None:
    with pytest.raises(AddressSyntaxError) as caught:
        check_mailbox(address, smtputf8=True)
    assert caught.value.too_long


@pytest.mark.parametrize(
    "address",
    [
        "u@" + "a" * 63 + ".test",
        "u@" + "\u00fc" * 20 + ".test",
        "u@" + ".".join(["a" * 63] * 3) + ".test",
    ],
)
def test_domains_within_dns_limits_are_accepted(address: str) -> None:
    assert check_mailbox(address, smtputf8=True) == address


def test_a_malformed_domain_is_not_called_too_long() -> None:
    with pytest.raises(AddressSyntaxError) as caught:
        check_mailbox("u@a..test", smtputf8=False)
    assert not caught.value.too_long
