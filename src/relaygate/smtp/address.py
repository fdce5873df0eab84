"""Envelope address syntax (RFC 5321 section 4.1.2, RFC 6531 for SMTPUTF8).

Pure functions: split ``<path> parameters`` and check the mailbox syntax.
Strict on purpose: the angle brackets are required, a domain is required,
and only addresses a downstream MTA will also accept get through.
"""

from __future__ import annotations

import ipaddress
import re

MAX_ADDRESS = 254  # RFC 5321 4.5.3.1.3 path limit (256) minus the brackets
MAX_LOCAL_PART = 64
MAX_LABEL = 63  # octets per DNS label (RFC 1035 2.3.4), A-label form for IDNs
MAX_DOMAIN = 253  # octets of a domain name in text form, A-labels (RFC 1035, RFC 5890)

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_ATOM_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
# Lengths are checked apart (_check_domain_length), for a reply that says so.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LABEL_UTF8 = (
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
)
_DOMAIN_UTF8 = re.compile(rf"{_LABEL_UTF8}(?:\.{_LABEL_UTF8})*")


class AddressSyntaxError(ValueError):
    """The path is malformed; ``non_ascii`` tells if only SMTPUTF8 was missing,
    ``too_long`` if the domain (or one of its labels) is longer than DNS allows."""

    def __init__(self, message: str, *, non_ascii: bool = False, too_long: bool = False) -> None:
        super().__init__(message)
        self.non_ascii = non_ascii
        self.too_long = too_long


def split_path(argument: str) -> tuple[str, str]:
    """``<a@b> SIZE=1`` -> (``a@b``, ``SIZE=1``). Raises AddressSyntaxError."""
    argument = argument.lstrip(" ")
    if not argument.startswith("<"):
        raise AddressSyntaxError("address must be in angle brackets")
    end = argument.find(">") if '"' not in argument else _closing_bracket(argument)
    if end < 0:
        raise AddressSyntaxError("missing closing angle bracket")
    rest = argument[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressSyntaxError("text after the closing angle bracket")
    return argument[1:end], rest.strip(" ")


def _closing_bracket(text: str) -> int:
    in_quotes = False
    escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return index
    return -1


def check_mailbox(path: str, *, smtputf8: bool) -> str:
    """Return the mailbox of a path (source route dropped) if it is valid."""
    if path.startswith("@"):
        # Obsolete source route "@a,@b:user@c" (RFC 5321 4.1.2): ignore it.
        _, sep, path = path.partition(":")
        if not sep:
            raise AddressSyntaxError("malformed source route")
    if len(path.encode()) > MAX_ADDRESS:  # octets, not characters (RFC 6531 3.3)
        raise AddressSyntaxError("address too long")
    local, sep, domain = path.rpartition("@")
    if not sep or not local or not domain:
        raise AddressSyntaxError("address needs a local part and a domain")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressSyntaxError("local part too long")
    ascii_only = path.isascii()
    if not ascii_only and not smtputf8:
        raise AddressSyntaxError("non-ASCII address without SMTPUTF8", non_ascii=True)
    if local.startswith('"'):
        pattern = _QUOTED if ascii_only else _QUOTED_UTF8
    else:
        pattern = _DOT_ATOM if ascii_only else _DOT_ATOM_UTF8
    if pattern.fullmatch(local) is None:
        raise AddressSyntaxError("malformed local part")
    if domain.startswith("["):
        _check_literal(domain)
    elif (_DOMAIN if ascii_only else _DOMAIN_UTF8).fullmatch(domain) is None:
        raise AddressSyntaxError("malformed domain")
    else:
        _check_domain_length(domain)
    return path


def _check_domain_length(domain: str) -> None:
    """DNS limits, counted as the A-labels a resolver will ask for.

    A domain past them can never be looked up: refused here, it cannot reach
    the queue (where it once stranded messages).
    """
    labels = [_a_label_length(label) for label in domain.split(".")]
    if max(labels) > MAX_LABEL:
        raise AddressSyntaxError("domain label longer than 63 octets", too_long=True)
    if sum(labels) + len(labels) - 1 > MAX_DOMAIN:
        raise AddressSyntaxError("domain longer than 253 octets", too_long=True)


def _a_label_length(label: str) -> int:
    if label.isascii():
        return len(label)
    # "xn--" + Punycode (RFC 3492) of the label; IDNA case mapping can only shorten it.
    return 4 + len(label.lower().encode("punycode"))


def _check_literal(domain: str) -> None:
    if not domain.endswith("]"):
        raise AddressSyntaxError("malformed address literal")
    inner = domain[1:-1]
    if "%" in inner:  # ipaddress accepts IPv6 zone ids ("fe80::1%anything"); RFC 5321 does not
        raise AddressSyntaxError("malformed address literal")
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressSyntaxError("malformed address literal") from None


def parse_parameters(text: str) -> dict[str, str | None] | None:
    """``SIZE=10 BODY=8BITMIME SMTPUTF8`` -> {"SIZE": "10", ...}; None if repeated."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        key = key.upper()
        if key in params:
            return None
        params[key] = value if sep else None
    return params
