"""The PROXY protocol header (HAProxy ``send-proxy`` / ``send-proxy-v2``), sans-IO.

A load balancer in TCP mode opens its connection to us with one header that
says who the client is; this module reads it from the bytes received so far
and says one of three things:

- ``NeedMore``: the bytes are a strict prefix of a header that could still be
  valid; every one of them belongs to the header (the caller may consume them).
- ``Header``: a complete header, ``consumed`` bytes long; ``rest`` is what
  followed it. ``source`` is the client's (ip, port), or None when the header
  says to keep the real peer (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 ``AF_UNSPEC`` or
  ``AF_UNIX``).
- ``Malformed``: not a header, with a short reason (never the client's bytes).

Strict on purpose: the header decides which address every limit and log sees,
so anything the specification does not allow is refused, not guessed at.
Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

Version 1 is one text line, at most 107 bytes with its CRLF::

    PROXY TCP4 192.0.2.1 198.51.100.2 51234 587\r\n
    PROXY TCP6 2001:db8::1 2001:db8::2 51234 587\r\n
    PROXY UNKNOWN ...anything...\r\n

Version 2 is binary: a 12-byte signature, a version/command byte (0x20 LOCAL,
0x21 PROXY), a family/transport byte, a 16-bit big-endian length of what
follows, then the addresses and optional TLVs (type, 16-bit length, value),
which are checked for shape and skipped. The length is bounded by
``MAX_V2_LENGTH``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # bytes, CRLF included (the specification's limit)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
MAX_V2_LENGTH = 2048  # bytes after the fixed part: addresses and TLVs
MAX_HEADER = V2_FIXED + MAX_V2_LENGTH  # no header is longer than this

_V2_LOCAL = 0x20
_V2_PROXY = 0x21
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_TRANSPORT_UNSPEC, _STREAM, _DGRAM = 0, 1, 2
_ADDRESS_LENGTH = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


@dataclass(frozen=True)
class NeedMore:
    """A valid prefix so far: wait for more bytes."""


@dataclass(frozen=True)
class Header:
    version: int  # 1 or 2
    source: tuple[str, int] | None  # the client; None = keep the real peer
    destination: tuple[str, int] | None
    consumed: int  # header bytes, from the start of the input
    rest: bytes  # what came after the header


@dataclass(frozen=True)
class Malformed:
    reason: str  # short, fixed text: safe to log


Result = NeedMore | Header | Malformed

NEED_MORE = NeedMore()


def parse(data: bytes) -> Result:
    """Read a PROXY header (v1 or v2) from the start of ``data``."""
    if not data:
        return NEED_MORE
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return Malformed("no PROXY signature")


# ------------------------------------------------------------------- version 1


def _parse_v1(data: bytes) -> Result:
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        return Malformed("no PROXY signature")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        window = data[:V1_MAX]
        if b"\n" in window or b"\r" in window[:-1]:
            return Malformed("v1: bare CR or LF")
        if len(data) >= V1_MAX:
            return Malformed("v1: header longer than 107 bytes")
        if any(b < 0x20 or b > 0x7E for b in window.rstrip(b"\r")):
            return Malformed("v1: not printable ASCII")
        return NEED_MORE
    line = data[:end]
    if b"\n" in line or b"\r" in line:
        return Malformed("v1: bare CR or LF")
    if any(b < 0x20 or b > 0x7E for b in line):
        return Malformed("v1: not printable ASCII")
    consumed = end + 2
    rest = data[consumed:]
    text = line.decode("ascii")
    if not text.startswith("PROXY "):
        return Malformed("no PROXY signature")
    fields = text[len("PROXY ") :].split(" ")
    protocol = fields[0]
    if protocol == "UNKNOWN":
        # The receiver must ignore whatever follows UNKNOWN and keep the real peer.
        return Header(1, None, None, consumed, rest)
    if protocol not in ("TCP4", "TCP6"):
        return Malformed("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        return Malformed("v1: wrong number of fields")
    _, source_text, destination_text, source_port_text, destination_port_text = fields
    version = 4 if protocol == "TCP4" else 6
    source = _ip(source_text, version)
    destination = _ip(destination_text, version)
    if source is None or destination is None:
        return Malformed(f"v1: invalid IPv{version} address")
    source_port = _port(source_port_text)
    destination_port = _port(destination_port_text)
    if source_port is None or destination_port is None:
        return Malformed("v1: invalid port")
    return Header(1, (source, source_port), (destination, destination_port), consumed, rest)


def _ip(text: str, version: int) -> str | None:
    try:
        address = ipaddress.ip_address(text)  # IPv4: no leading zeros, no short forms
    except ValueError:
        return None
    if address.version != version:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None  # fe80::1%eth0 names an interface of the balancer, not a client
    return _canonical(address)


def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """IPv4-mapped IPv6 (::ffff:192.0.2.1) becomes the IPv4 address it stands for,
    so limits and throttles count that client as the IPv4 client it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _port(text: str) -> int | None:
    # Decimal, no sign, no leading zero (but "0" itself), at most 65535.
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    value = int(text)
    return value if value <= 65535 else None


# ------------------------------------------------------------------- version 2


def _parse_v2(data: bytes) -> Result:
    head = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(head):
        return Malformed("no PROXY signature")
    if len(data) < V2_FIXED:
        if len(data) > 12 and data[12] not in (_V2_LOCAL, _V2_PROXY):
            return Malformed("v2: bad version or command")
        if len(data) > 13 and _family_problem(data[12], data[13]):
            return Malformed(_family_problem(data[12], data[13]))
        return NEED_MORE
    command, family_byte = data[12], data[13]
    if command not in (_V2_LOCAL, _V2_PROXY):
        return Malformed("v2: bad version or command")
    problem = _family_problem(command, family_byte)
    if problem:
        return Malformed(problem)
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_LENGTH:
        return Malformed("v2: header longer than allowed")
    family = family_byte >> 4
    needed = _ADDRESS_LENGTH.get(family, 0)
    if command == _V2_PROXY and length < needed:
        return Malformed("v2: length too short for the address family")
    consumed = V2_FIXED + length
    if len(data) < consumed:
        return NEED_MORE
    body = data[V2_FIXED:consumed]
    rest = data[consumed:]
    if command == _V2_LOCAL:
        # A health check or the balancer's own connection: keep the real peer.
        return Header(2, None, None, consumed, rest)
    tlv_problem = _tlv_problem(body[needed:])
    if tlv_problem:
        return Malformed(tlv_problem)
    if family == _AF_INET:
        source = _canonical(ipaddress.IPv4Address(body[0:4]))
        destination = _canonical(ipaddress.IPv4Address(body[4:8]))
        ports = body[8:12]
    elif family == _AF_INET6:
        source = _canonical(ipaddress.IPv6Address(body[0:16]))
        destination = _canonical(ipaddress.IPv6Address(body[16:32]))
        ports = body[32:36]
    else:  # AF_UNSPEC, AF_UNIX: no IP address to report
        return Header(2, None, None, consumed, rest)
    source_port = int.from_bytes(ports[0:2], "big")
    destination_port = int.from_bytes(ports[2:4], "big")
    return Header(2, (source, source_port), (destination, destination_port), consumed, rest)


def _family_problem(command: int, family_byte: int) -> str:
    family, transport = family_byte >> 4, family_byte & 0x0F
    if family > _AF_UNIX or transport > _DGRAM:
        return "v2: unknown address family or transport"
    if command == _V2_LOCAL:
        return ""  # the receiver ignores the addresses of a LOCAL header
    if transport == _DGRAM:
        return "v2: datagram transport on a stream listener"
    if (family == _AF_UNSPEC) != (transport == _TRANSPORT_UNSPEC):
        return "v2: address family and transport disagree"
    return ""


def _tlv_problem(tlvs: bytes) -> str:
    """TLVs are skipped, but they must fill the header exactly."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            return "v2: truncated TLV"
        size = int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        offset += 3 + size
        if offset > len(tlvs):
            return "v2: TLV longer than the header"
    return ""
