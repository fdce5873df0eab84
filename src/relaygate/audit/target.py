"""Where to connect: ``HOST[:PORT]``, an IPv6 literal in brackets, and the default port."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

SUBMISSION_PORT = 587  # STARTTLS (RFC 6409)
SUBMISSIONS_PORT = 465  # TLS from the first byte (RFC 8314)


@dataclass(frozen=True)
class Target:
    host: str  # as given, without brackets
    port: int
    implicit: bool  # TLS at connect (port 465 style) instead of STARTTLS

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(text: str, *, implicit: bool) -> Target:
    """``example.com``, ``example.com:587``, ``192.0.2.1:465``, ``[::1]:587``, ``::1``.

    Raises ValueError with a one-line reason."""
    default = SUBMISSIONS_PORT if implicit else SUBMISSION_PORT
    text = text.strip()
    if not text:
        raise ValueError("no host given")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"missing ']' in {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {text!r}") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:  # a bare IPv6 literal: no port possible
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"not a host or IPv6 address: {text!r}") from None
        host, port_text = text, None
    else:
        host, sep, port_part = text.partition(":")
        port_text = port_part if sep else None
    if not host or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"not a host name: {text!r}")
    port = default
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"not a port number (1 to 65535): {port_text!r}")
        port = int(port_text)
    return Target(host=host, port=port, implicit=implicit)


def has_control(text: str) -> bool:
    """CR, LF, NUL, ESC ...: never in a name we put on an SMTP command line (a CR LF
    in --user would let it inject commands of its own into the session)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
