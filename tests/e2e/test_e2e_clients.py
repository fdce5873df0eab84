"""Real mail clients send through the real server; the captured message is checked.

For every client: the 250 reply's queue id is the one ``messages list`` shows,
with the right account, envelope, subject and status, and the stored message
starts with our Received field (ESMTPSA, TLS version, authenticated user).
"""

from __future__ import annotations

import asyncio
import email.message
import hashlib
import re
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

import aiosmtplib
import pytest

from .helpers import (
    ALICE,
    BOB,
    HOST,
    Server,
    auth_mechanisms,
    check_stored,
    field_values,
    header_fields,
    make_message,
    queue_id_of,
    remember_credentials,
    session,
)

RCPT = "rcpt@example.net"
CLIENT_TIMEOUT = 30


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False)


# ------------------------------------------------------------------ smtplib


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_starttls(server: Server, mechanism: str) -> None:
    subject = f"smtplib starttls {mechanism}"
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
    with smtplib.SMTP(HOST, server.starttls_port, "client.test", timeout=10) as smtp:
        smtp.starttls(context=server.client_context())
        _smtplib_login(smtp, mechanism)
        smtp.mail(ALICE.address)
        smtp.rcpt(RCPT)
        code, text = smtp.data(message)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        version = smtp.sock.version()
    assert code == 250, text
    assert text.startswith(b"2.0.0 Ok: queued as "), text
    check_stored(
        server,
        queue_id_of(text.decode()),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
        tls_version=version,
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_implicit_tls(server: Server, mechanism: str) -> None:
    subject = f"smtplib implicit {mechanism}"
    rcpts = [RCPT, "second@example.net"]
    message = make_message(from_addr=BOB.address, to=rcpts, subject=subject)
    with smtplib.SMTP_SSL(
        HOST, server.implicit_port, "client.test", timeout=10, context=server.client_context()
    ) as smtp:
        _smtplib_login(smtp, mechanism, BOB.address, BOB.password)
        smtp.mail("bounce@example.org")  # any address at @example.org is bob's
        for rcpt in rcpts:
            smtp.rcpt(rcpt)
        code, text = smtp.data(message)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        version = smtp.sock.version()
    assert code == 250, text
    check_stored(
        server,
        queue_id_of(text.decode()),
        user=BOB.address,
        mail_from="bounce@example.org",
        rcpts=rcpts,
        subject=subject,
        tls_version=version,
    )


def _smtplib_login(
    smtp: smtplib.SMTP, mechanism: str, user: str = ALICE.address, password: str = ALICE.password
) -> None:
    remember_credentials(user, password)
    smtp.ehlo("client.test")
    smtp.user, smtp.password = user, password
    authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
    code, text = smtp.auth(mechanism, authobject)
    assert code == 235, text


def test_smtplib_refusal_is_seen_by_the_client(server: Server) -> None:
    with smtplib.SMTP_SSL(
        HOST, server.implicit_port, "client.test", timeout=10, context=server.client_context()
    ) as smtp:
        remember_credentials(ALICE.address, ALICE.password)
        smtp.login(ALICE.address, ALICE.password)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(BOB.address, [RCPT], b"Subject: x\r\n\r\nx\r\n")
    assert refused.value.smtp_code == 553
    assert refused.value.smtp_error.startswith(b"5.7.1 "), refused.value.smtp_error


# ------------------------------------------------------------------ aiosmtplib


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_aiosmtplib(server: Server, implicit: bool) -> None:
    subject = f"aiosmtplib {'implicit' if implicit else 'starttls'}"
    message = email.message.EmailMessage()
    message["From"] = ALICE.address
    message["To"] = RCPT
    message["Subject"] = subject
    message.set_content("Sent by aiosmtplib.\n")
    remember_credentials(ALICE.address, ALICE.password)

    async def send() -> tuple[str, str | None]:
        smtp = aiosmtplib.SMTP(
            hostname=HOST,
            port=server.implicit_port if implicit else server.starttls_port,
            use_tls=implicit,
            start_tls=not implicit,
            tls_context=server.client_context(),
            local_hostname="client.test",
            timeout=10,
        )
        async with smtp:
            await smtp.login(ALICE.address, ALICE.password)
            errors, response = await smtp.send_message(message)
            assert errors == {}
            ssl_object = smtp.transport.get_extra_info("ssl_object") if smtp.transport else None
            version = ssl_object.version() if ssl_object is not None else None
        return response, version

    response, version = asyncio.run(asyncio.wait_for(send(), 30))
    assert response.startswith("2.0.0 Ok: queued as "), response
    raw = check_stored(
        server,
        queue_id_of(response),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
        tls_version=version,
    )
    assert b"Sent by aiosmtplib." in raw


# ------------------------------------------------------------------ swaks


@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks(server: Server, mode: str, mechanism: str) -> None:
    swaks = _need("swaks")
    port = server.starttls_port if mode == "--tls" else server.implicit_port
    subject = f"swaks {mode} {mechanism}"
    remember_credentials(ALICE.address, ALICE.password)
    result = _run(
        [
            swaks,
            "--server",
            HOST,
            "--port",
            str(port),
            mode,
            "--tls-verify",
            "--tls-ca-path",
            str(server.ca_bundle()),
            "--auth",
            mechanism,
            "--auth-user",
            ALICE.address,
            "--auth-password",
            ALICE.password,
            "--from",
            ALICE.address,
            "--to",
            RCPT,
            "--helo",
            "client.test",
            "--header",
            f"Subject: {subject}",
            "--timeout",
            "20",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<~  235 2\.7\.0 ", result.stdout), result.stdout
    check_stored(
        server,
        queue_id_of(result.stdout),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )


# ------------------------------------------------------------------ curl


@pytest.mark.parametrize(
    ("scheme", "mechanism"), [("smtp", "PLAIN"), ("smtps", "LOGIN"), ("smtps", "PLAIN")]
)
def test_curl(server: Server, tmp_path: Path, scheme: str, mechanism: str) -> None:
    curl = _need("curl")
    port = server.starttls_port if scheme == "smtp" else server.implicit_port
    subject = f"curl {scheme} {mechanism}"
    upload = tmp_path / "message.eml"
    # No Date and no Message-ID: the server must add both.
    upload.write_bytes(
        make_message(
            from_addr=ALICE.address, to=[RCPT], subject=subject, date=False, message_id=False
        )
    )
    remember_credentials(ALICE.address, ALICE.password)
    args = [
        curl,
        "--silent",
        "--show-error",
        "--verbose",
        "--max-time",
        "20",
        f"{scheme}://localhost:{port}/client.test",
        "--resolve",
        f"localhost:{port}:{HOST}",
        "--cacert",
        str(server.ca_bundle()),
        "--login-options",
        f"AUTH={mechanism}",
        "--user",
        f"{ALICE.address}:{ALICE.password}",
        "--mail-from",
        ALICE.address,
        "--mail-rcpt",
        RCPT,
        "--upload-file",
        str(upload),
    ]
    if scheme == "smtp":
        args.append("--ssl-reqd")
    result = _run(args)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"> AUTH {mechanism}\b", result.stderr), result.stderr
    queue_id = queue_id_of(result.stderr)
    raw = check_stored(
        server,
        queue_id,
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    assert field_values(raw, "Message-ID") == [f"<{queue_id}@localhost>"]
    assert len(field_values(raw, "Date")) == 1


# ------------------------------------------------------------------ msmtp


@pytest.mark.parametrize(
    ("starttls", "auth"),
    [
        (True, "plain"),
        (False, "plain"),
        (False, "login"),
        (True, "scram-sha-256"),
    ],
    ids=["starttls-plain", "implicit-plain", "implicit-login", "starttls-scram"],
)
def test_msmtp(server: Server, tmp_path: Path, starttls: bool, auth: str) -> None:
    msmtp = _need("msmtp")
    subject = f"msmtp {'starttls' if starttls else 'implicit'} {auth}"
    log = tmp_path / "msmtp.log"
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "\n".join(
            [
                "defaults",
                f"logfile {log}",
                "",
                "account default",
                f"host {HOST}",
                f"port {server.starttls_port if starttls else server.implicit_port}",
                "domain client.test",
                "tls on",
                f"tls_starttls {'on' if starttls else 'off'}",
                f"tls_trust_file {server.ca_bundle()}",
                "tls_host_override localhost",
                f"auth {auth}",
                f"user {ALICE.address}",
                f"password {ALICE.password}",
                f"from {ALICE.address}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    rc.chmod(0o600)  # msmtp refuses a password file others can read
    remember_credentials(ALICE.address, ALICE.password)
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
    result = subprocess.run(
        [msmtp, "-C", str(rc), "-a", "default", RCPT],
        input=message,
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    logged = log.read_text(encoding="utf-8", errors="replace")
    assert "exitcode=EX_OK" in logged, logged
    raw = check_stored(
        server,
        queue_id_of(logged),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    assert raw.endswith(message), raw


# ------------------------------------------------------------------ header completion


def test_message_id_and_date_added_when_missing(server: Server) -> None:
    subject = "no date, no message-id"
    message = make_message(
        from_addr=ALICE.address, to=[RCPT], subject=subject, date=False, message_id=False
    )
    with session(server, user=ALICE) as client:
        queue_id = client.send_mail(ALICE.address, [RCPT], message)
    raw = check_stored(
        server,
        queue_id,
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    assert field_values(raw, "Message-ID") == [f"<{queue_id}@localhost>"]
    (date,) = field_values(raw, "Date")
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", date), date
    assert raw.endswith(message)


def test_message_id_and_date_left_alone_when_present(server: Server) -> None:
    subject = "own date and message-id"
    message = make_message(
        from_addr=ALICE.address,
        to=[RCPT],
        subject=subject,
        date=False,
        message_id=False,
        extra_headers=["Date: Tue, 01 Jan 2030 00:00:00 +0000", "Message-ID: <own.1@client.test>"],
    )
    with session(server, implicit=False, user=ALICE) as client:
        queue_id = client.send_mail(ALICE.address, [RCPT], message)
    raw = check_stored(
        server,
        queue_id,
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    assert field_values(raw, "Message-ID") == ["<own.1@client.test>"]
    assert field_values(raw, "Date") == ["Tue, 01 Jan 2030 00:00:00 +0000"]
    # Only our Received field goes before the message, which is kept byte for byte.
    assert raw.endswith(message)
    assert [name for name, _ in _fields_before(raw, message)] == ["Received"]


def _fields_before(raw: bytes, message: bytes) -> list[tuple[str, str]]:
    return header_fields(raw[: len(raw) - len(message)] + b"\r\n")


# ------------------------------------------------------------------ TLS details


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_tls12_with_each_certificate(server: Server, kind: str) -> None:
    """Both certificates are served; TLS 1.2 works and the Received field says so."""
    context = ssl.create_default_context(
        cafile=str(server.ecdsa_cert if kind == "ecdsa" else server.rsa_cert)
    )
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(
        "ECDHE-ECDSA-AES128-GCM-SHA256" if kind == "ecdsa" else "ECDHE-RSA-AES128-GCM-SHA256"
    )
    subject = f"tls1.2 {kind}"
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
    with smtplib.SMTP_SSL(
        HOST, server.implicit_port, "client.test", timeout=10, context=context
    ) as smtp:
        remember_credentials(ALICE.address, ALICE.password)
        smtp.login(ALICE.address, ALICE.password)
        smtp.mail(ALICE.address)
        smtp.rcpt(RCPT)
        code, text = smtp.data(message)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() == "TLSv1.2"
    assert code == 250, text
    check_stored(
        server,
        queue_id_of(text.decode()),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
        tls_version="TLSv1.2",
    )


# ------------------------------------------------------------------ SCRAM


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])
def test_scram(server: Server, mechanism: str, implicit: bool) -> None:
    subject = f"scram {mechanism} {implicit}"
    with session(server, implicit=implicit) as client:
        assert mechanism in auth_mechanisms(client.ehlo())
        reply = client.auth_scram(mechanism, ALICE.address, ALICE.password)
        assert reply.status == "235 2.7.0", str(reply)
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


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])
@pytest.mark.parametrize(
    "who",
    [(ALICE.address, "Wrong-scram-pw-4Lm"), ("nobody-scram@example.com", "Nobody-scram-pw-1")],
    ids=["wrong-password", "unknown-user"],
)
def test_scram_failures(server: Server, mechanism: str, who: tuple[str, str]) -> None:
    with session(server) as client:
        reply = client.auth_scram(mechanism, *who)
        assert reply.status == "535 5.7.8", str(reply)
        client.login(ALICE.address, ALICE.password)  # the session goes on


def test_scram_plus_with_a_foreign_binding_fails(server: Server) -> None:
    """Channel binding to another certificate (a man in the middle) must not log in."""
    with session(server) as client:
        foreign = hashlib.sha256(b"some other certificate").digest()
        reply = client.auth_scram(
            "SCRAM-SHA-256-PLUS", ALICE.address, ALICE.password, binding=foreign
        )
        assert reply.code == 535, str(reply)
        assert reply.enhanced == "5.7.8", str(reply)
