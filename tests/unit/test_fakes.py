"""The test doubles of the outside world work: ``fakes.SMTPSink`` (other
people's MX servers) against smtplib and a raw socket client, and
``fakes.FakeDNS`` (internet DNS) against dnspython's resolvers."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import dns.asyncresolver
import dns.message
import dns.nameserver
import dns.query
import dns.rdatatype
import dns.resolver
import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:  # `fakes` lives in tests/, beside unit/
    sys.path.insert(0, _TESTS_DIR)

from fakes import (  # noqa: E402
    FakeDNS,
    SMTPSink,
    make_tls_context,
    sinks_on_one_port,
)

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nbody\r\n"


# -- helpers -------------------------------------------------------------------


class RawClient:
    """A bare SMTP client: exact bytes out, reply lines in."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock: socket.socket = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), [text[4:] for text in lines]

    def command(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        assert self.command("STARTTLS")[0] == 220
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink("127.0.0.2") as running:
        yield running


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    return make_tls_context("mx.test", tmp_path)


@pytest.fixture
def fake_dns() -> Iterator[FakeDNS]:
    with FakeDNS() as running:
        yield running


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


# -- SMTPSink: plain -----------------------------------------------------------


def test_plain_delivery_is_recorded(sink: SMTPSink) -> None:
    assert sink.host == "127.0.0.2"
    assert sink.address == ("127.0.0.2", sink.port)
    with smtplib.SMTP(*sink.address, local_hostname="client.test", timeout=5) as smtp:
        smtp.ehlo()
        for extension in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "size"):
            assert smtp.has_extn(extension)
        assert not smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        refused = smtp.sendmail("a@example.test", ["b@example.test", "c@example.test"], MESSAGE)
        assert refused == {}
    [received] = sink.wait_for_messages(1)
    assert received.mail_from == "a@example.test"
    assert received.rcpt_to == ["b@example.test", "c@example.test"]
    assert received.data == MESSAGE
    assert received.tls is False
    assert received.tls_version is None
    assert received.auth_user is None
    assert received.helo == "client.test"
    assert received.esmtp is True
    assert received.peer.startswith("127.0.0.1:")
    assert received.mail_options == [f"size={len(MESSAGE)}"]
    assert received.reply.startswith("250 2.0.0 Ok: queued as ")
    assert received.message()["Subject"] == "hi"
    assert sink.connections == 1
    assert sink.commands() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    kinds = [event.kind for event in sink.events]
    assert kinds[0] == "connect"
    assert "message" in kinds


def test_null_sender_and_helo(sink: SMTPSink) -> None:
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        assert smtp.helo("old.test")[0] == 250
        assert smtp.mail("")[0] == 250
        assert smtp.rcpt("b@example.test")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
    [received] = sink.wait_for_messages(1)
    assert received.mail_from == ""
    assert received.esmtp is False
    assert received.helo == "old.test"


def test_dot_unstuffing_is_exact(sink: SMTPSink) -> None:
    body = (
        b"Subject: dots\r\n\r\n"
        b".\r\n"  # a lone dot line
        b"..two\r\n"
        b". space\r\n"
        b"mid.dle.\r\n"
        b"\xc3\xa9 8-bit \xff\r\n"
        b"\r\n"
        b"last line"  # no final CRLF: the client adds one
    )
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.sendmail("a@example.test", ["b@example.test"], body)
    [received] = sink.wait_for_messages(1)
    assert received.data == body + b"\r\n"

    client = RawClient(sink.address)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO raw.test")[0] == 250
        assert client.command("MAIL FROM:<a@example.test>")[0] == 250
        assert client.command("RCPT TO:<b@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"..\r\n...x\r\n.y\r\nz.\r\n\r\n.\r\n")
        assert client.reply()[0] == 250
    finally:
        client.close()
    received = sink.wait_for_messages(2)[1]
    assert received.data == b".\r\n..x\r\ny\r\nz.\r\n\r\n"


def test_pipelined_commands(sink: SMTPSink) -> None:
    sink.reject_recipient("Bad@Example.test", "550 5.1.1 No such user")
    client = RawClient(sink.address)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO raw.test")[0] == 250
        client.send(
            b"MAIL FROM:<a@example.test> BODY=8BITMIME\r\n"
            b"RCPT TO:<bad@example.test>\r\n"
            b"RCPT TO:<ok@example.test>\r\n"
            b"DATA\r\n"
        )
        codes = [client.reply()[0] for _ in range(4)]
        assert codes == [250, 550, 250, 354]
        client.send(b"x\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        codes = [client.reply()[0] for _ in range(4)]
        assert codes == [250, 250, 250, 221]
    finally:
        client.close()
    [received] = sink.wait_for_messages(1)
    assert received.rcpt_to == ["ok@example.test"]
    assert received.mail_options == ["BODY=8BITMIME"]


def test_protocol_errors(sink: SMTPSink) -> None:
    client = RawClient(sink.address)
    try:
        assert client.reply()[0] == 220
        assert client.command("MAIL FROM:<a@example.test>")[0] == 503  # no EHLO
        assert client.command("EHLO raw.test")[0] == 250
        assert client.command("RCPT TO:<b@example.test>")[0] == 503  # no MAIL
        assert client.command("DATA")[0] == 503
        assert client.command("MAIL FROM:a@example.test")[0] == 501
        assert client.command("MAIL FROM:<a@example.test> FOO=1")[0] == 555
        assert client.command("MAIL FROM:<a@example.test>")[0] == 250
        assert client.command("MAIL FROM:<a@example.test>")[0] == 503  # nested
        assert client.command("DATA")[0] == 554  # no recipient
        assert client.command("RCPT TO:<>")[0] == 501
        assert client.command("STARTTLS")[0] == 502  # no tls context
        assert client.command("AUTH PLAIN")[0] == 502
        assert client.command("XYZZY")[0] == 500
    finally:
        client.close()


def test_smtputf8(tmp_path: Path) -> None:
    with SMTPSink() as sink:
        client = RawClient(sink.address)
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO raw.test")[0] == 250
            assert client.command("MAIL FROM:<ü@example.test>")[0] == 553
            assert client.command("MAIL FROM:<ü@example.test> SMTPUTF8")[0] == 250
            assert client.command("RCPT TO:<é@example.test>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send("Subject: ü\r\n\r\nü\r\n.\r\n".encode())
            assert client.reply()[0] == 250
        finally:
            client.close()
        [received] = sink.wait_for_messages(1)
        assert received.mail_from == "ü@example.test"
        assert received.rcpt_to == ["é@example.test"]
        assert received.mail_options == ["SMTPUTF8"]
    with SMTPSink(extensions=["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]) as plain:
        client = RawClient(plain.address)
        try:
            assert client.reply()[0] == 220
            code, lines = client.command("EHLO raw.test")
            assert code == 250
            assert lines[1:] == ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
            assert client.command("MAIL FROM:<ü@example.test> SMTPUTF8")[0] == 555
        finally:
            client.close()


def test_connection_reuse_is_visible(sink: SMTPSink) -> None:
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        smtp.sendmail("a@example.test", ["c@example.test"], MESSAGE)
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.sendmail("a@example.test", ["d@example.test"], MESSAGE)
    first, second, third = sink.wait_for_messages(3)
    assert first.connection_id == second.connection_id
    assert third.connection_id != first.connection_id
    assert sink.connections == 2
    assert sink.commands(first.connection_id).count("MAIL") == 2
    sink.clear()
    assert sink.messages == []
    assert sink.connections == 0


def test_wait_for_messages_is_bounded(sink: SMTPSink) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="0 of 1 messages"):
        sink.wait_for_messages(1, timeout=0.2)
    assert time.monotonic() - started < 2


def test_dsn_parameters_when_advertised() -> None:
    with SMTPSink(extensions=["PIPELINING", "DSN", "SIZE"]) as sink:
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("dsn")
            smtp.sendmail(
                "a@example.test",
                ["b@example.test"],
                MESSAGE,
                mail_options=["RET=HDRS", "ENVID=X1"],
                rcpt_options=["NOTIFY=FAILURE,DELAY"],
            )
        [received] = sink.wait_for_messages(1)
        assert received.mail_options == [f"size={len(MESSAGE)}", "RET=HDRS", "ENVID=X1"]
        assert received.rcpt_options == [["NOTIFY=FAILURE,DELAY"]]


def test_idle_connection_times_out() -> None:
    with SMTPSink(command_timeout=0.3) as sink:
        client = RawClient(sink.address)
        try:
            assert client.reply()[0] == 220
            assert client.reply()[0] == 421  # after 0.3 s of silence
            assert client.file.readline() == b""
        finally:
            client.close()
        assert "timeout" in [event.kind for event in sink.events]


def test_aiosmtplib_with_starttls(tls_files: tuple[ssl.SSLContext, Path]) -> None:
    """The client library relaygate delivers with."""
    context, ca = tls_files
    with SMTPSink(tls=context, require_auth=("user", "pw")) as sink:

        async def deliver() -> None:
            client = aiosmtplib.SMTP(
                hostname=sink.host,
                port=sink.port,
                start_tls=True,
                tls_context=client_context(ca),
                timeout=5,
            )
            async with client:
                await client.login("user", "pw")
                await client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
                await client.sendmail("a@example.test", ["c@example.test"], MESSAGE)

        asyncio.run(deliver())
        first, second = sink.wait_for_messages(2)
        assert (first.tls, first.auth_user) == (True, "user")
        assert first.connection_id == second.connection_id
        assert first.data == MESSAGE


# -- SMTPSink: scripted behaviour ---------------------------------------------


def test_scripted_rcpt_replies_then_normal(sink: SMTPSink) -> None:
    sink.reply_to("RCPT", "450 4.2.0 Try later", times=2)
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.test")
        assert smtp.rcpt("b@example.test") == (450, b"4.2.0 Try later")
        assert smtp.rcpt("b@example.test")[0] == 450
        assert smtp.rcpt("b@example.test")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
    assert sink.wait_for_messages(1)[0].rcpt_to == ["b@example.test"]


def test_scripted_mail_data_and_data_end(sink: SMTPSink) -> None:
    sink.reply_to("MAIL", "451 4.3.0 Local problem")
    sink.reply_to("DATA", "554 5.7.1 Not now")
    sink.reply_to("DATA_END", "552 5.2.2 Mailbox full")
    sink.reply_to("DATA_END", "250 2.0.0 Ok: queued as XYZ")
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as sender_refused:
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        assert sender_refused.value.smtp_code == 451
        with pytest.raises(smtplib.SMTPDataError) as data_refused:
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        assert data_refused.value.smtp_code == 554
        smtp.rset()  # smtplib leaves the transaction open when DATA itself is refused
        with pytest.raises(smtplib.SMTPDataError) as end_refused:
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        assert end_refused.value.smtp_code == 552
        smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    [accepted] = sink.wait_for_messages(1)
    assert accepted.reply == "250 2.0.0 Ok: queued as XYZ"
    [rejected] = sink.rejected
    assert rejected.reply == "552 5.2.2 Mailbox full"
    assert rejected.data == MESSAGE


def test_scripted_banner_refusal(sink: SMTPSink) -> None:
    sink.reply_to("CONNECT", "554 5.3.2 No service here")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(*sink.address, timeout=5)
    assert refused.value.smtp_code == 554
    sink.reply_to("CONNECT", "421 4.3.2 Busy")
    with pytest.raises(smtplib.SMTPConnectError):
        smtplib.SMTP(*sink.address, timeout=5)
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:  # back to normal
        assert smtp.noop()[0] == 250


def test_scripted_ehlo_falls_back_to_helo(sink: SMTPSink) -> None:
    sink.reply_to("EHLO", "502 5.5.1 No ESMTP here")
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    assert sink.wait_for_messages(1)[0].esmtp is False


def test_scripted_ehlo_capabilities(sink: SMTPSink) -> None:
    sink.reply_to("EHLO", "250-mx.test\n250 SIZE 1000", times=None)
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.ehlo()
        assert set(smtp.esmtp_features) == {"size"}
        smtp.ehlo()
        assert set(smtp.esmtp_features) == {"size"}
    sink.reset_behaviour()
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("pipelining")


def test_421_closes_the_connection(sink: SMTPSink) -> None:
    sink.reply_to("RCPT", "421 4.3.0 Shutting down")
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.test")
        assert smtp.rcpt("b@example.test")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()


def test_max_recipients(sink: SMTPSink) -> None:
    sink.max_recipients = 2
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.test")
        assert [smtp.rcpt(f"{n}@example.test")[0] for n in range(3)] == [250, 250, 452]


def test_drop_during_data(sink: SMTPSink) -> None:
    sink.drop_during_data()
    big = MESSAGE + b"x" * 200_000 + b"\r\n"
    smtp = smtplib.SMTP(*sink.address, timeout=5)
    try:
        with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
            smtp.sendmail("a@example.test", ["b@example.test"], big)
    finally:
        smtp.close()
    assert "drop" in [event.kind for event in sink.events]
    assert sink.messages == []
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:  # only once
        smtp.sendmail("a@example.test", ["b@example.test"], big)
    assert sink.wait_for_messages(1)[0].data == big


def test_refused_connections(sink: SMTPSink) -> None:
    sink.refuse_connections(True)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        smtplib.SMTP(*sink.address, timeout=5)
    sink.wait_until(lambda: "refused" in [event.kind for event in sink.events], timeout=5)
    sink.refuse_connections(False)
    with smtplib.SMTP(*sink.address, timeout=5) as smtp:
        assert smtp.noop()[0] == 250
    assert sink.connections == 2


def test_delayed_reply_trips_client_timeout_and_stop_is_bounded() -> None:
    sink = SMTPSink().start()
    sink.delay_reply("MAIL", 30)
    smtp = smtplib.SMTP(*sink.address, timeout=0.3)
    smtp.ehlo()
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        smtp.mail("a@example.test")
    smtp.close()
    started = time.monotonic()
    sink.stop()  # cancels the sleeping session
    assert time.monotonic() - started < 3
    assert not sink.running


def test_restart_keeps_port_and_records() -> None:
    sink = SMTPSink("127.0.0.3").start()
    try:
        port = sink.port
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        sink.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.3", port), timeout=2)
        sink.start()
        assert sink.port == port
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        first, second = sink.wait_for_messages(2)
        assert first.connection_id != second.connection_id
    finally:
        sink.stop()


def test_sinks_on_one_port() -> None:
    sinks = sinks_on_one_port(["127.0.0.4", "127.0.0.5"])
    try:
        assert sinks[0].port == sinks[1].port
        for index, one in enumerate(sinks):
            with smtplib.SMTP(*one.address, timeout=5) as smtp:
                smtp.sendmail("a@example.test", [f"{index}@example.test"], MESSAGE)
        assert sinks[0].wait_for_messages(1)[0].rcpt_to == ["0@example.test"]
        assert sinks[1].wait_for_messages(1)[0].rcpt_to == ["1@example.test"]
    finally:
        for one in sinks:
            one.stop()


def test_sink_only_on_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        SMTPSink("192.0.2.1")
    with pytest.raises(ValueError):
        SMTPSink(implicit_tls=True)
    sink = SMTPSink()
    with pytest.raises(ValueError):
        sink.reply_to("RCPT", "nonsense")
    with pytest.raises(ValueError):
        sink.reply_to("BDAT", "250 ok")
    with pytest.raises(RuntimeError):
        _ = sink.port


# -- SMTPSink: TLS and AUTH ---------------------------------------------------


def test_starttls_with_trusted_certificate(tls_files: tuple[ssl.SSLContext, Path]) -> None:
    context, ca = tls_files
    with SMTPSink(tls=context) as sink:
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("starttls")
            smtp.starttls(context=client_context(ca))  # verifies 127.0.0.1 (in the SAN)
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [received] = sink.wait_for_messages(1)
        assert received.tls is True
        assert received.tls_version in ("TLSv1.2", "TLSv1.3")
        assert "tls" in [event.kind for event in sink.events]

        client = RawClient(sink.address)  # the certificate also names mx.test
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO raw.test")[0] == 250
            client.starttls(client_context(ca), server_hostname="mx.test")
            assert client.command("MAIL FROM:<a@example.test>")[0] == 503  # EHLO again first
            assert client.command("EHLO raw.test")[0] == 250
            assert client.command("STARTTLS")[0] == 503
        finally:
            client.close()


@pytest.mark.parametrize("case", ["untrusted", "wrong-name", "expired"])
def test_starttls_verification_failures(tmp_path: Path, case: str) -> None:
    if case == "expired":
        context, ca = make_tls_context("mx.test", tmp_path, expired=True)
    else:
        context, ca = make_tls_context("mx.test", tmp_path, ips=())
    client_side = ssl.create_default_context() if case == "untrusted" else client_context(ca)
    with SMTPSink(tls=context) as sink:
        client = RawClient(sink.address)
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO raw.test")[0] == 250
            name = "other.test" if case == "wrong-name" else "mx.test"
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(client_side, server_hostname=name)
        finally:
            client.close()
        sink.wait_until(lambda: "tls-failed" in [e.kind for e in sink.events], timeout=5)


def test_scripted_starttls_refusal(tls_files: tuple[ssl.SSLContext, Path]) -> None:
    context, ca = tls_files
    with SMTPSink(tls=context) as sink:
        sink.reply_to("STARTTLS", "454 4.7.0 TLS not available due to temporary reason")
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.ehlo()
            with pytest.raises(smtplib.SMTPResponseException) as refused:
                smtp.starttls(context=client_context(ca))
            assert refused.value.smtp_code == 454


def test_implicit_tls(tls_files: tuple[ssl.SSLContext, Path]) -> None:
    context, ca = tls_files
    with SMTPSink(tls=context, implicit_tls=True) as sink:
        with smtplib.SMTP_SSL(*sink.address, context=client_context(ca), timeout=5) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [received] = sink.wait_for_messages(1)
        assert received.tls is True
        assert received.tls_version is not None


@pytest.mark.parametrize(
    ("mechanism", "initial_response"),
    [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)],
)
def test_auth_required(mechanism: str, initial_response: bool) -> None:
    with SMTPSink(require_auth=("user", "s3cret")) as sink:
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.ehlo()
            assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
            assert refused.value.smtp_code == 530
            smtp.rset()
            smtp.user, smtp.password = "user", "wrong"
            authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                smtp.auth(mechanism, authobject, initial_response_ok=initial_response)
            assert failed.value.smtp_code == 535
            smtp.user, smtp.password = "user", "s3cret"
            code, _ = smtp.auth(mechanism, authobject, initial_response_ok=initial_response)
            assert code == 235
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [received] = sink.wait_for_messages(1)
        assert received.auth_user == "user"
        auth_lines = [e.text for e in sink.events if e.text.upper().startswith("AUTH")]
        assert all("s3cret" not in line and "czNjcmV0" not in line for line in auth_lines)


def test_auth_login_helper_and_cancel() -> None:
    with SMTPSink(require_auth=("user", "pw")) as sink:
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.login("user", "pw")  # smtplib's own choice of mechanism
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        client = RawClient(sink.address)
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO raw.test")[0] == 250
            assert client.command("AUTH PLAIN")[0] == 334
            assert client.command("*")[0] == 501
            assert client.command("AUTH CRAM-MD5")[0] == 504
            assert client.command("AUTH PLAIN !!!")[0] == 501
        finally:
            client.close()
        assert sink.wait_for_messages(1)[0].auth_user == "user"


def test_auth_only_after_starttls(tls_files: tuple[ssl.SSLContext, Path]) -> None:
    context, ca = tls_files
    with SMTPSink(tls=context, require_auth=("user", "pw"), auth_requires_tls=True) as sink:
        with smtplib.SMTP(*sink.address, timeout=5) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("auth")
            assert smtp.docmd("AUTH", "PLAIN AHVzZXIAcHc=")[0] == 538
            smtp.starttls(context=client_context(ca))
            smtp.ehlo()
            assert smtp.has_extn("auth")
            smtp.login("user", "pw")
            smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [received] = sink.wait_for_messages(1)
        assert (received.tls, received.auth_user) == (True, "user")


# -- FakeDNS -------------------------------------------------------------------


def test_documented_resolver_setup(fake_dns: FakeDNS) -> None:
    fake_dns.add_a("mx1.example.test", "127.0.0.2")
    assert fake_dns.address == f"127.0.0.1:{fake_dns.port}"

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = fake_dns.port
    resolver.lifetime = 2
    assert [r.to_text() for r in resolver.resolve("mx1.example.test", "A")] == ["127.0.0.2"]

    async def lookup() -> list[str]:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = fake_dns.port
        resolver.lifetime = 2
        answer = await resolver.resolve("mx1.example.test", "A")
        return [r.to_text() for r in answer]

    assert asyncio.run(lookup()) == ["127.0.0.2"]

    explicit = dns.resolver.Resolver(configure=False)  # as relaygate's [delivery] resolvers
    explicit.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", fake_dns.port)]
    explicit.lifetime = 2
    assert explicit.resolve("mx1.example.test", "A").rrset is not None
    assert fake_dns.queries == [("mx1.example.test", "A")] * 3


def test_mx_a_aaaa(fake_dns: FakeDNS) -> None:
    fake_dns.add_mx("Example.test", [(20, "mx2.example.test"), (10, "mx1.example.test")])
    fake_dns.add_mx("example.test", [(30, "mx3.example.test")])
    fake_dns.add_a("mx1.example.test", "127.0.0.2")
    fake_dns.add_a("mx1.example.test", "127.0.0.3")
    fake_dns.add_aaaa("mx1.example.test", "::1")
    resolver = fake_dns.resolver()

    answer = resolver.resolve("example.test", "MX")
    records = sorted((r.preference, r.exchange.to_text()) for r in answer)
    assert records == [
        (10, "mx1.example.test."),
        (20, "mx2.example.test."),
        (30, "mx3.example.test."),
    ]
    assert answer.rrset is not None and answer.rrset.ttl == 300
    assert sorted(r.to_text() for r in resolver.resolve("mx1.example.test", "A")) == [
        "127.0.0.2",
        "127.0.0.3",
    ]
    assert [r.to_text() for r in resolver.resolve("MX1.example.test", "AAAA")] == ["::1"]
    assert fake_dns.queries == [
        ("example.test", "MX"),
        ("mx1.example.test", "A"),
        ("mx1.example.test", "AAAA"),
    ]
    fake_dns.clear_queries()
    assert fake_dns.queries == []


def test_nxdomain_nodata_servfail(fake_dns: FakeDNS) -> None:
    fake_dns.add_a("host.sub.example.test", "127.0.0.2")
    fake_dns.servfail("broken.test")
    fake_dns.servfail("half.test", "MX")
    fake_dns.add_a("half.test", "127.0.0.9")
    resolver = fake_dns.resolver()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nowhere.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):  # the name exists, not the type
        resolver.resolve("host.sub.example.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):  # an empty non-terminal exists too
        resolver.resolve("sub.example.test", "A")
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        resolver.resolve("broken.test", "A")
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("half.test", "MX")
    assert resolver.resolve("half.test", "A").rrset is not None

    response = dns.query.udp(
        dns.message.make_query("nowhere.test", "A"), "127.0.0.1", timeout=2, port=fake_dns.port
    )
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.authority and response.authority[0].rdtype == dns.rdatatype.SOA

    fake_dns.remove("broken.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("broken.test", "A")


def test_null_mx(fake_dns: FakeDNS) -> None:
    fake_dns.add_mx("nomail.test", [(10, "mx.nomail.test")])
    fake_dns.null_mx("nomail.test")
    [record] = fake_dns.resolver().resolve("nomail.test", "MX")
    assert (record.preference, record.exchange) == (0, dns.name.root)


def test_txt_long_strings_are_chunked(fake_dns: FakeDNS) -> None:
    key = "v=DKIM1; k=rsa; p=" + "A" * 600
    fake_dns.add_txt("sel._domainkey.example.test", key)
    fake_dns.add_txt("example.test", "v=spf1 -all")
    resolver = fake_dns.resolver()
    [record] = resolver.resolve("sel._domainkey.example.test", "TXT")
    assert [len(s) for s in record.strings] == [255, 255, len(key) - 510]
    assert b"".join(record.strings).decode() == key
    [spf] = resolver.resolve("example.test", "TXT")
    assert spf.strings == (b"v=spf1 -all",)


def test_cname_is_followed(fake_dns: FakeDNS) -> None:
    fake_dns.add_cname("alias.example.test", "mx1.example.test")
    fake_dns.add_a("mx1.example.test", "127.0.0.2")
    answer = fake_dns.resolver().resolve("alias.example.test", "A")
    assert answer.canonical_name.to_text() == "mx1.example.test."
    assert [r.to_text() for r in answer] == ["127.0.0.2"]


def test_truncation_falls_back_to_tcp(fake_dns: FakeDNS) -> None:
    for n in range(40):
        fake_dns.add_txt("big.example.test", f"record {n:02d} " + "x" * 60)
    resolver = fake_dns.resolver()
    resolver.use_edns(0, 0, 512)
    answer = resolver.resolve("big.example.test", "TXT")
    assert len(answer) == 40
    assert fake_dns.queries == [("big.example.test", "TXT")] * 2  # UDP (TC), then TCP
    response = dns.query.tcp(
        dns.message.make_query("big.example.test", "TXT"), "127.0.0.1", 2, port=fake_dns.port
    )
    assert response.answer[0].rdtype == dns.rdatatype.TXT


def test_dropped_queries_time_out(fake_dns: FakeDNS) -> None:
    fake_dns.drop_queries("slow.test")
    resolver = fake_dns.resolver(lifetime=0.3)
    started = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        resolver.resolve("slow.test", "MX")
    assert time.monotonic() - started < 2


def test_async_resolver_mx_lookup(fake_dns: FakeDNS) -> None:
    fake_dns.add_mx("example.test", [(10, "mx1.example.test"), (5, "mx0.example.test")])
    fake_dns.add_a("mx0.example.test", "127.0.0.5")

    async def lookups() -> tuple[list[tuple[int, str]], list[str]]:
        resolver = fake_dns.async_resolver()
        mx = await resolver.resolve("example.test", "MX")
        a = await resolver.resolve("mx0.example.test", "A")
        with pytest.raises(dns.resolver.NoAnswer):
            await resolver.resolve("mx0.example.test", "AAAA")
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("mx1.example.test", "A")
        return sorted((r.preference, str(r.exchange)) for r in mx), [r.to_text() for r in a]

    assert asyncio.run(lookups()) == (
        [(5, "mx0.example.test."), (10, "mx1.example.test.")],
        ["127.0.0.5"],
    )


def test_dns_addresses_stay_on_loopback(fake_dns: FakeDNS) -> None:
    with pytest.raises(ValueError, match="loopback"):
        fake_dns.add_a("mx.example.test", "192.0.2.1")
    with pytest.raises(ValueError, match="loopback"):
        fake_dns.add_aaaa("mx.example.test", "2001:db8::1")
    fake_dns.add_a("mx.example.test", "192.0.2.1", external_ok=True)
    with pytest.raises(ValueError):
        FakeDNS("192.0.2.1")
