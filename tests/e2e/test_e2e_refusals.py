"""Every refusal as a client sees it over a real socket: reply code AND enhanced code.

Also the attacks the protocol core must resist over real TLS (SMTP smuggling,
STARTTLS command injection), BDAT byte-exactness, and the limits. The last
test checks that the shared server still serves normally after all of this.
"""

from __future__ import annotations

import socket
import time

import pytest

from .helpers import (
    ALICE,
    BOB,
    CAROL,
    RawSMTP,
    Reply,
    Server,
    ServerPool,
    SMTPClosed,
    User,
    auth_mechanisms,
    b64,
    check_stored,
    make_message,
    queue_id_of,
    session,
    wait_until,
)

RCPT = "rcpt@example.net"
NOBODY = User("nobody@example.com", "Nobody-pw-2Gh7sLq0")


def _refused(reply: Reply, status: str, text: str | None = None) -> None:
    assert reply.status == status, str(reply)
    if text is not None:
        assert reply.text == text, str(reply)


# ------------------------------------------------------------------ before TLS / AUTH


def test_plaintext_on_starttls_port_needs_starttls_first(server: Server) -> None:
    with RawSMTP.connect(server.starttls_port) as client:
        ehlo = client.ehlo()
        assert "STARTTLS" in ehlo.lines
        assert auth_mechanisms(ehlo) == set(), ehlo
        must = "Must issue a STARTTLS command first"
        _refused(client.command(f"MAIL FROM:<{ALICE.address}>"), "530 5.7.0", must)
        _refused(client.command(f"RCPT TO:<{RCPT}>"), "530 5.7.0", must)
        _refused(client.command("DATA"), "530 5.7.0", must)
        _refused(client.auth_plain(ALICE.address, ALICE.password), "538 5.7.11")
        _refused(client.command("AUTH LOGIN"), "538 5.7.11")
        assert client.command("NOOP").status == "250 2.0.0"  # still usable


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])
def test_mail_rcpt_data_need_auth(server: Server, implicit: bool) -> None:
    with session(server, implicit=implicit) as client:
        assert {"PLAIN", "LOGIN"} <= auth_mechanisms(client.ehlo())
        required = "Authentication required"
        _refused(client.command(f"MAIL FROM:<{ALICE.address}>"), "530 5.7.0", required)
        _refused(client.command(f"RCPT TO:<{RCPT}>"), "530 5.7.0", required)
        _refused(client.command("DATA"), "530 5.7.0", required)
        client.login(ALICE.address, ALICE.password)  # and then it works
        client.transaction(ALICE.address, [RCPT])
    # BDAT before login: refused too, and the connection closed (no chunk is read:
    # test_e2e_large_messages.py).
    with session(server, implicit=implicit) as client:
        client.send(b"BDAT 5 LAST\r\nhello")
        _refused(client.reply(), "530 5.7.0", required)
        assert client.wait_closed(5)


# ------------------------------------------------------------------ authentication


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize(
    "who",
    [
        (ALICE.address, "wrong-password-Zq81"),
        (NOBODY.address, NOBODY.password),
        (CAROL.address, CAROL.password),
    ],
    ids=["wrong-password", "unknown-user", "disabled-account"],
)
def test_auth_failures_look_the_same(server: Server, mechanism: str, who: tuple[str, str]) -> None:
    user, password = who
    with session(server) as client:
        if mechanism == "PLAIN":
            reply = client.auth_plain(user, password)
        else:
            reply = client.auth_login(user, password)
        _refused(reply, "535 5.7.8", "Authentication credentials invalid")
        # Still not logged in, but the session goes on.
        _refused(client.command(f"MAIL FROM:<{user}>"), "530 5.7.0")
        if user == ALICE.address:
            client.login(ALICE.address, ALICE.password)


def test_bad_base64(server: Server) -> None:
    with session(server) as client:
        _refused(client.command("AUTH PLAIN %%%not-base64%%%"), "501 5.5.2")
        assert client.command("AUTH LOGIN").code == 334
        _refused(client.command("!!!!"), "501 5.5.2")
        assert client.command("AUTH PLAIN").code == 334
        _refused(client.command("AGFsaWNl=QAB"), "501 5.5.2")  # padding in the middle
        client.login(ALICE.address, ALICE.password)


# ------------------------------------------------------------------ sender binding


def test_mail_from_not_allowed(server: Server) -> None:
    with session(server, user=ALICE) as client:
        reply = client.command(f"MAIL FROM:<{BOB.address}>")
        _refused(reply, "553 5.7.1")
        assert BOB.address in reply.text
        _refused(client.command("MAIL FROM:<>"), "553 5.7.1")
        _refused(client.command("MAIL FROM:<alice@example.com.evil.test>"), "553 5.7.1")
        assert client.command(f"MAIL FROM:<{ALICE.address.upper()}>").status == "250 2.1.0"


def test_domain_pattern(server: Server) -> None:
    with session(server, user=BOB) as client:
        _refused(client.command("MAIL FROM:<someone@sub.example.org>"), "553 5.7.1")
        _refused(client.command("MAIL FROM:<>"), "553 5.7.1")
        assert client.command("MAIL FROM:<someone@example.org>").status == "250 2.1.0"
        assert client.command("RSET").status == "250 2.0.0"
        assert client.command("MAIL FROM:<bob@alias.test>").status == "250 2.1.0"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (["From: Bob <bob@example.org>"], "550 5.7.1"),
        (["From: alice@example.com", "From: alice@example.com"], "550 5.6.0"),
        (["From: alice@example.com", "Sender: bob@example.org"], "550 5.7.1"),
        (["From: alice@example.com, bob@example.org"], "550 5.7.1"),
        (["Subject-only: no from at all"], "550 5.6.0"),
    ],
    ids=["foreign-from", "two-from", "foreign-sender", "from-list", "no-from"],
)
def test_header_sender_refused_at_end_of_data(
    server: Server, headers: list[str], status: str
) -> None:
    subject = f"refused header {status} {len(headers)} {headers[-1]}"
    message = ("\r\n".join([*headers, f"Subject: {subject}"]) + "\r\n\r\nbody\r\n").encode()
    with session(server, user=ALICE) as client:
        client.transaction(ALICE.address, [RCPT])
        _refused(client.data(message), status)
        # The transaction is over, the session is not.
        assert client.command("NOOP").status == "250 2.0.0"
        good = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject + " (good)")
        client.send_mail(ALICE.address, [RCPT], good)
    subjects = server.subjects()
    assert subject not in subjects
    assert subject + " (good)" in subjects


# ------------------------------------------------------------------ limits


def test_size_parameter_too_big(server: Server) -> None:
    with session(server, user=ALICE) as client:
        _refused(client.command(f"MAIL FROM:<{ALICE.address}> SIZE=10001"), "552 5.3.4")
        assert client.command(f"MAIL FROM:<{ALICE.address}> SIZE=10000").status == "250 2.1.0"


def test_data_too_big(server: Server) -> None:
    subject = "too big for DATA"
    body = ("z" * 98 + "\r\n") * 120  # 12 kB, over max_message_size = 10000
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject, body=body)
    with session(server, user=ALICE) as client:
        client.transaction(ALICE.address, [RCPT])
        _refused(client.data(message), "552 5.3.4")
        assert client.command("NOOP").status == "250 2.0.0"
        client.send_mail(
            ALICE.address, [RCPT], make_message(from_addr=ALICE.address, to=[RCPT], subject="ok")
        )
    assert subject not in server.subjects()


def _sized_message(subject: str, size: int) -> bytes:
    """A message of exactly ``size`` octets: lines of 100 octets with CRLF, no dots."""
    head = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject, body="")
    full, tail = divmod(size - len(head), 100)
    if tail == 1:  # a line needs at least its CRLF
        full, tail = full - 1, tail + 100
    message = head + (b"f" * 98 + b"\r\n") * full
    if tail:
        message += b"g" * (tail - 2) + b"\r\n"
    assert len(message) == size, len(message)
    return message


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_size_limit_is_exact(server: Server, command: str) -> None:
    """max_message_size = 10000: a 10000-octet message passes, 10001 octets do not."""
    fits = _sized_message(f"exactly at the limit, {command}", 10000)
    over = _sized_message(f"one octet over, {command}", 10001)
    with session(server, user=ALICE) as client:
        for message, status in ((fits, "250 2.0.0"), (over, "552 5.3.4")):
            client.transaction(ALICE.address, [RCPT])
            if command == "DATA":
                reply = client.data(message)
            else:
                client.send(f"BDAT {len(message)} LAST\r\n".encode() + message)
                reply = client.reply()
            assert reply.status == status, (len(message), str(reply))
            if status.startswith("250"):
                assert server.raw(queue_id_of(reply.text)).endswith(message)
    subjects = server.subjects()
    assert f"exactly at the limit, {command}" in subjects
    assert f"one octet over, {command}" not in subjects


def test_end_of_data_split_across_reads(server: Server) -> None:
    """The terminator is found wherever the TLS records cut it; dots are unstuffed."""
    with session(server, user=ALICE) as client:
        for cut in range(1, 5):
            subject = f"terminator cut at {cut}"
            message = make_message(
                from_addr=ALICE.address,
                to=[RCPT],
                subject=subject,
                body=".leading dot\r\n..two dots\r\n.\r\nlast line\r\n",
            )
            client.transaction(ALICE.address, [RCPT])
            assert client.command("DATA").code == 354
            stuffed = message.replace(b"\r\n.", b"\r\n..")
            wire = stuffed + b".\r\n"
            split = len(wire) - 5 + cut  # inside the final CRLF.CRLF
            client.send(wire[:split])
            time.sleep(0.05)
            assert client.pending(0.05) == b""  # not ended yet
            client.send(wire[split:])
            reply = client.reply()
            assert reply.status == "250 2.0.0", (cut, str(reply))
            assert server.raw(queue_id_of(reply.text)).endswith(message)


def test_bdat_too_big(server: Server) -> None:
    subject = "too big for BDAT"
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
    message += b"z" * 11000
    with session(server, user=ALICE) as client:
        client.transaction(ALICE.address, [RCPT])
        client.send(f"BDAT {len(message)} LAST\r\n".encode() + message)
        _refused(client.reply(), "552 5.3.4")
        assert client.wait_closed(5)  # rather than read what could be gigabytes
    assert subject not in server.subjects()


def test_too_many_recipients(server: Server) -> None:
    subject = "three recipients"
    rcpts = ["r1@example.net", "r2@example.net", "r3@example.net"]
    with session(server, user=ALICE) as client:
        client.transaction(ALICE.address, rcpts)
        _refused(client.command("RCPT TO:<r4@example.net>"), "452 4.5.3")
        reply = client.data(make_message(from_addr=ALICE.address, to=rcpts, subject=subject))
        assert reply.status == "250 2.0.0", str(reply)
    check_stored(
        server,
        queue_id_of(reply.text),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=rcpts,
        subject=subject,
    )


def test_command_line_too_long(server: Server) -> None:
    with session(server) as client:
        # 1000 octets with the CRLF is the limit (RFC 5321 4.5.3.1.4)...
        assert client.command("NOOP " + "x" * 993).status == "250 2.0.0"
        # ...one more is too long.
        _refused(client.command("NOOP " + "x" * 994), "500 5.5.2", "Line too long")
        _refused(client.command("NOOP " + "x" * 5000), "500 5.5.2", "Line too long")
        assert client.command("NOOP").status == "250 2.0.0"
        assert client.pending() == b""


def test_too_many_bad_commands(server: Server) -> None:
    """limits.max_bad_commands (default 10): the 10th bad command ends the session."""
    with session(server) as client:
        for _ in range(9):
            _refused(client.command("XYZZY"), "500 5.5.2", "Command unrecognized")
            assert client.command("NOOP").status == "250 2.0.0"  # good ones do not count
        _refused(client.command("XYZZY"), "500 5.5.2")
        closing = client.reply()
        assert closing.code == 421, str(closing)
        assert closing.enhanced == "4.7.0", str(closing)
        assert client.wait_closed(5)


@pytest.fixture(scope="module")
def idle_server(servers: ServerPool) -> Server:
    return servers.create("idle", limits={"idle_timeout": 1}, users=[ALICE])


def test_idle_timeout(idle_server: Server) -> None:
    """idle_timeout = 1: plaintext, STARTTLS and authenticated TLS sessions all get 421 4.4.2."""
    context = idle_server.client_context()
    plain = RawSMTP.connect(idle_server.starttls_port)
    upgraded = RawSMTP.connect(idle_server.starttls_port)
    implicit = RawSMTP.connect(idle_server.implicit_port, tls=context)
    clients = {"plain": plain, "starttls": upgraded, "implicit-authenticated": implicit}
    try:
        plain.ehlo()
        upgraded.ehlo()
        upgraded.starttls(context)
        implicit.ehlo()
        implicit.login(ALICE.address, ALICE.password)
        started = time.monotonic()
        for name, client in clients.items():
            reply = client.reply(timeout=5)
            assert reply.status == "421 4.4.2", f"{name}: {reply}"
            assert reply.text == "Timeout, closing connection"
            assert client.wait_closed(5), name
        waited = time.monotonic() - started
    finally:
        for client in clients.values():
            client.close()
    assert waited <= 4.5, waited


@pytest.fixture(scope="module")
def small_server(servers: ServerPool) -> Server:
    return servers.create("small", limits={"max_connections": 2}, users=[ALICE])


def test_max_connections(small_server: Server) -> None:
    context = small_server.client_context()
    first = RawSMTP.connect(small_server.implicit_port, tls=context)
    second = RawSMTP.connect(small_server.starttls_port)
    try:
        with RawSMTP.connect(small_server.implicit_port, tls=context) as third:
            assert third.greeting.status == "421 4.3.2", str(third.greeting)
            assert third.wait_closed(5)
        assert first.command("NOOP").status == "250 2.0.0"
        assert second.command("NOOP").status == "250 2.0.0"
    finally:
        first.close()
        second.close()
    # Once they are gone there is room again.
    wait_until(lambda: _greets_220(small_server), 5, 0.05, "a free connection slot")


def _greets_220(server: Server) -> bool:
    with RawSMTP.connect(server.starttls_port) as client:
        return client.greeting.code == 220


# ------------------------------------------------------------------ attacks


SMUGGLING_ENDS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n..\n"]


@pytest.mark.parametrize("fake_end", SMUGGLING_ENDS, ids=repr)
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])
def test_smuggling_is_refused_whole(server: Server, fake_end: bytes, implicit: bool) -> None:
    subject = f"smuggle carrier {fake_end!r} {implicit}"
    smuggled_subject = f"smuggled {fake_end!r} {implicit}"
    data = (
        f"From: {ALICE.address}\r\nSubject: {subject}\r\n\r\nhello".encode()
        + fake_end
        + f"MAIL FROM:<{ALICE.address}>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        f"From: {ALICE.address}\r\nSubject: {smuggled_subject}\r\n\r\nevil\r\n".encode()
        + b".\r\n"
    )
    with session(server, implicit=implicit, user=ALICE) as client:
        client.transaction(ALICE.address, [RCPT])
        assert client.command("DATA").code == 354
        client.send(data)
        reply = client.reply()
        assert reply.status == "550 5.5.2", str(reply)
        # Exactly one reply for the data: the next command gets its own reply
        # (a reply to a smuggled command would come first), and nothing follows.
        assert client.command("NOOP").status == "250 2.0.0"
        assert client.pending(0.2) == b""
        good_subject = f"after smuggle {fake_end!r} {implicit}"
        client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject=good_subject),
        )
    subjects = server.subjects()
    assert subject not in subjects
    assert smuggled_subject not in subjects
    assert good_subject in subjects


@pytest.mark.parametrize(
    "injected",
    [b"RSET\r\n", b"NOOP\r\nNOOP\r\n", b"EHLO evil.test\r\n", b"AUTH PLAIN " + b"A" * 8 + b"\r\n"],
    ids=["rset", "noop-noop", "ehlo", "auth"],
)
def test_starttls_injection_is_dropped(server: Server, injected: bytes) -> None:
    with RawSMTP.connect(server.starttls_port) as client:
        client.ehlo()
        client.send(b"STARTTLS\r\n" + injected)  # one write: the classic injection
        reply = client.reply()
        assert reply.status == "220 2.0.0", str(reply)
        assert client.pending(0.2) == b"", "a reply in plaintext after 220"
        client.sock = server.client_context().wrap_socket(client.sock, server_hostname="localhost")
        # The first reply over TLS is the one to our EHLO, not one to the injected command.
        ehlo = client.command("EHLO client.test")
        assert ehlo.code == 250, str(ehlo)
        assert ehlo.lines[0] == "localhost", str(ehlo)
        assert {"PLAIN", "LOGIN"} <= auth_mechanisms(ehlo)
        assert client.command("NOOP").status == "250 2.0.0"
        assert client.pending(0.2) == b""
        client.login(ALICE.address, ALICE.password)


def test_bdat_stores_exact_bytes(server: Server) -> None:
    subject = "bdat exact"
    head = (
        f"From: {ALICE.address}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
        "Date: Wed, 02 Jan 2030 03:04:05 +0000\r\nMessage-ID: <bdat.1@client.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode()
    chunks = [
        head,
        b"line one\r\n.\r\n.. two dots stay two\r\n",
        b".leading dot is kept\r\n\xc3\xa9t\xc3\xa9 8-bit\r\n" + b"x" * 3000 + b"\r\n",
        b"no final line break",
    ]
    payload = b"".join(chunks)
    with session(server, user=ALICE) as client:
        assert client.command(f"MAIL FROM:<{ALICE.address}> BODY=8BITMIME").code == 250
        assert client.command(f"RCPT TO:<{RCPT}>").code == 250
        for chunk in chunks:
            client.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
            reply = client.reply()
            assert reply.status == "250 2.0.0", str(reply)
            assert reply.text == f"{len(chunk)} octets received"
        client.send(b"BDAT 0 LAST\r\n")
        final = client.reply()
        assert final.status == "250 2.0.0", str(final)
    raw = check_stored(
        server,
        queue_id_of(final.text),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    assert raw.endswith(payload)
    prefix = raw[: len(raw) - len(payload)]
    assert prefix.startswith(b"Received: ")
    assert prefix.count(b"\r\n") == prefix.count(b"\r\n\t") + 1  # one (folded) field


def test_bdat_then_pipelined_commands(server: Server) -> None:
    """A chunk's bytes are never read as commands, even when they look like some."""
    subject = "bdat with commands inside"
    payload = (
        f"From: {ALICE.address}\r\nSubject: {subject}\r\n\r\n"
        f"RSET\r\nMAIL FROM:<{ALICE.address}>\r\nQUIT\r\n"
    ).encode()
    with session(server, user=ALICE) as client:
        client.send(
            f"MAIL FROM:<{ALICE.address}>\r\nRCPT TO:<{RCPT}>\r\n"
            f"BDAT {len(payload)} LAST\r\n".encode()
            + payload
            + b"NOOP\r\n"
        )
        assert client.reply().status == "250 2.1.0"
        assert client.reply().status == "250 2.1.5"
        final = client.reply()
        assert final.status == "250 2.0.0", str(final)
        assert client.reply().status == "250 2.0.0"  # the NOOP
        assert client.pending(0.3) == b""
    raw = server.raw(queue_id_of(final.text))
    assert raw.endswith(payload)


# ------------------------------------------------------------------ still serving


def test_server_still_serves_after_all_this(server: Server) -> None:
    subject = "still serving"
    with session(server, implicit=False, user=ALICE) as client:
        queue_id = client.send_mail(
            ALICE.address, [RCPT], make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
        )
    check_stored(
        server,
        queue_id,
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    assert server.process is not None and server.process.poll() is None
    assert b64("\0" + ALICE.address + "\0" + ALICE.password) not in server.log_text()


@pytest.fixture(scope="module")
def slow_client_server(servers: ServerPool) -> Server:
    # Idle timeout far away: only the command and data timeouts can fire.
    return servers.create(
        "slowloris",
        limits={
            "idle_timeout": 60,
            "command_timeout": 1.5,
            "data_timeout": 2.5,
            "tls_handshake_timeout": 1.5,
        },
        users=[ALICE],
    )


def _trickle(client: RawSMTP, data: bytes, seconds: float) -> Reply | None:
    """Send one byte every 0.2 s (so the idle timeout never fires) until a reply comes."""
    deadline = time.monotonic() + seconds
    for byte in data:
        if time.monotonic() > deadline:
            break
        try:
            client.send(bytes([byte]))
            return client.reply(timeout=0.2)
        except SMTPClosed:
            return None
        except TimeoutError:
            continue
    return None


def test_command_timeout_cuts_a_line_sent_byte_by_byte(slow_client_server: Server) -> None:
    """A command line still unfinished after command_timeout: 421 4.4.2, closed."""
    with RawSMTP.connect(slow_client_server.starttls_port) as client:
        started = time.monotonic()
        reply = _trickle(client, b"EHLO " + b"x" * 200, seconds=8)
        waited = time.monotonic() - started
        assert reply is not None
        assert reply.status == "421 4.4.2", str(reply)
        assert client.wait_closed(5)
    assert 1.4 <= waited <= 4.5, waited


def test_data_timeout_cuts_a_body_sent_byte_by_byte(slow_client_server: Server) -> None:
    """A message body still unfinished after data_timeout: 421 4.4.2, nothing stored."""
    context = slow_client_server.client_context()
    with RawSMTP.connect(slow_client_server.implicit_port, tls=context) as client:
        client.ehlo()
        client.login(ALICE.address, ALICE.password)
        assert client.command(f"MAIL FROM:<{ALICE.address}>").code == 250
        assert client.command("RCPT TO:<slow@example.net>").code == 250
        assert client.command("DATA").code == 354
        started = time.monotonic()
        body = b"Subject: slow data\r\n\r\n" + b"y" * 400
        reply = _trickle(client, body, seconds=10)
        waited = time.monotonic() - started
        assert reply is not None
        assert reply.status == "421 4.4.2", str(reply)
        assert client.wait_closed(5)
    # Each byte restarts neither timer: the whole body gets data_timeout, no more.
    assert 2.4 <= waited <= 5.5, waited
    assert "slow data" not in slow_client_server.subjects()


def test_silent_tls_handshake_is_cut_after_tls_handshake_timeout(
    slow_client_server: Server,
) -> None:
    """A client that connects to the implicit-TLS port and never says hello is dropped."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", slow_client_server.implicit_port), 10) as sock:
        sock.settimeout(8)
        try:
            data = sock.recv(1024)  # b"" when the server closes
        except ConnectionResetError:
            data = b""
    waited = time.monotonic() - started
    assert data == b""
    assert 1.2 <= waited <= 5, waited
