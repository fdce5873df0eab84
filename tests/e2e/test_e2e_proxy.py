"""PROXY protocol listeners (``proxy_protocol = true``), over real sockets and real TLS.

The test plays the load balancer: it connects from 127.0.0.1 (trusted) and
sends a v1 or v2 header naming another client, then speaks SMTP (STARTTLS) or
TLS (implicit). What the rest of the server sees is the header's address: the
message log, the Received field, the connect event, the per-IP connection
limit. Untrusted peers, malformed and truncated headers and silence are closed
before any banner, and logged as ``proxy.refused``. A header sent to a listener
without ``proxy_protocol`` closes the connection there (421, ``not_expected``).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import time

import pytest

from .helpers import (
    ALICE,
    HOST,
    TLS_NAME,
    RawSMTP,
    Server,
    ServerPool,
    TomlValue,
    header_fields,
    make_message,
)

TRUSTED = ["127.0.0.1/32"]
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_TIMEOUT = 2.0  # the servers' command_timeout: the header must come within it


def v1(source: str, port: int = 40001) -> bytes:
    protocol = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if ":" in source else HOST
    return f"PROXY {protocol} {source} {destination} {port} 587\r\n".encode()


def v2(source: str, port: int = 40002, tlvs: bytes = b"") -> bytes:
    address = ipaddress.ip_address(source)
    destination = ipaddress.ip_address("::1" if address.version == 6 else HOST)
    family = 0x21 if address.version == 6 else 0x11
    body = address.packed + destination.packed + struct.pack("!HH", port, 587) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


@pytest.fixture(scope="module")
def proxied(servers: ServerPool) -> Server:
    return servers.create(
        "proxied",
        users=[ALICE],
        limits={"command_timeout": HEADER_TIMEOUT},
        proxy_trusted=TRUSTED,
    )


def connect(server: Server, header: bytes, *, implicit: bool, login: bool = True) -> RawSMTP:
    port = server.implicit_port if implicit else server.starttls_port
    context = server.client_context()
    client = RawSMTP.connect(port, tls=context if implicit else None, proxy_header=header)
    try:
        assert client.greeting.code == 220, str(client.greeting)
        client.ehlo()
        if not implicit:
            client.starttls(context)
            client.ehlo()
        if login:
            client.login(ALICE.address, ALICE.password)
    except BaseException:
        client.close()
        raise
    return client


def send_one(client: RawSMTP, subject: str) -> str:
    message = make_message(from_addr=ALICE.address, to=["someone@example.net"], subject=subject)
    return client.send_mail(ALICE.address, ["someone@example.net"], message)


def closed_without_banner(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sent before it closed (a reset counts as closed)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def raw_connection(server: Server, *, implicit: bool = False) -> socket.socket:
    port = server.implicit_port if implicit else server.starttls_port
    return socket.create_connection((HOST, port), timeout=5.0)


def refusal(server: Server, since: int, reason: str) -> dict[str, str]:
    return server.wait_for_event("proxy.refused", lambda e: e["reason"] == reason, since=since)


# ------------------------------------------------------------------ the header's client


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
@pytest.mark.parametrize(
    ("version", "client_ip"),
    [(1, "192.0.2.11"), (2, "198.51.100.12"), (1, "2001:db8::13"), (2, "2001:db8::14")],
)
def test_header_address_is_the_client(
    proxied: Server, version: int, client_ip: str, implicit: bool
) -> None:
    header = v1(client_ip) if version == 1 else v2(client_ip, tlvs=b"\x04\x00\x03abc")
    subject = f"proxied v{version} {client_ip} {'implicit' if implicit else 'starttls'}"
    mark = proxied.log_mark()
    with connect(proxied, header, implicit=implicit) as client:
        queue_id = send_one(client, subject)
        assert client.tls_version is not None
    entry = proxied.message(queue_id)
    assert entry["client_ip"] == client_ip, entry
    assert entry["subject"] == subject
    name, received = header_fields(proxied.raw(queue_id))[0]
    assert name == "Received"
    literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    assert literal in received, received
    accepted = proxied.wait_for_event(
        "message.accepted", lambda e: e["queue_id"] == queue_id, since=mark
    )
    assert accepted["client_ip"] == client_ip
    connects = [
        e for e in proxied.log_events("connect", since=mark) if e["session"] == accepted["session"]
    ]
    assert len(connects) == 1, connects
    assert connects[0]["client_ip"] == client_ip
    assert connects[0]["proxy"] == HOST
    if implicit:
        assert connects[0]["tls"].startswith("TLSv1.")


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
@pytest.mark.parametrize("header", [V2_LOCAL, b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
def test_local_and_unknown_keep_the_real_peer(
    proxied: Server, header: bytes, implicit: bool
) -> None:
    with connect(proxied, header, implicit=implicit) as client:
        queue_id = send_one(client, f"local {header[:6]!r} {implicit}")
    assert proxied.message(queue_id)["client_ip"] == HOST


def test_smtp_pipelined_behind_the_header_is_kept(proxied: Server) -> None:
    """The header and the first command in one segment: the command is not lost."""
    with raw_connection(proxied) as sock:
        sock.sendall(v1("192.0.2.21") + b"EHLO pipelined.test\r\n")
        client = RawSMTP(sock)
        assert client.reply().code == 220
        ehlo = client.reply()
        assert ehlo.code == 250 and "STARTTLS" in str(ehlo), str(ehlo)


def test_client_hello_right_behind_the_header(proxied: Server) -> None:
    """Implicit TLS: the ClientHello in the same write as the header still shakes hands."""
    context = proxied.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=TLS_NAME)
    with raw_connection(proxied, implicit=True) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(v2("192.0.2.22") + outgoing.read())
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "no TLS handshake"
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
        sock.sendall(outgoing.read())
        banner = b""
        while b"\r\n" not in banner:
            try:
                banner += tls.read(1024)
            except ssl.SSLWantReadError:
                chunk = sock.recv(65536)
                assert chunk, "closed before the banner"
                incoming.write(chunk)
        assert banner.startswith(b"220 "), banner


# ------------------------------------------------------------------ per-IP limits


def test_connection_limit_counts_the_header_address(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create(
        "limited",
        proxy_trusted=TRUSTED,
        sections={
            "connection_limits": {"per_ip_concurrent": 1, "per_ip_per_minute": 0, "exempt": []}
        },
    )
    context = server.client_context()
    first = RawSMTP.connect(server.starttls_port, proxy_header=v1("192.0.2.31"))
    try:
        assert first.greeting.code == 220
        # Same balancer, same client: over the limit (on both listeners).
        with RawSMTP.connect(server.starttls_port, proxy_header=v2("192.0.2.31")) as again:
            assert again.greeting.status == "421 4.7.0", str(again.greeting)
        with RawSMTP.connect(
            server.implicit_port, tls=context, proxy_header=v1("192.0.2.31")
        ) as again:
            assert again.greeting.status == "421 4.7.0", str(again.greeting)
        # Same balancer, another client: counted on its own.
        with RawSMTP.connect(server.starttls_port, proxy_header=v2("192.0.2.32")) as other:
            assert other.greeting.code == 220, str(other.greeting)
    finally:
        first.close()
    refused = server.log_events("connect.refused")
    assert refused and {(e["client_ip"], e["proxy"], e["reason"]) for e in refused} == {
        ("192.0.2.31", HOST, "ip_concurrent")
    }


# ------------------------------------------------------------------ refusals


def test_untrusted_peer_is_closed_without_banner(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("untrusted", users=[ALICE], proxy_trusted=["10.0.0.0/8"])
    for implicit in (False, True):
        mark = server.log_mark()
        with raw_connection(server, implicit=implicit) as sock:
            sock.sendall(v1("192.0.2.41"))  # a client pretending to be someone else
            assert closed_without_banner(sock) == b""
        event = refusal(server, mark, "untrusted")
        assert event["peer"] == HOST
        assert event["session"]
        assert not server.log_events("connect", since=mark)
    assert all(m["client_ip"] != "192.0.2.41" for m in server.messages())


MALFORMED = [
    (b"EHLO client.test\r\n", "no PROXY signature"),
    (b"\x16\x03\x01\x00\x05hello", "no PROXY signature"),
    (b"PROXY TCP4 192.0.2.300 127.0.0.1 1 2\r\n", "v1: invalid IPv4 address"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 port 2\r\n", "v1: invalid port"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\n", "v1: bare CR or LF"),
    (b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n", "v1: header longer than 107 bytes"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "v2: bad version or command"),
    (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "v2: length too short for the address family"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(12), "v2: header longer than allowed"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "v2: datagram transport on a stream listener"),
]


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
@pytest.mark.parametrize(("data", "detail"), MALFORMED, ids=[d for _, d in MALFORMED])
def test_malformed_header_is_closed(
    proxied: Server, data: bytes, detail: str, implicit: bool
) -> None:
    mark = proxied.log_mark()
    with raw_connection(proxied, implicit=implicit) as sock:
        sock.sendall(data)
        assert closed_without_banner(sock) == b""
    event = refusal(proxied, mark, "malformed")
    assert event["detail"] == detail
    assert event["peer"] == HOST
    assert not proxied.log_events("connect", since=mark)


@pytest.mark.parametrize("header", [v1("192.0.2.51"), v2("2001:db8::51")], ids=["v1", "v2"])
def test_truncated_header_is_closed(proxied: Server, header: bytes) -> None:
    mark = proxied.log_mark()
    with raw_connection(proxied) as sock:
        sock.sendall(header[: len(header) // 2])
        sock.shutdown(socket.SHUT_WR)
        assert closed_without_banner(sock) == b""
    refusal(proxied, mark, "truncated")


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 192.0.2.61", V2_SIGNATURE])
def test_header_must_come_in_time(proxied: Server, sent: bytes) -> None:
    mark = proxied.log_mark()
    with raw_connection(proxied, implicit=True) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        assert closed_without_banner(sock, timeout=HEADER_TIMEOUT + 5) == b""
        waited = time.monotonic() - started
    assert HEADER_TIMEOUT - 0.5 <= waited <= HEADER_TIMEOUT + 3, waited
    refusal(proxied, mark, "timeout")


def test_server_still_serves_after_refusals(proxied: Server) -> None:
    with connect(proxied, v2("192.0.2.71"), implicit=False) as client:
        queue_id = send_one(client, "after refusals")
    assert proxied.message(queue_id)["client_ip"] == "192.0.2.71"
    assert not proxied.log_events("internal.error")


# ------------------------------------------------------------------ without proxy_protocol


@pytest.mark.parametrize("header", [v1("192.0.2.81"), v2("192.0.2.82")], ids=["v1", "v2"])
def test_header_on_a_plain_listener_closes_the_connection(server: Server, header: bytes) -> None:
    """No proxy_protocol: the header is not believed and never read as SMTP."""
    mark = server.log_mark()
    with RawSMTP.connect(server.starttls_port) as client:
        assert client.greeting.code == 220
        client.send(header + b"NOOP\r\n")
        reply = client.reply(timeout=5.0)
        if not header.startswith(b"PROXY"):  # v2 opens with two empty lines: 500 each
            assert [reply.code, client.reply(timeout=5.0).code] == [500, 500]
            reply = client.reply(timeout=5.0)
        assert reply.status == "421 4.7.0", str(reply)
        assert "without proxy_protocol" in reply.text
        assert client.wait_closed(5)  # the NOOP behind it is never answered
    refused = server.wait_for_event("proxy.refused", since=mark)
    assert refused["reason"] == "not_expected"
    assert refused["peer"] == HOST
    events = server.log_events(since=mark)
    assert not [e for e in events if e["event"] == "internal.error"], events
    assert all(e.get("client_ip") in (None, HOST) for e in events), events
    with RawSMTP.connect(server.starttls_port) as again:
        assert again.greeting.code == 220


# ------------------------------------------------------------------ login throttles

# The rest of the failure rules stay off (tests/e2e/helpers.py RELAXED_SECTIONS).
THROTTLE_RULES: dict[str, TomlValue] = {"ip_per_minute": 3}


def test_login_throttles_count_the_header_address_not_the_balancer(
    fresh_servers: ServerPool,
) -> None:
    """Every client arrives from the balancer's 127.0.0.1: the failure windows must
    be kept per header address, or one guesser would lock everyone out."""
    server = fresh_servers.create(
        "proxy-throttle",
        users=[ALICE],
        sections={"auth_throttle": THROTTLE_RULES},
        proxy_trusted=TRUSTED,
    )
    guesser = v1("198.51.100.7")
    statuses = []
    for n in range(5):
        with connect(server, guesser, implicit=True, login=False) as client:
            statuses.append(client.auth_plain(ALICE.address, f"wrong-{n}").status)
    assert statuses == ["535 5.7.8"] * 3 + ["454 4.7.0"] * 2, statuses
    # Another client behind the same balancer is not throttled...
    with connect(server, v2("203.0.113.9"), implicit=True, login=False) as client:
        assert client.auth_plain(ALICE.address, ALICE.password).code == 235
    # ...while the guesser's address still is, even with the right password.
    with connect(server, guesser, implicit=True, login=False) as client:
        assert client.auth_plain(ALICE.address, ALICE.password).status == "454 4.7.0"
    refused = server.log_events("auth.throttled")
    assert refused and all(e["client_ip"] == "198.51.100.7" for e in refused), refused
