"""End to end: development conveniences (issue 10, part 4).

- A Mailpit-style dev port: ``[[listeners]] tls = "none"`` with
  ``allow_plaintext_auth = true`` on 127.0.0.1 takes AUTH PLAIN and LOGIN
  without TLS (smtplib, swaks); SCRAM-SHA-256-PLUS is not offered there (no TLS,
  no channel binding); the TLS listeners beside it still want TLS first. The
  same setting on 0.0.0.0 or 192.0.2.1 stops ``relaygate serve`` with one line
  and exit status 2. A ``tls = "none"`` listener without it logs
  ``listener.no_auth`` at start: nobody can log in there.
- A smarthost ``ca_file``: a sink whose certificate comes from a CA made here;
  without ``ca_file`` (and with no such CA in the environment) delivery is
  deferred with the verification error; with it, delivered and verified, for
  STARTTLS and implicit TLS.
"""

from __future__ import annotations

import base64
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakes.smtp_sink import SMTPSink, make_tls_context

from .delivery_helpers import (
    WAIT,
    DeliveryServer,
    TomlData,
    delete_leftovers,
    delivery_toml,
    history,
    loopback_address,
    new_server,
    queue_rows_for,
    submit_one,
    wait_status,
)
from .helpers import (
    HOST,
    PROCESS_TIMEOUT,
    RawSMTP,
    ServerPool,
    User,
    clean_env,
    free_ports,
    header_fields,
    make_message,
    queue_id_of,
    remember_credentials,
    wait_until,
)

DEV = User("dev@example.test", "Dev-port-pw-3Rk8Vb6n")
RCPT = "someone@elsewhere.test"


@dataclass
class DevPort:
    server: DeliveryServer
    dev_port: int  # tls = "none", allow_plaintext_auth = true
    closed_port: int  # tls = "none" without it: no login possible


def _listener(port: int, *extra: str) -> str:
    return "\n".join(["", "[[listeners]]", f'address = "{HOST}:{port}"', 'tls = "none"', *extra])


@pytest.fixture(scope="module")
def dev(servers: ServerPool) -> DevPort:
    dev_port, closed_port = free_ports(2)
    toml = _listener(dev_port, "allow_plaintext_auth = true") + "\n" + _listener(closed_port) + "\n"
    remember_credentials(DEV.address, DEV.password)
    server = new_server(servers, "dev", extra_toml=toml, users=[DEV])  # capture mode
    return DevPort(server, dev_port, closed_port)


# ------------------------------------------------------------------ the dev port


def test_smtplib_logs_in_without_tls_on_the_dev_port(dev: DevPort) -> None:
    for mechanism in ("PLAIN", "LOGIN"):
        subject = f"dev port: smtplib {mechanism}"
        with smtplib.SMTP(HOST, dev.dev_port, local_hostname="app.test", timeout=10) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            offered = client.esmtp_features["auth"].split()
            assert offered == ["PLAIN", "LOGIN", "SCRAM-SHA-256"], offered  # no -PLUS
            code, _ = _login(client, mechanism)
            assert code == 235
            message = make_message(from_addr=DEV.address, to=[RCPT], subject=subject)
            client.sendmail(DEV.address, [RCPT], message)
            reply = client.noop()
            assert reply[0] == 250
        [entry] = [m for m in dev.server.messages() if m["subject"] == subject]
        assert entry["status"] == "captured"
        assert entry["account"] == DEV.address
    ok = dev.server.log_events("auth.ok")
    assert {e["mechanism"] for e in ok if e["user"] == DEV.address} >= {"PLAIN", "LOGIN"}


def _login(client: smtplib.SMTP, mechanism: str) -> tuple[int, bytes]:
    client.user, client.password = DEV.address, DEV.password
    authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    return client.auth(mechanism, authobject, initial_response_ok=mechanism == "PLAIN")


def test_swaks_sends_through_the_dev_port(dev: DevPort) -> None:
    subject = "dev port: swaks"
    result = subprocess.run(
        [
            "swaks",
            "--server",
            HOST,
            "--port",
            str(dev.dev_port),
            "--auth",
            "PLAIN",
            "--auth-user",
            DEV.address,
            "--auth-password",
            DEV.password,
            "--from",
            DEV.address,
            "--to",
            RCPT,
            "--helo",
            "app.test",
            "--header",
            f"Subject: {subject}",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STARTTLS" not in result.stdout
    # "<-" (in clear; swaks writes "<~" for lines read over TLS)
    assert re.search(r"^<-  235 2\.7\.0 ", result.stdout, re.MULTILINE), result.stdout
    queue_id = queue_id_of(result.stdout)
    entry = dev.server.message(queue_id)
    assert (entry["account"], entry["mail_from"], entry["rcpt_to"], entry["subject"]) == (
        DEV.address,
        DEV.address,
        [RCPT],
        subject,
    )
    assert entry["status"] == "captured"
    # Our Received field tells the truth: authenticated (ESMTPA), not encrypted (no "S").
    name, received = header_fields(dev.server.raw(queue_id))[0]
    assert name == "Received" and received.startswith("from app.test"), received
    assert " with ESMTPA id " in received and "version=TLS" not in received, received


def test_wrong_password_and_scram_plus_on_the_dev_port(dev: DevPort) -> None:
    with RawSMTP.connect(dev.dev_port) as client:
        assert client.command("EHLO app.test").code == 250
        # No TLS, so no channel binding: -PLUS is neither offered nor accepted.
        assert client.command("AUTH SCRAM-SHA-256-PLUS").status == "504 5.5.4"
        bad = client.command("AUTH PLAIN " + _plain(DEV.address, "not-the-password"))
        assert bad.status == "535 5.7.8", bad


def test_the_tls_listeners_still_want_tls_first(dev: DevPort) -> None:
    with RawSMTP.connect(dev.server.starttls_port) as client:
        ehlo = client.command("EHLO app.test")
        assert "STARTTLS" in ehlo.lines and not any(x.startswith("AUTH") for x in ehlo.lines)
        refused = client.command("AUTH PLAIN " + _plain(DEV.address, DEV.password))
        assert refused.code == 538 or refused.status.startswith("530"), refused


def test_a_plain_listener_without_plaintext_auth_warns_and_takes_no_login(dev: DevPort) -> None:
    [warning] = [
        e
        for e in dev.server.log_events("listener.no_auth")
        if e["listener"] == f"{HOST}:{dev.closed_port}"
    ]
    assert warning["level"] == "warning"
    assert "can never accept mail" in warning["reason"]
    with RawSMTP.connect(dev.closed_port) as client:
        ehlo = client.command("EHLO app.test")
        assert not any(line.startswith("AUTH") for line in ehlo.lines), ehlo
        refused = client.command("AUTH PLAIN " + _plain(DEV.address, DEV.password))
        assert refused.code in (530, 538), refused
    # What serve prints at start says which port is which.
    started = dev.server.stdout_path.read_text(encoding="utf-8")
    assert f"{HOST}:{dev.dev_port} (no TLS, plaintext AUTH (dev port))" in started, started
    assert f"{HOST}:{dev.closed_port} (no TLS)" in started, started
    # The dev port itself is not warned about.
    assert not [
        e
        for e in dev.server.log_events("listener.no_auth")
        if e["listener"] == f"{HOST}:{dev.dev_port}"
    ]


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.mark.parametrize(
    "address", ["0.0.0.0", "192.0.2.1", "[::]"], ids=["any", "documentation-net", "v6-any"]
)
def test_plaintext_auth_off_loopback_stops_serve(tmp_path: Path, address: str) -> None:
    [port] = free_ports(1)
    config = tmp_path / "relaygate.toml"
    config.write_text(
        "[server]\n"
        f'data_dir = "{tmp_path / "data"}"\n'
        "[[listeners]]\n"
        f'address = "{address}:{port}"\n'
        'tls = "none"\n'
        "allow_plaintext_auth = true\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "relaygate", "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 2, result
    host = address.strip("[]")
    assert result.stderr == (
        f"relaygate: {config}: listeners[0].allow_plaintext_auth: is only allowed on a"
        f" loopback address (127.0.0.0/8, ::1, localhost), not {host}: passwords would"
        " cross the network unencrypted\n"
    )
    assert not (tmp_path / "data").exists()  # refused before anything was made


# ------------------------------------------------------------------ smarthost ca_file


@dataclass
class PrivateCA:
    server: DeliveryServer
    starttls: SMTPSink  # the smarthost: STARTTLS, certificate from the private CA
    implicit: SMTPSink  # a route's smarthost: implicit TLS, same CA


SMARTHOST_NAME = "smarthost.private.test"


@pytest.fixture(scope="module")
def private_ca(
    servers: ServerPool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateCA]:
    base = tmp_path_factory.mktemp("e2e-private-ca")
    host = loopback_address()
    context, ca_file = make_tls_context(SMARTHOST_NAME, base, ips=(host,))
    starttls = SMTPSink(host, 0, tls=context, hostname=SMARTHOST_NAME)
    implicit = SMTPSink(host, 0, tls=context, implicit_tls=True, hostname=SMARTHOST_NAME)
    try:
        starttls.start()
        implicit.start()
        common: dict[str, TomlData] = {"host": host, "verify_certificate": True}
        toml = delivery_toml(
            {"mode": "smarthost", "retry_schedule": [3600], "connect_timeout": 5},
            # The mode's smarthost: no ca_file, so the system's CAs (which lack ours).
            smarthost={**common, "port": starttls.port, "tls": "starttls"},
            routes=[
                {
                    "domain": "trusted.test",
                    **common,
                    "port": starttls.port,
                    "tls": "starttls",
                    "ca_file": str(ca_file),
                },
                {
                    "domain": "implicit.test",
                    **common,
                    "port": implicit.port,
                    "tls": "implicit",
                    "ca_file": str(ca_file),
                },
            ],
        )
        # No SSL_CERT_FILE pointing at the CA: the ca_file setting alone must do.
        server = new_server(servers, "private-ca", extra_toml=toml, users=[DEV])
        yield PrivateCA(server, starttls, implicit)
    finally:
        starttls.stop()
        implicit.stop()


def test_without_ca_file_the_private_certificate_is_not_trusted(private_ca: PrivateCA) -> None:
    server = private_ca.server
    queue_id = submit_one(server, DEV, ["user@public.test"], "ca_file: none")
    wait_until(
        lambda: any(r["attempts"] >= 1 for r in queue_rows_for(server, queue_id)),
        WAIT,
        0.1,
        "a deferred attempt",
    )
    [row] = queue_rows_for(server, queue_id)
    reply = str(row["last_reply"])
    assert reply.startswith("451 4.4.1 cannot use "), row  # retried, never bounced
    assert "CERTIFICATE_VERIFY_FAILED" in reply, row
    deferred = server.wait_for_event("delivery.deferred", lambda e: e.get("queue_id") == queue_id)
    assert "CERTIFICATE_VERIFY_FAILED" in deferred["reply"]
    assert private_ca.starttls.messages == []
    assert "MAIL" not in private_ca.starttls.commands()
    delete_leftovers(server)


@pytest.mark.parametrize("domain", ["trusted.test", "implicit.test"])
def test_with_ca_file_the_smarthost_is_verified(private_ca: PrivateCA, domain: str) -> None:
    server = private_ca.server
    sink = private_ca.starttls if domain == "trusted.test" else private_ca.implicit
    subject = f"ca_file: {domain}"
    queue_id = submit_one(server, DEV, [f"user@{domain}"], subject)
    wait_status(server, queue_id, "delivered")
    [received] = [m for m in sink.wait_for_messages(1, WAIT) if subject.encode() in m.data]
    assert received.tls
    [attempt] = history(server, queue_id)
    assert attempt.tls.endswith(" verified") and "unverified" not in attempt.tls, attempt
