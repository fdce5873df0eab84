"""DKIM signing, checked against an independent verifier (dkimpy).

dkimpy gets the public key from the TXT record our generator printed, through
its ``dnsfunc`` hook: no real DNS is asked.
"""

from __future__ import annotations

import base64
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.delivery.dkim import (
    DKIMError,
    DKIMKey,
    KeyType,
    Signer,
    body_hash,
    fold_header,
    generate_key,
    header_fields,
    key_path,
    load_keys,
    normalize_domain,
    relaxed_body,
    relaxed_header,
    select_fields,
    split_message,
    txt_record,
    txt_value,
)

NOW = 1_790_000_000.0
DOMAIN = "example.com"

# ---------------------------------------------------------------- fixtures


class Keys:
    """One RSA and one Ed25519 key for DOMAIN, and a DNS that knows both."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: dict[bytes, bytes] = {}
        self.keys: dict[KeyType, DKIMKey] = {}
        key_type: KeyType
        for key_type in ("rsa", "ed25519"):
            key, record = generate_key(directory, DOMAIN, algorithm=key_type)
            self.keys[key.key_type] = key
            self.publish(record)

    def publish(self, record: str) -> None:
        name, value = parse_zone_line(record)
        self.records[name.encode()] = value.encode()

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        return self.records.get(name)

    def signer(self, key_type: KeyType | None = None) -> Signer:
        keys = list(self.keys.values()) if key_type is None else [self.keys[key_type]]
        return Signer({DOMAIN: keys})

    def verify(self, message: bytes, index: int = 0) -> bool:
        """dkimpy's verdict on the signature ``index`` (0: topmost), as dkim.verify()
        gives it for the topmost: a failure that dkimpy raises is a False."""
        try:
            return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=self.dnsfunc))
        except dkim.DKIMException:
            return False


def parse_zone_line(line: str) -> tuple[str, str]:
    """Name and value of ``NAME IN TXT "s1" "s2"``, the strings joined as a resolver does."""
    match = re.fullmatch(r'(\S+) IN TXT ((?:"[^"]*" ?)+)', line)
    assert match is not None, line
    strings = re.findall(r'"([^"]*)"', match[2])
    assert all(len(s) <= 255 for s in strings)
    return match[1], "".join(strings)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("dkim"))


KEY_TYPES: list[KeyType] = ["rsa", "ed25519"]


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def sign(keys: Keys, key_type: KeyType, message: bytes) -> bytes:
    return keys.signer(key_type).sign(message, DOMAIN, NOW) + message


PLAIN = crlf(
    "From: Alice <alice@example.com>\n"
    "To: bob@example.org\n"
    "Subject: Lunch\n"
    "Date: Tue, 01 Sep 2026 12:00:00 +0000\n"
    "Message-ID: <1@example.com>\n"
    "\n"
    "See you at noon.\n"
)

MESSAGES: dict[str, bytes] = {
    "plain": PLAIN,
    "folded headers": crlf(
        'From: "Alice Example"\n'
        "\t<alice@example.com>\n"
        "To: bob@example.org,\n"
        "  carol@example.org,   dave@example.org\n"
        "Subject:   a subject\t that goes on  \n"
        "   and on\n"
        "References: <a@example.com>\n"
        " <b@example.com>\n"
        "\t<c@example.com>\n"
        "\n"
        "Body.\n"
    ),
    "repeated headers": crlf(
        "Received: from a by b; Tue, 01 Sep 2026 12:00:00 +0000\n"
        "Received: from c by d; Tue, 01 Sep 2026 12:00:01 +0000\n"
        "From: alice@example.com\n"
        "To: bob@example.org\n"
        "Cc: one@example.org\n"
        "To: second-to@example.org\n"
        "Cc: two@example.org\n"
        "Subject: two To and two Cc fields\n"
        "\n"
        "Body.\n"
    ),
    "trailing blank lines": crlf(
        "From: alice@example.com\nSubject: blank lines\n\nText.\n\n\n  \n\t\n\n"
    ),
    "empty body": crlf("From: alice@example.com\nSubject: nothing\n\n"),
    "header only": crlf("From: alice@example.com\nSubject: no empty line\n"),
    "only blank lines": crlf("From: alice@example.com\n\n\n\n\n"),
    "utf-8": crlf(
        "From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.com>\n"
        "Subject: Grüße aus Köln\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "Grüße, ça va? 日本語のテキスト \t \n"
        "Zweite  Zeile\t\tmit\t Tabs\n"
    ),
    "long lines": crlf(
        "From: alice@example.com\n"
        "Subject: " + "long subject " * 30 + "\n"
        "List-Unsubscribe: <https://example.com/u/" + "x" * 200 + ">\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
        "\n" + ("0123456789 " * 90)[:990] + "\n" + "y" * 998 + "\n"
    ),
    "whitespace": crlf(
        "From : alice@example.com\n"
        "Subject:no space\n"
        "X-Empty:\n"
        "\n"
        "  leading\n"
        "trailing   \n"
        "\tmid \t dle\n"
        "\n"
        "after blank\n"
    ),
    "no final crlf": b"From: alice@example.com\r\nSubject: x\r\n\r\nlast line without CRLF",
}


# ------------------------------------------------------- sign, then verify


@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize("name", list(MESSAGES))
def test_dkimpy_verifies(keys: Keys, key_type: KeyType, name: str) -> None:
    message = MESSAGES[name]
    if name == "whitespace":
        # dkimpy's parser rejects "From :" (space before the colon), which
        # RFC 5322's obsolete syntax allows and our canonicalization handles.
        message = message.replace(b"From :", b"From:")
    signed = sign(keys, key_type, message)
    assert keys.verify(signed), signed.decode("utf-8", "replace")


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_signature_survives_relaxed_changes(keys: Keys, key_type: KeyType) -> None:
    """What relaxed canonicalization forgives: refolding, WSP runs, case of names,
    trailing whitespace and blank lines, fields that are not signed."""
    signed = sign(keys, key_type, MESSAGES["folded headers"])
    changed = (
        signed.replace(
            b"Subject:   a subject\t that goes on  \r\n   and on",
            b"SUBJECT: a subject that goes on and on",
        )
        .replace(b"Body.\r\n", b"Body.   \r\n\r\n\r\n")
        .replace(b"To: bob@example.org,\r\n  carol", b"to:   bob@example.org, carol")
    )
    changed = b"Received: from relay by mx; Tue, 01 Sep 2026 12:00:02 +0000\r\n" + changed
    assert changed != signed
    assert keys.verify(changed)


def test_dual_signature(keys: Keys) -> None:
    header = keys.signer().sign(PLAIN, DOMAIN, NOW)
    assert header.count(b"DKIM-Signature:") == 2
    signed = header + PLAIN
    assert keys.verify(signed, 0)
    assert keys.verify(signed, 1)
    assert b"a=rsa-sha256" in header.split(b"DKIM-Signature:")[1]  # RSA on top
    assert b"a=ed25519-sha256" in header.split(b"DKIM-Signature:")[2]


@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m: m.replace(b"noon", b"one"), id="body word"),
        pytest.param(lambda m: m + b"P.S. appended\r\n", id="body appended"),
        pytest.param(lambda m: m.replace(b"alice@", b"mallory@"), id="from address"),
        pytest.param(lambda m: m.replace(b"Lunch", b"Dinner"), id="subject"),
        pytest.param(
            lambda m: m.replace(b"Subject:", b"From: mallory@example.net\r\nSubject:"),
            id="second from below",
        ),
        pytest.param(lambda m: b"From: mallory@example.net\r\n" + m, id="second from on top"),
        pytest.param(
            lambda m: m.replace(b"Subject:", b"To: added@example.net\r\nSubject:"),
            id="second to",
        ),
    ],
)
def test_tampering_fails(keys: Keys, key_type: KeyType, tamper: Callable[[bytes], bytes]) -> None:
    header = keys.signer(key_type).sign(PLAIN, DOMAIN, NOW)
    assert keys.verify(header + PLAIN)
    tampered = tamper(PLAIN)
    assert tampered != PLAIN
    assert not keys.verify(header + tampered)


def test_field_absent_when_signed_may_be_added(keys: Keys) -> None:
    """Only From is oversigned: a Cc added to a message that had none still
    verifies (a second To, Subject, ... does not, being a new instance above
    the signed one)."""
    header = keys.signer("ed25519").sign(PLAIN, DOMAIN, NOW)
    assert b"cc" not in _tags(header)[b"h"].split(b":")
    added = PLAIN.replace(b"Subject:", b"Cc: added@example.net\r\nSubject:")
    assert keys.verify(header + added)


def test_wrong_key_fails(keys: Keys, tmp_path: Path) -> None:
    other, _ = generate_key(tmp_path, DOMAIN, algorithm="ed25519")
    signed = Signer({DOMAIN: [other]}).sign(PLAIN, DOMAIN, NOW) + PLAIN
    assert not keys.verify(signed)  # keys publishes a different key at that name


# ------------------------------------------------------- signature's form


def _tags(header: bytes) -> dict[bytes, bytes]:
    value = header.partition(b":")[2]
    unfolded = re.sub(rb"\r\n[ \t]", b"", value).strip()
    tags = {}
    for part in unfolded.split(b";"):
        name, _, tag_value = part.strip().partition(b"=")
        if name:
            tags[name] = re.sub(rb"\s+", b"", tag_value)
    return tags


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_signature_fields(keys: Keys, key_type: KeyType) -> None:
    header = keys.signer(key_type).sign(MESSAGES["repeated headers"], DOMAIN, NOW)
    assert header.startswith(b"DKIM-Signature: v=1; ") and header.endswith(b"\r\n")
    assert header.count(b"\r\n") == len(header.splitlines())  # only CRLF line ends
    for line in header.split(b"\r\n")[:-1]:
        assert len(line) <= 78, line
    tags = _tags(header)
    assert tags[b"a"] == (b"rsa-sha256" if key_type == "rsa" else b"ed25519-sha256")
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.com"
    assert tags[b"s"] == keys.keys[key_type].selector.encode()
    assert tags[b"t"] == b"1790000000"
    # Every instance listed, in the fixed order; From once more than present;
    # Received is not signed (relays add their own).
    assert tags[b"h"] == b"from:from:to:to:cc:cc:subject"
    assert b"l" not in tags and b"x" not in tags
    assert tags[b"bh"] == body_hash(b"Body.\r\n").encode()
    assert len(base64.b64decode(tags[b"b"])) == (256 if key_type == "rsa" else 64)


def test_oversigned_from_in_h(keys: Keys) -> None:
    header = keys.signer("rsa").sign(PLAIN, DOMAIN, NOW)
    names = _tags(header)[b"h"].split(b":")
    assert names.count(b"from") == 2
    assert names == [b"from", b"from", b"to", b"subject", b"date", b"message-id"]


def test_oversigning_catches_a_from_added_on_top(keys: Keys) -> None:
    """Shown with dkimpy's own header selection, not its verdict: dkimpy's
    verifier adds a "from" to every h= of its own accord (its bug 644046), so
    its verdict alone would not show that our h= does the job for verifiers
    that do not."""
    header = keys.signer("rsa").sign(PLAIN, DOMAIN, NOW)
    names = _tags(header)[b"h"].split(b":")
    tampered = b"From: mallory@example.net\r\n" + PLAIN
    headers, _ = dkim.rfc822_parse(tampered)
    selected = [bytes(value) for _, value in dkim.select_headers(headers, names)]
    assert b" mallory@example.net\r\n" in selected  # hashed, so the signature breaks
    without_oversigning = [bytes(v) for _, v in dkim.select_headers(headers, sorted(set(names)))]
    assert b" mallory@example.net\r\n" not in without_oversigning


def test_long_domain_and_selector_fold(tmp_path: Path) -> None:
    domain = "a-rather-long-subdomain-name.mail.example-organisation.co.uk"
    key, record = generate_key(tmp_path, domain, "selector-2026-11-29-rsa", "rsa")
    message = crlf(f"From: x@{domain}\n\nhi\n")
    header = Signer({domain: [key]}).sign(message, domain, NOW)
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    name, value = parse_zone_line(record)
    dns = {name.encode(): value.encode()}
    assert dkim.verify(header + message, dnsfunc=lambda n, timeout=5: dns.get(n))


def test_fold_header() -> None:
    words = [(" ", "a=1;", False), (" ", "b=" + "x" * 200, True)]
    folded = fold_header("X", words)
    lines = folded.split("\r\n")
    assert folded.endswith("\r\n") and lines[-1] == ""
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(" ") for line in lines[1:-1])
    assert re.sub(r"\r\n ", "", folded) == "X: a=1; b=" + "x" * 200 + "\r\n"


# ------------------------------------------------------- canonicalization


# RFC 6376 3.4.5, the example.
RFC_HEADER = b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
RFC_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_rfc6376_example_relaxed_header() -> None:
    fields = header_fields(RFC_HEADER)
    assert [name for name, _ in fields] == [b"a", b"b"]
    assert [relaxed_header(field) for _, field in fields] == [b"a:X\r\n", b"b:Y Z\r\n"]


def test_rfc6376_example_relaxed_body() -> None:
    assert relaxed_body(RFC_BODY) == b" C\r\nD E\r\n"


def test_rfc6376_example_split() -> None:
    assert split_message(RFC_HEADER + b"\r\n" + RFC_BODY) == (RFC_HEADER, RFC_BODY)


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b"", b""),
        (b"\r\n", b""),
        (b"\r\n\r\n \r\n\t\r\n", b""),
        (b"text", b"text\r\n"),
        (b"text  \t", b"text\r\n"),  # the CRLF SMTP adds comes first
        (b"a\r\n\r\nb\r\n\r\n", b"a\r\n\r\nb\r\n"),
        (b"  \r\nx\r\n", b"\r\nx\r\n"),  # a whitespace-only line in the middle stays
        (b"a\tb  c\r\n", b"a b c\r\n"),
        (b"a\tb\r\n", b"a b\r\n"),  # a single tab is a run too
        (b"a b c\r\n", b"a b c\r\n"),
        (b"x\r\n\r\n\r\n\r\n", b"x\r\n"),
    ],
)
def test_relaxed_body(body: bytes, canonical: bytes) -> None:
    assert relaxed_body(body) == canonical


def test_empty_body_hash() -> None:
    # The well-known relaxed body hash of an empty body (RFC 6376 3.4.4 erratum 1384).
    assert body_hash(b"") == "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    assert body_hash(b"\r\n\r\n") == body_hash(b"")


@pytest.mark.parametrize(
    ("field", "canonical"),
    [
        (b"Subject: Hello", b"subject:Hello\r\n"),
        (b"SUBJECT:Hello   World\t ", b"subject:Hello World\r\n"),
        (b"Subject \t:\t Hello", b"subject:Hello\r\n"),
        (b"Subject:\tHello\tWorld", b"subject:Hello World\r\n"),
        (b"X-Empty:", b"x-empty:\r\n"),
        (b"X-Empty:   ", b"x-empty:\r\n"),
        (b"To: a@b.c,\r\n\t d@e.f", b"to:a@b.c, d@e.f\r\n"),
        (b"Subject: a\r\n b\r\n  c", b"subject:a b c\r\n"),
        ("Subject: Grüße  aus Köln".encode(), "subject:Grüße aus Köln\r\n".encode()),
    ],
)
def test_relaxed_header(field: bytes, canonical: bytes) -> None:
    assert relaxed_header(field) == canonical


def test_split_message() -> None:
    assert split_message(b"A: 1\r\n\r\nbody\r\n") == (b"A: 1\r\n", b"body\r\n")
    assert split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")
    assert split_message(b"\r\nbody\r\n") == (b"", b"body\r\n")
    assert split_message(b"A: 1\r\n\r\n") == (b"A: 1\r\n", b"")
    assert split_message(b"A: 1\r\n\r\n\r\nx\r\n") == (b"A: 1\r\n", b"\r\nx\r\n")


def test_header_fields() -> None:
    header = b"From: a\r\n\tb\r\nnot a field\r\n continuation of nothing\r\nTo: c\r\nFROM: d\r\n"
    assert header_fields(header) == [
        (b"from", b"From: a\r\n\tb"),
        (b"to", b"To: c"),
        (b"from", b"FROM: d"),
    ]


def test_select_fields_last_instance_first() -> None:
    fields = header_fields(b"To: 1\r\nFrom: f\r\nTo: 2\r\nX: y\r\nTo: 3\r\n")
    listed, hashed = select_fields(fields, (b"from", b"to", b"cc"))
    assert listed == [b"from", b"from", b"to", b"to", b"to"]
    assert hashed == [b"from:f\r\n", b"to:3\r\n", b"to:2\r\n", b"to:1\r\n"]


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(
        st.text(alphabet=st.sampled_from("ab é\t.-日"), max_size=30),
        max_size=8,
    ),
    subject=st.text(alphabet=st.sampled_from("xy \t"), max_size=20),
    trailing=st.integers(0, 3),
)
def test_property_dkimpy_agrees(keys: Keys, lines: list[str], subject: str, trailing: int) -> None:
    body = "".join(line + "\n" for line in lines) + "\n" * trailing
    message = crlf(f"From: alice@example.com\nSubject: {subject}\n\n{body}")
    signed = sign(keys, "ed25519", message)
    assert keys.verify(signed)
    # Our canonical body matches dkimpy's.
    assert relaxed_body(split_message(message)[1]) == _dkimpy_relaxed_body(message)


def _dkimpy_relaxed_body(message: bytes) -> Any:
    from dkim.canonicalization import Relaxed

    return Relaxed.canonicalize_body(dkim.rfc822_parse(message)[1])


# ------------------------------------------------------- keys and records


def test_txt_records_parse_as_dkimpy_expects(keys: Keys) -> None:
    for key_type, key in keys.keys.items():
        record = txt_record(key)
        name, value = parse_zone_line(record)
        assert name == key.dns_name
        assert value == txt_value(key)
        _, keysize, ktag, _ = dkim.evaluate_pk(name.encode(), value.encode())
        assert ktag == key_type.encode()
        assert keysize == (2048 if key_type == "rsa" else 256)
    rsa_record = txt_record(keys.keys["rsa"])
    assert rsa_record.count('"') == 4  # two strings: the value is over 255 characters
    assert rsa_record.startswith('relaygate._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    assert txt_record(keys.keys["ed25519"]).startswith(
        'relaygate-ed25519._domainkey.example.com. IN TXT "v=DKIM1; k=ed25519; p='
    )


def test_key_files(keys: Keys) -> None:
    directory = keys.directory
    for key in keys.keys.values():
        path = key_path(directory, key.domain, key.selector, key.key_type)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE((directory / DOMAIN).stat().st_mode) == 0o700
    assert not [p for p in (directory / DOMAIN).iterdir() if p.name.startswith(".")]


def test_load_keys_roundtrip(keys: Keys) -> None:
    loaded = load_keys(keys.directory)
    assert list(loaded) == [DOMAIN]
    assert [(k.selector, k.algorithm) for k in loaded[DOMAIN]] == [
        ("relaygate", "rsa-sha256"),
        ("relaygate-ed25519", "ed25519-sha256"),
    ]
    signed = Signer.from_directory(keys.directory).sign(PLAIN, DOMAIN, NOW) + PLAIN
    assert keys.verify(signed, 0) and keys.verify(signed, 1)


def test_load_keys_missing_directory(tmp_path: Path) -> None:
    assert load_keys(tmp_path / "nothing") == {}


def test_load_keys_skips_other_files(tmp_path: Path) -> None:
    generate_key(tmp_path, "example.net", "s1", "ed25519")
    (tmp_path / "example.net" / ".s2.rsa.pem.123.tmp").write_text("half")
    (tmp_path / "example.net" / "README").write_text("notes")
    (tmp_path / "stray-file").write_text("x")
    loaded = load_keys(tmp_path)
    assert [k.selector for k in loaded["example.net"]] == ["s1"]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("s.rsa.pem", b"not a key", "not an unencrypted PEM private key"),
        ("s.rsa.pem", None, "not an RSA private key"),  # an Ed25519 key in an .rsa file
    ],
)
def test_load_keys_bad_file(tmp_path: Path, name: str, content: bytes | None, problem: str) -> None:
    if content is None:
        generate_key(tmp_path, "example.net", "s", "ed25519")
        (tmp_path / "example.net" / "s.ed25519.pem").rename(tmp_path / "example.net" / name)
    else:
        (tmp_path / "example.net").mkdir()
        (tmp_path / "example.net" / name).write_bytes(content)
    with pytest.raises(DKIMError, match=problem):
        load_keys(tmp_path)


def test_load_keys_bad_folder_name(tmp_path: Path) -> None:
    (tmp_path / "Example.NET").mkdir()
    with pytest.raises(DKIMError, match=r"name the folder 'example\.net'"):
        load_keys(tmp_path)


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_key(tmp_path, "example.net", "s1", "rsa")
    path = key_path(tmp_path, "example.net", "s1", "rsa")
    before = path.read_bytes()
    with pytest.raises(DKIMError, match="has a key with selector 's1' already"):
        generate_key(tmp_path, "example.net", "s1", "rsa")
    # The same selector for the other key type would share its DNS record.
    with pytest.raises(DKIMError, match="has a key with selector 's1' already"):
        generate_key(tmp_path, "example.net", "s1", "ed25519")
    assert path.read_bytes() == before


def test_generate_normalizes(tmp_path: Path) -> None:
    key, record = generate_key(tmp_path, "Example.NET.", "Sel-1", "ed25519")
    assert (key.domain, key.selector) == ("example.net", "sel-1")
    assert record.startswith("sel-1._domainkey.example.net. IN TXT")
    key, _ = generate_key(tmp_path, "bücher.example", "s", "ed25519")
    assert key.domain == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "domain", ["", "localhost", "bad_domain.com", "-x.com", "a..b", "../etc", "x" * 64 + ".com"]
)
def test_invalid_domain(tmp_path: Path, domain: str) -> None:
    with pytest.raises(DKIMError, match="invalid domain"):
        generate_key(tmp_path, domain, algorithm="ed25519")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("selector", ["", "a/b", "..", "sel_1", "x" * 64, "a b"])
def test_invalid_selector(tmp_path: Path, selector: str) -> None:
    with pytest.raises(DKIMError, match="invalid selector"):
        generate_key(tmp_path, DOMAIN, selector, "ed25519")


def test_unknown_algorithm(tmp_path: Path) -> None:
    with pytest.raises(DKIMError, match="unknown algorithm"):
        generate_key(tmp_path, DOMAIN, algorithm="dsa")  # type: ignore[arg-type]


def test_normalize_domain() -> None:
    assert normalize_domain(" Mail.Example.COM. ") == "mail.example.com"


# ------------------------------------------------------------------ Signer


def test_signing_domain_for(keys: Keys) -> None:
    signer = keys.signer()
    assert signer.signing_domain_for("alice@example.com") == DOMAIN
    assert signer.signing_domain_for("<Alice@EXAMPLE.com>") == DOMAIN
    assert signer.signing_domain_for("alice@example.com.") == DOMAIN
    assert signer.signing_domain_for("alice@news.example.com") is None  # exact domain only
    assert signer.signing_domain_for("alice@com") is None
    assert signer.signing_domain_for("alice@example.org") is None
    assert signer.signing_domain_for("no address") is None
    assert signer.signing_domain_for("") is None
    assert signer.domains == [DOMAIN]


def test_host_signing_domain_falls_back_to_the_parent_domain(keys: Keys, tmp_path: Path) -> None:
    """Our own mail (bounces, From MAILER-DAEMON@hostname) is signed with the
    hostname's keys, else with its nearest parent domain's."""
    signer = keys.signer()
    assert signer.host_signing_domain("relay.example.com") == DOMAIN
    assert signer.host_signing_domain("a.b.Example.COM.") == DOMAIN
    assert signer.host_signing_domain(DOMAIN) == DOMAIN
    assert signer.host_signing_domain("relay.example.org") is None
    assert signer.host_signing_domain("localhost") is None
    assert signer.host_signing_domain("") is None
    own, _ = generate_key(tmp_path / "own", "relay.example.com", "s", "ed25519")
    both = Signer({DOMAIN: list(keys.keys.values()), "relay.example.com": [own]})
    assert both.host_signing_domain("relay.example.com") == "relay.example.com"
    assert both.host_signing_domain("mx.relay.example.com") == "relay.example.com"


def test_internationalized_domain(tmp_path: Path) -> None:
    _, record = generate_key(tmp_path, "Bücher.example", "s", "ed25519")
    signer = Signer(load_keys(tmp_path))
    assert signer.signing_domain_for("anna@bücher.example") == "xn--bcher-kva.example"
    assert signer.signing_domain_for("anna@XN--BCHER-KVA.example") == "xn--bcher-kva.example"
    message = "From: anna@bücher.example\r\nSubject: é\r\n\r\nGrüße\r\n".encode()
    header = signer.sign(message, "bücher.example", NOW)
    assert b"d=xn--bcher-kva.example;" in header  # d= takes A-labels (RFC 8616 4)
    name, value = parse_zone_line(record)
    dns = {name.encode(): value.encode()}
    assert dkim.verify(header + message, dnsfunc=lambda n, timeout=5: dns.get(n))


def test_sign_unknown_domain(keys: Keys) -> None:
    with pytest.raises(DKIMError, match=r"no DKIM key for example\.org"):
        keys.signer().sign(PLAIN, "example.org", NOW)


def test_sign_without_from(keys: Keys) -> None:
    with pytest.raises(DKIMError, match="no From field"):
        keys.signer().sign(b"Subject: x\r\n\r\nbody\r\n", DOMAIN, NOW)


def test_signer_rejects_misfiled_key(keys: Keys) -> None:
    with pytest.raises(DKIMError, match="listed under"):
        Signer({"example.org": [keys.keys["rsa"]]})
