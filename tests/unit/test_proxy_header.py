"""The PROXY header parser (server/proxy.py): valid v1/v2 headers, malformed ones, prefixes.

Properties (hypothesis): any valid header, cut anywhere before its end, is
NeedMore and never a wrong answer; followed by anything, it parses to the same
result with that as ``rest``; arbitrary bytes never raise and a NeedMore
prefix is always bounded by MAX_HEADER.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaygate.server.proxy import (
    MAX_HEADER,
    MAX_V2_LENGTH,
    V1_MAX,
    V2_SIGNATURE,
    Header,
    Malformed,
    NeedMore,
    parse,
)

FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def v2(
    command: int = 0x21,
    family: int = 0x11,
    addresses: bytes | None = None,
    tlvs: bytes = b"",
    length: int | None = None,
) -> bytes:
    if addresses is None:
        addresses = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 51234, 587)
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + body


def v2_inet6(source: str = "2001:db8::1", destination: str = "2001:db8::2") -> bytes:
    addresses = (
        ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address(destination).packed
        + struct.pack("!HH", 40000, 465)
    )
    return v2(family=0x21, addresses=addresses)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# ----------------------------------------------------------------- valid headers

VALID = [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 587\r\n", ("192.0.2.1", 51234)),
    (b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n", ("255.255.255.255", 65535)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 587\r\n", ("2001:db8::1", 51234)),
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n", ("2001:db8::1", 1)),
    (b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n", ("192.0.2.7", 1)),  # mapped: counted as v4
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 anything 0\r\n", None),
    (v2(), ("192.0.2.1", 51234)),
    (v2_inet6(), ("2001:db8::1", 40000)),
    (v2_inet6("::ffff:10.1.2.3"), ("10.1.2.3", 40000)),
    (v2(tlvs=tlv(0x01, b"smtp") + tlv(0x04, b"") + tlv(0x20, b"\x01" * 40)), ("192.0.2.1", 51234)),
    (v2(command=0x20, family=0x00, addresses=b""), None),  # LOCAL: keep the real peer
    (v2(command=0x20, family=0x11), None),  # LOCAL with addresses: ignored
    (v2(family=0x00, addresses=b""), None),  # PROXY + AF_UNSPEC: keep the real peer
    (v2(family=0x31, addresses=b"/run/x.sock".ljust(216, b"\0")), None),  # AF_UNIX
    (v2(tlvs=tlv(0x04, b"\0" * (MAX_V2_LENGTH - 12 - 3))), ("192.0.2.1", 51234)),  # at the bound
]


@pytest.mark.parametrize(("header", "source"), VALID)
def test_valid_headers(header: bytes, source: tuple[str, int] | None) -> None:
    result = parse(header + b"EHLO client\r\n")
    assert isinstance(result, Header), result
    assert result.source == source
    assert result.consumed == len(header)
    assert result.rest == b"EHLO client\r\n"
    assert result.version == (1 if header.startswith(b"PROXY") else 2)


def test_v1_destination_is_reported() -> None:
    result = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 587\r\n")
    assert isinstance(result, Header)
    assert result.destination == ("198.51.100.2", 587)


def test_v1_at_its_length_limit() -> None:
    # TCP6 with the longest addresses: exactly 104 bytes; UNKNOWN padded to 107.
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {longest} {longest} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert isinstance(parse(line), Header)
    unknown = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(unknown) == V1_MAX
    assert isinstance(parse(unknown), Header)
    assert parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n") == Malformed(
        "v1: header longer than 107 bytes"
    )


# ----------------------------------------------------------------- malformed

MALFORMED = [
    (b"EHLO client.example\r\n", "no PROXY signature"),
    (b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n", "no PROXY signature"),
    (b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n", "no PROXY signature"),
    (b"\x16\x03\x01\x02\x00", "no PROXY signature"),  # a TLS ClientHello
    (b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", "v1: protocol must be TCP4, TCP6 or UNKNOWN"),
    (b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n", "v1: protocol must be TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", "v1: wrong number of fields"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", "v1: wrong number of fields"),
    (b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n", "v1: wrong number of fields"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n", "v1: wrong number of fields"),
    (b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n", "v1: invalid IPv4 address"),
    (b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n", "v1: invalid IPv4 address"),
    (b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n", "v1: invalid IPv4 address"),
    (b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n", "v1: invalid IPv4 address"),
    (b"PROXY TCP4 example.com 198.51.100.2 1 2\r\n", "v1: invalid IPv4 address"),
    (b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n", "v1: invalid IPv6 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1: invalid IPv6 address"),
    (b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n", "v1: invalid IPv6 address"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 x 2\r\n", "v1: invalid port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n", "v1: invalid port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n", "v1: invalid port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n", "v1: invalid port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 0587 2\r\n", "v1: invalid port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 999999\r\n", "v1: invalid port"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", "v1: bare CR or LF"),
    (b"PROXY TCP4 192.0.2.1\r198.51.100.2 1 2\r\n", "v1: bare CR or LF"),
    (b"PROXY TCP4 192.0.2.1\t198.51.100.2 1 2\r\n", "v1: not printable ASCII"),
    (b"PROXY TCP4 \xc3\xa9 198.51.100.2 1 2\r\n", "v1: not printable ASCII"),
    (b"PROXY TCP4 \x00", "v1: not printable ASCII"),
    (b"PROXY UNKNOWN " + b"x" * 200, "v1: header longer than 107 bytes"),
    (V2_SIGNATURE[:5] + b"X", "no PROXY signature"),
    (V2_SIGNATURE[:-1] + b"\r" + bytes(4), "no PROXY signature"),
    (v2(command=0x11), "v2: bad version or command"),  # version 1 in a v2 header
    (v2(command=0x22), "v2: bad version or command"),
    (v2(command=0x31), "v2: bad version or command"),
    (v2(family=0x41), "v2: unknown address family or transport"),
    (v2(family=0x13), "v2: unknown address family or transport"),
    (v2(family=0x12), "v2: datagram transport on a stream listener"),
    (v2(family=0x10), "v2: address family and transport disagree"),
    (v2(family=0x01, addresses=b""), "v2: address family and transport disagree"),
    (v2(family=0x11, addresses=bytes(11)), "v2: length too short for the address family"),
    (v2(family=0x21, addresses=bytes(12)), "v2: length too short for the address family"),
    (v2(family=0x31, addresses=bytes(100)), "v2: length too short for the address family"),
    (v2(length=MAX_V2_LENGTH + 1), "v2: header longer than allowed"),
    (v2(length=0xFFFF), "v2: header longer than allowed"),
    (v2(tlvs=b"\x01\x00"), "v2: truncated TLV"),
    (v2(tlvs=tlv(0x01, b"abc")[:-1]), "v2: TLV longer than the header"),
    (v2(tlvs=b"\x01\x00\x10abc"), "v2: TLV longer than the header"),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
def test_malformed_headers(data: bytes, reason: str) -> None:
    assert parse(data) == Malformed(reason)


def test_malformed_is_known_early() -> None:
    """SMTP, TLS or junk is refused from its first bytes: no wait for a timeout."""
    for data in (b"E", b"H", b"\x16", b"PROXX", b"\r\n\r\n\x01", b"PROXY TCP4 1.2.3.4\n"):
        assert isinstance(parse(data), Malformed), data
    assert isinstance(parse(V2_SIGNATURE + b"\x22"), Malformed)
    assert isinstance(parse(V2_SIGNATURE + b"\x21\x12"), Malformed)


# ----------------------------------------------------------------- truncated

TRUNCATABLE = [header for header, _ in VALID]


@pytest.mark.parametrize("header", TRUNCATABLE)
def test_every_strict_prefix_needs_more(header: bytes) -> None:
    for cut in range(len(header)):
        assert parse(header[:cut]) == NeedMore(), (header, cut)


def test_empty_input_needs_more() -> None:
    assert isinstance(parse(b""), NeedMore)


# ----------------------------------------------------------------- properties


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int] | None]:
    port = st.integers(min_value=0, max_value=65535)
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    if kind in ("v1-4", "v2-4"):
        source = draw(st.ip_addresses(v=4))
        destination = draw(st.ip_addresses(v=4))
    else:
        source = draw(st.ip_addresses(v=6))
        destination = draw(st.ip_addresses(v=6))
    sport, dport = draw(port), draw(port)
    expected_ip = str(source)
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        expected_ip = str(source.ipv4_mapped)
    if kind.startswith("v1-") and kind != "v1-unknown":
        protocol = "TCP4" if kind == "v1-4" else "TCP6"
        line = f"PROXY {protocol} {source} {destination} {sport} {dport}\r\n".encode()
        return line, (expected_ip, sport)
    if kind == "v1-unknown":
        junk = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
        return b"PROXY UNKNOWN" + (b" " + junk.encode() if junk else b"") + b"\r\n", None
    ports = struct.pack("!HH", sport, dport)
    tlvs = b"".join(
        tlv(kind_byte, value)
        for kind_byte, value in draw(
            st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=60)), max_size=5)
        )
    )
    addresses = source.packed + destination.packed + ports
    if kind == "v2-local":
        return v2(command=0x20, family=0x00, addresses=b"", tlvs=tlvs), None
    family = 0x11 if kind == "v2-4" else 0x21
    return v2(family=family, addresses=addresses, tlvs=tlvs), (expected_ip, sport)


@FAST
@given(case=valid_headers(), rest=st.binary(max_size=200), cut=st.integers(min_value=0))
def test_valid_header_any_rest_any_cut(
    case: tuple[bytes, tuple[str, int] | None], rest: bytes, cut: int
) -> None:
    header, source = case
    result = parse(header + rest)
    assert isinstance(result, Header)
    assert result.source == source
    assert result.consumed == len(header)
    assert result.rest == rest
    assert parse(header[: cut % len(header)]) == NeedMore()


@FAST
@given(data=st.binary(max_size=300))
def test_any_bytes_never_raise(data: bytes) -> None:
    result = parse(data)
    if isinstance(result, NeedMore):
        assert len(data) < MAX_HEADER
    elif isinstance(result, Header):
        assert result.consumed <= min(len(data), MAX_HEADER)
        assert result.rest == data[result.consumed :]


@FAST
@given(data=st.binary(max_size=120))
def test_signature_then_anything_never_raises(data: bytes) -> None:
    for prefix in (b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"):
        result = parse(prefix + data)
        assert isinstance(result, NeedMore | Header | Malformed)
        if isinstance(result, NeedMore):
            assert len(prefix + data) < MAX_HEADER


def test_need_more_never_exceeds_v1_limit() -> None:
    assert isinstance(parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15)), NeedMore)
    assert isinstance(parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14)), Malformed)
