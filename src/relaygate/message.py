"""Reading and completing a submitted message's header (RFC 5322, 6409 section 8).

Pure functions on bytes: find the few header fields the server cares about
(From, Sender, Subject, Message-ID, Date) without building a full email
object, and build the fields the server adds (Received, Message-ID, Date).
The full ``email`` package is used only where it earns its cost: splitting
an address list and decoding an encoded-word subject.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header, make_header

_WANTED = {b"from", b"sender", b"subject", b"message-id", b"date"}


@dataclass(slots=True)
class HeaderSummary:
    """The header fields that policy and the message log need."""

    from_values: list[str] = field(default_factory=list)
    sender_values: list[str] = field(default_factory=list)
    subject: str = ""
    has_message_id: bool = False
    has_date: bool = False


def header_block(body: bytes | bytearray) -> bytes:
    """The header section, up to (not including) the empty line."""
    if body.startswith(b"\r\n"):
        return b""
    end = body.find(b"\r\n\r\n")
    return bytes(body if end < 0 else body[: end + 2])


def summarize(body: bytes | bytearray) -> HeaderSummary:
    summary = HeaderSummary()
    name = b""
    value_parts: list[bytes] = []

    def flush() -> None:
        if name not in _WANTED:
            return
        value = b"".join(value_parts).decode("utf-8", "replace").strip()
        if name == b"from":
            summary.from_values.append(value)
        elif name == b"sender":
            summary.sender_values.append(value)
        elif name == b"subject":
            summary.subject = storable(decode_subject(value))
        elif name == b"message-id":
            summary.has_message_id = True
        else:
            summary.has_date = True

    for line in header_block(body).split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # folded continuation of the field above
            value_parts.append(line)
            continue
        flush()
        field_name, colon, value = line.partition(b":")
        if not colon:
            name = b""
            value_parts = []
            continue
        name = field_name.strip().lower()
        value_parts = [value]
    flush()
    return summary


def storable(text: str) -> str:
    """``text`` as every message log can keep it: NUL (which PostgreSQL text
    refuses, failing the whole shared commit) becomes U+FFFD, and so does a
    lone surrogate an encoded word may decode to."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def decode_subject(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeDecodeError, ValueError):
        return value


# The usual shapes, "a@b.c" and "Name <a@b.c>", skip the full RFC 5322 parser.
_SIMPLE_ADDRESS = re.compile(r"(?:[^<>\"(),:;@\\]*<)?([^<>\"(),:;@\\\s]+@[^<>\"(),:;@\\\s]+)>?")


def addresses(value: str) -> list[str] | None:
    """The addresses of an address-list field; None if any part is unparseable."""
    simple = _SIMPLE_ADDRESS.fullmatch(value.strip())
    if simple is not None and (("<" in value) == (">" in value)):
        return [simple.group(1)]
    found = []
    for _, address in email.utils.getaddresses([value]):
        if not address or "@" not in address:
            return None
        found.append(address)
    return found or None


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


@dataclass(frozen=True, slots=True)
class ReceivedInfo:
    helo: str
    client_ip: str
    hostname: str
    queue_id: str
    esmtp: bool
    tls_version: str | None
    tls_cipher: str | None
    user: str | None
    recipients: tuple[str, ...]
    smtputf8: bool = False
    node: str | None = None  # [server] node_name, on a cluster


def _address_literal(ip: str) -> str:
    """RFC 5321 4.1.3: [192.0.2.1] or [IPv6:2001:db8::1]."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def protocol_name(info: ReceivedInfo) -> str:
    """RFC 3848 / RFC 6531 "with" keyword: ESMTPSA, UTF8SMTPSA, SMTP, ..."""
    if not info.esmtp:
        return "SMTP"
    suffix = ("S" if info.tls_version else "") + ("A" if info.user else "")
    return ("UTF8SMTP" if info.smtputf8 else "ESMTP") + suffix


def _by_comment(node: str | None) -> str:
    return "relaygate" if node is None else f"relaygate node {_printable(node)}"


def received_header(info: ReceivedInfo, date: str) -> bytes:
    lines = [
        f"Received: from {_printable(info.helo)} ({_address_literal(info.client_ip)})",
        f"\tby {info.hostname} ({_by_comment(info.node)}) with {protocol_name(info)}"
        f" id {info.queue_id}",
    ]
    if info.tls_version:
        lines.append(f"\t(version={info.tls_version} cipher={info.tls_cipher})")
    if info.user:
        lines.append(f"\t(authenticated user {_printable(info.user)})")
    if len(info.recipients) == 1:  # naming many recipients would leak Bcc
        lines.append(f"\tfor <{_printable(info.recipients[0])}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode()


def added_fields(summary: HeaderSummary, *, queue_id: str, hostname: str, date: str) -> bytes:
    """Message-ID and Date when the client left them out (RFC 6409 8.2, 8.3)."""
    out = b""
    if not summary.has_date:
        out += f"Date: {date}\r\n".encode()
    if not summary.has_message_id:
        out += f"Message-ID: <{queue_id}@{hostname}>\r\n".encode()
    return out


def rfc5322_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, localtime=True)
