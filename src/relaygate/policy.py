"""Policy: who may send what. For now, the sender-binding rule.

Sender binding: an authenticated account may use an envelope sender (MAIL
FROM) only when it matches one of the account's sender patterns. A pattern
is either a full address (``alice@example.com``) or a whole domain
(``@example.com``). New accounts get their own address as their only pattern.
"""

from __future__ import annotations

from collections.abc import Iterable

from relaygate.message import HeaderSummary, addresses


def sender_allowed(patterns: Iterable[str], address: str) -> bool:
    """True when ``address`` matches one of ``patterns``.

    - ``alice@example.com`` matches exactly that address. The local part is
      compared case-insensitively too: RFC 5321 lets a receiving system treat
      ``Alice`` and ``alice`` as different mailboxes, but in practice none do,
      and our account addresses are case-insensitive as well, so being strict
      here would only reject mail users expect to go through.
    - ``@example.com`` matches any address at exactly that domain, not at
      its subdomains (``@example.com`` does not allow ``x@mail.example.com``);
      a subdomain needs its own pattern.
    - The null sender ``<>`` (empty address) and an address without ``@``
      never match: bounces are ours to send, not an account's.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    full = address.lower()
    domain_pattern = "@" + domain.lower()
    return any(pattern.lower() in (full, domain_pattern) for pattern in patterns)


# ------------------------------------------------------------- replies to give
# (Kept beside the rule so the wording and the rule change together.)

NULL_SENDER = b"553 5.7.1 The null sender <> is not allowed on submission\r\n"
NO_FROM = b"550 5.6.0 Message must have a From: header\r\n"
MANY_FROM = b"550 5.6.0 Message must have exactly one From: header\r\n"
MANY_SENDER = b"550 5.6.0 Message must have at most one Sender: header\r\n"


def envelope_sender_refusal(patterns: Iterable[str], address: str) -> bytes | None:
    """None when MAIL FROM:<address> is allowed, else the 553 reply to give."""
    if not address:
        return NULL_SENDER
    if sender_allowed(patterns, address):
        return None
    return f"553 5.7.1 Sender address <{address}> is not allowed for this login\r\n".encode()


def header_sender_refusal(patterns: Iterable[str], summary: HeaderSummary) -> bytes | None:
    """None when every From: (and the Sender:) address is the account's to use.

    A second From: field, an unparseable one or a foreign address is refused
    at the end of DATA with a 550, before anything is stored.
    """
    patterns = tuple(patterns)
    if not summary.from_values:
        return NO_FROM
    if len(summary.from_values) > 1:
        return MANY_FROM
    if len(summary.sender_values) > 1:
        return MANY_SENDER
    for name, values in (("From", summary.from_values), ("Sender", summary.sender_values)):
        for value in values:
            found = addresses(value)
            if found is None:
                return f"550 5.7.1 {name}: header has no usable address\r\n".encode()
            for address in found:
                if not sender_allowed(patterns, address):
                    return (
                        f"550 5.7.1 {name}: address <{_printable(address)}> is not allowed"
                        " for this login\r\n"
                    ).encode()
    return None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
