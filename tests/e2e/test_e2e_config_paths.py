"""Configuration paths end to end: IPv6, JSON logs, [tls] files, $RELAYGATE_CONFIG,
relative paths and several workers, each with a real ``relaygate serve``.

``ConfigServer`` is a ``helpers.Server`` whose config, environment, working
directory and trusted certificate a test chooses. Everything listens on
loopback (127.0.0.1, and ::1 for the IPv6 test); every wait is bounded.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .helpers import (
    ALICE,
    ENV_VAR,
    HOST,
    IO_TIMEOUT,
    PROCESS_TIMEOUT,
    START_TIMEOUT,
    RawSMTP,
    Server,
    ServerPool,
    TomlValue,
    User,
    auth_mechanisms,
    b64,
    clean_env,
    field_values,
    header_fields,
    make_message,
    process_children,
    queue_id_of,
    remember_credentials,
    session,
    wait_until,
)

RCPT = "rcpt@example.net"
WRONG_PASSWORD = "Wrong-pw-7Hx2Lq9z"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# ------------------------------------------------------------------ the server


class ConfigServer(Server):
    """A ``Server`` with a config, environment and working directory of the test's choosing.

    - ``data_dir``/``log_file``: the text written in the config (relative paths
      are the point of some tests); ``None`` writes the absolute default.
    - ``log_format``, ``hostname``, ``tls_files`` ([tls] cert_file, key_file),
      ``extra_listeners`` ((address, tls) pairs after the two on 127.0.0.1).
    - ``via_env``: every command (serve and the CLI) finds the config through
      $RELAYGATE_CONFIG instead of ``--config``.
    - ``cwd``: the working directory of every command; ``relative_config``
      passes ``--config`` relative to it.
    - ``trust``: a PEM file of CAs the probes and ``client_context`` trust
      (instead of the self-signed certificates in data_dir/tls).
    """

    def __init__(
        self,
        directory: Path,
        *,
        workers: int = 1,
        data_dir: str | None = None,
        log_file: str | None = None,
        log_format: str = "logfmt",
        hostname: str = "localhost",
        tls_files: tuple[Path, Path] | None = None,
        extra_listeners: Sequence[tuple[str, str]] = (),
        sections: Mapping[str, Mapping[str, TomlValue]] | None = None,
        via_env: bool = False,
        cwd: Path | None = None,
        relative_config: bool = False,
        trust: Path | None = None,
    ) -> None:
        # write_config (run by Server.__init__) reads these.
        self.data_dir_text = data_dir
        self.log_file_text = log_file
        self.log_format = log_format
        self.hostname = hostname
        self.tls_files = tls_files
        self.extra_listeners = list(extra_listeners)
        self.via_env = via_env
        self.cwd = cwd or directory
        self.relative_config = relative_config
        self.trust = trust
        super().__init__(directory, workers=workers, sections=sections)
        if data_dir is not None:
            self.data_dir = (self.config_path.parent / data_dir).resolve()
        if log_file is not None:
            self.log_path = (self.config_path.parent / log_file).resolve()

    def write_config(self) -> None:
        data_dir = self.data_dir_text if self.data_dir_text is not None else str(self.data_dir)
        log_file = self.log_file_text if self.log_file_text is not None else str(self.log_path)
        lines = [
            "[server]",
            f"hostname = {json.dumps(self.hostname)}",
            f"data_dir = {json.dumps(data_dir)}",
            f"workers = {self.workers}",
        ]
        listeners = [
            (f"{HOST}:{self.starttls_port}", "starttls"),
            (f"{HOST}:{self.implicit_port}", "implicit"),
            *self.extra_listeners,
        ]
        for address, tls in listeners:
            lines += ["", "[[listeners]]", f"address = {json.dumps(address)}", f'tls = "{tls}"']
        if self.tls_files is not None:
            cert, key = self.tls_files
            lines += [
                "",
                "[tls]",
                f"cert_file = {json.dumps(str(cert))}",
                f"key_file = {json.dumps(str(key))}",
            ]
        lines += [
            "",
            "[password_hash]",
            "memory_kib = 8192",
            "time_cost = 1",
            "",
            "[log]",
            f"file = {json.dumps(log_file)}",
            f"format = {json.dumps(self.log_format)}",
        ]
        for name, values in self.sections.items():
            lines += ["", f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # processes

    def env(self) -> dict[str, str]:
        return clean_env(**{ENV_VAR: str(self.config_path)}) if self.via_env else clean_env()

    def command(self, *args: str) -> list[str]:
        base = [sys.executable, "-m", "relaygate"]
        if self.via_env:
            return [*base, *args]
        config = str(self.config_path)
        if self.relative_config:
            config = os.path.relpath(self.config_path, self.cwd)
        return [*base, "--config", config, *args]

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            env=self.env(),
            cwd=self.cwd,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"relaygate {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def raw(self, queue_id: str) -> bytes:
        result = subprocess.run(
            self.command("messages", "show", queue_id, "--raw"),
            capture_output=True,
            timeout=PROCESS_TIMEOUT,
            env=self.env(),
            cwd=self.cwd,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"messages show {queue_id} --raw: {result.stderr!r}")
        return result.stdout

    def start(self, timeout: float = START_TIMEOUT) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.terminated = False
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                self.command("serve"),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env(),
                cwd=self.cwd,
                start_new_session=True,  # its own process group: killpg reaches the workers
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def serve_once(self, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """``serve`` expected to fail at start-up: its exit status and output."""
        return subprocess.run(
            self.command("serve"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=self.cwd,
            start_new_session=True,  # no controlling terminal: nothing can prompt
            check=False,
        )

    # TLS and logs

    def client_context(self, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        if self.trust is None:
            return super().client_context(max_version=max_version)
        context = ssl.create_default_context(cafile=str(self.trust))
        # RawSMTP always sends the name "localhost"; the tests check names themselves.
        context.check_hostname = False
        if max_version is not None:
            context.maximum_version = max_version
        return context

    def log_events(self, name: str | None = None, since: int = 0) -> list[dict[str, str]]:
        if self.log_format != "json":
            return super().log_events(name, since)
        events = [
            {k: str(v) for k, v in json_event(line).items()}
            for line in self.log_text()[since:].splitlines()
            if line
        ]
        return [e for e in events if name is None or e["event"] == name]


def json_event(line: str) -> dict[str, Any]:
    data = json.loads(line)
    assert isinstance(data, dict), line
    return data


def add_server(pool: ServerPool, server: Server, users: Sequence[User] = (ALICE,)) -> None:
    """Register with the pool (stopped and checked at teardown), add users, start."""
    pool.servers.append(server)
    for user in users:
        server.add_user(user)
    server.start()


def send_one(client: RawSMTP, user: User, subject: str) -> str:
    message = make_message(from_addr=user.address, to=[RCPT], subject=subject)
    return client.send_mail(user.address, [RCPT], message)


def message_subjects(listing: str) -> set[str]:
    return {str(entry["subject"]) for entry in json.loads(listing)}


# ------------------------------------------------------------------ 1. IPv6


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_ipv6_ports(count: int) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("::1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_listener(fresh_servers: ServerPool) -> None:
    v6_starttls, v6_implicit = free_ipv6_ports(2)
    server = ConfigServer(
        fresh_servers.base / "ipv6",
        extra_listeners=[
            (f"[::1]:{v6_starttls}", "starttls"),
            (f"[::1]:{v6_implicit}", "implicit"),
        ],
    )
    add_server(fresh_servers, server)
    banner = server.stdout_path.read_text()
    assert f"[::1]:{v6_starttls} (STARTTLS)" in banner, banner
    assert f"[::1]:{v6_implicit} (implicit TLS)" in banner, banner

    mark = server.log_mark()
    subject = "over IPv6 with STARTTLS"
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
    # The self-signed certificate names ::1, so smtplib can check it by address.
    with smtplib.SMTP("::1", v6_starttls, timeout=IO_TIMEOUT) as client:
        assert client.ehlo("client.test")[0] == 250
        code, _ = client.starttls(context=server.client_context())
        assert code == 220
        assert client.ehlo("client.test")[0] == 250
        client.login(ALICE.address, ALICE.password)
        assert client.mail(ALICE.address)[0] == 250
        assert client.rcpt(RCPT)[0] == 250
        code, text = client.data(message)
        assert code == 250, text
        queue_id = queue_id_of(text.decode())

    accepted = server.wait_for_event("message.accepted", lambda e: e["queue_id"] == queue_id, mark)
    assert accepted["client_ip"] == "::1", accepted
    connect = server.wait_for_event(
        "connect", lambda e: e["session"] == accepted["session"], since=mark
    )
    assert connect["client_ip"] == "::1", connect
    tls = server.wait_for_event("tls", lambda e: e["session"] == accepted["session"], since=mark)
    assert tls["client_ip"] == "::1", tls

    entry = server.message(queue_id)
    assert entry["client_ip"] == "::1", entry
    assert entry["subject"] == subject, entry
    raw = server.raw(queue_id)
    name, received = header_fields(raw)[0]
    assert name == "Received", raw[:300]
    # What relaygate writes: the bare address in brackets (RFC 5321 would say
    # "[IPv6:::1]"; see the report), and ESMTPSA over TLS.
    # RFC 5321 4.1.3: an IPv6 address literal is written [IPv6:...].
    assert received.startswith("from client.test ([IPv6:::1]) by localhost (relaygate)"), received
    assert f"with ESMTPSA id {queue_id}" in received, received
    assert f"(authenticated user {ALICE.address})" in received, received

    # The implicit-TLS listener on ::1 serves too.
    context = server.client_context()
    with (
        socket.create_connection(("::1", v6_implicit), timeout=IO_TIMEOUT) as plain,
        context.wrap_socket(plain, server_hostname="::1") as tls_sock,
    ):
        client6 = RawSMTP(tls_sock)
        assert client6.reply().code == 220
        client6.ehlo()
        client6.login(ALICE.address, ALICE.password)
        implicit_id = send_one(client6, ALICE, "over IPv6 with implicit TLS")
        client6.command("QUIT")
    assert server.message(implicit_id)["client_ip"] == "::1"


# ------------------------------------------------------------------ 2. JSON logs

VOLATILE_VALUES = {"ts", "session", "queue_id", "seconds", "size", "pid"}


def _json_dialog(server: ConfigServer, tag: str) -> tuple[str, str]:
    """A failed and a good login, a refused command and a message; (session, queue id)."""
    with session(server, implicit=False, ehlo=True) as client:
        reply = client.auth_plain(ALICE.address, WRONG_PASSWORD)
        assert reply.status == "535 5.7.8", str(reply)
        client.login(ALICE.address, ALICE.password)
        assert client.command(f"RCPT TO:<{RCPT}>").code == 503
        queue_id = send_one(client, ALICE, f"json log {tag}")
        assert client.command("QUIT").code == 221
    accepted = server.wait_for_event("message.accepted", lambda e: e["queue_id"] == queue_id)
    server.wait_for_event("disconnect", lambda e: e["session"] == accepted["session"])
    return accepted["session"], queue_id


def test_json_log_format(fresh_servers: ServerPool) -> None:
    remember_credentials(ALICE.address, WRONG_PASSWORD)
    servers = {
        fmt: ConfigServer(fresh_servers.base / f"log-{fmt}", log_format=fmt)
        for fmt in ("json", "logfmt")
    }
    for server in servers.values():
        add_server(fresh_servers, server)
    results = {fmt: _json_dialog(server, fmt) for fmt, server in servers.items()}
    for server in servers.values():
        assert server.stop() == 0  # the shutdown events are in the logs too

    text = servers["json"].log_text()
    assert text.endswith("\n")
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        event = json_event(line)  # one whole JSON object per line
        assert list(event)[:3] == ["ts", "level", "event"], line
        assert TS.fullmatch(event["ts"]), line
        assert event["level"] in {"debug", "info", "warning", "error"}, line
        assert all(v is not None for v in event.values()), line
        assert all(isinstance(v, str | int | float | bool) for v in event.values()), line
        events.append(event)
    names = [e["event"] for e in events]
    assert names[0] == "start", names
    assert names[-1] == "shutdown.done", names

    session_id, queue_id = results["json"]
    [accepted] = [e for e in events if e["event"] == "message.accepted"]
    assert accepted["session"] == session_id
    assert accepted["client_ip"] == HOST
    assert accepted["user"] == ALICE.address
    assert accepted["queue_id"] == queue_id
    assert accepted["mail_from"] == ALICE.address
    assert accepted["reply"] == "250"
    assert accepted["rcpts"] == 1
    [failed] = [e for e in events if e["event"] == "auth.fail"]
    assert (failed["user"], failed["reason"], failed["reply"]) == (
        ALICE.address,
        "bad_password",
        "535",
    )

    # The same dialog gives the same events with the same keys, in the same
    # order, and the same values wherever a value does not vary by run; so do
    # start and shutdown. (Probe connections made while starting are left out:
    # their disconnect may be logged before or after the dialog.)
    def comparable(events: list[dict[str, Any]], session_id: str) -> list[dict[str, Any]]:
        return [e for e in events if e.get("session", session_id) == session_id]

    json_part = comparable(events, results["json"][0])
    logfmt_part = comparable(servers["logfmt"].log_events(), results["logfmt"][0])
    assert [(e["event"], list(e)) for e in json_part] == [
        (e["event"], list(e)) for e in logfmt_part
    ]
    assert [e["event"] for e in json_part] == [
        "start",
        "connect",
        "tls",
        "auth.fail",
        "auth.ok",
        "command.refused",
        "message.accepted",
        "disconnect",
        "shutdown.start",
        "shutdown.done",
    ]
    for as_json, as_logfmt in zip(json_part, logfmt_part, strict=True):
        for key, value in as_logfmt.items():
            if key not in VOLATILE_VALUES:
                assert str(as_json[key]) == value, (key, as_json, as_logfmt)

    for secret in (
        ALICE.password,
        WRONG_PASSWORD,
        b64(f"\0{ALICE.address}\0{ALICE.password}"),
        b64(f"\0{ALICE.address}\0{WRONG_PASSWORD}"),
    ):
        assert secret not in text


# ------------------------------------------------------------------ 3. [tls] files

TLS_HOSTNAME = "mail.example.test"


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA certificate (PEM), for clients to trust
    chain: Path  # leaf + CA (PEM): [tls] cert_file
    key: Path  # the leaf's key: [tls] key_file
    leaf_der: bytes
    other_key: Path  # a valid key that is not the leaf's
    encrypted_key: Path  # the leaf's key, with a passphrase


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    path.chmod(0o600)
    return path


def make_pki(directory: Path) -> PKI:
    """A P-384 CA that signs (SHA-384) a P-256 leaf for mail.example.test and 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relaygate test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_HOSTNAME)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(TLS_HOSTNAME),
                    x509.IPAddress(ipaddress.ip_address(HOST)),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca = directory / "ca.pem"
    ca.write_bytes(ca_pem)
    chain = directory / "fullchain.pem"
    chain.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    return PKI(
        ca=ca,
        chain=chain,
        key=_write_key(directory / "privkey.pem", leaf_key),
        leaf_der=leaf_cert.public_bytes(serialization.Encoding.DER),
        other_key=_write_key(directory / "other.pem", ec.generate_private_key(ec.SECP256R1())),
        encrypted_key=_write_key(directory / "encrypted.pem", leaf_key, b"pass-phrase-1"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def strict_context(pki: PKI) -> ssl.SSLContext:
    """Trusts only the test CA and checks the host name."""
    return ssl.create_default_context(cafile=str(pki.ca))


def test_configured_certificate_is_served(fresh_servers: ServerPool, pki: PKI) -> None:
    server = ConfigServer(
        fresh_servers.base / "tls-files",
        hostname=TLS_HOSTNAME,
        tls_files=(pki.chain, pki.key),
        trust=pki.ca,
    )
    add_server(fresh_servers, server)

    # STARTTLS, checked by address (the certificate names 127.0.0.1).
    with smtplib.SMTP(HOST, server.starttls_port, timeout=IO_TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.starttls(context=strict_context(pki))[0] == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.getpeercert(binary_form=True) == pki.leaf_der
        client.ehlo("client.test")
        client.login(ALICE.address, ALICE.password)
        assert client.mail(ALICE.address)[0] == 250
        assert client.rcpt(RCPT)[0] == 250
        code, text = client.data(
            make_message(from_addr=ALICE.address, to=[RCPT], subject="own certificate")
        )
        assert code == 250, text
        queue_id = queue_id_of(text.decode())
    [received] = field_values(server.raw(queue_id), "Received")[:1]
    assert f"by {TLS_HOSTNAME} (relaygate) with ESMTPSA id {queue_id}" in received, received

    # Implicit TLS, checked by name.
    with socket.create_connection((HOST, server.implicit_port), timeout=IO_TIMEOUT) as plain:
        context = strict_context(pki)
        with context.wrap_socket(plain, server_hostname=TLS_HOSTNAME) as tls_sock:
            assert tls_sock.getpeercert(binary_form=True) == pki.leaf_der
            client2 = RawSMTP(tls_sock)
            assert client2.reply().code == 220
            offered = auth_mechanisms(client2.ehlo())
            assert "SCRAM-SHA-256-PLUS" in offered, offered
            # RFC 5929 tls-server-end-point: the hash of the leaf's own signature
            # algorithm, SHA-384 here, must match what the server derives from cert_file.
            binding = hashlib.sha384(pki.leaf_der).digest()
            reply = client2.auth_scram(
                "SCRAM-SHA-256-PLUS", ALICE.address, ALICE.password, binding=binding
            )
            assert reply.status == "235 2.7.0", str(reply)
            client2.command("QUIT")

    tls_dir = server.data_dir / "tls"
    assert not tls_dir.exists() or not any(tls_dir.iterdir()), list(tls_dir.iterdir())


@pytest.mark.parametrize(
    "case",
    [
        "mismatched-key",
        "missing-cert",
        "missing-key",
        "encrypted-key",
        "key-as-cert",
    ],
)
def test_bad_certificate_files(tmp_path: Path, pki: PKI, case: str) -> None:
    missing = tmp_path / "no-such-file.pem"
    cert, key, named = {
        "mismatched-key": (pki.chain, pki.other_key, pki.other_key),
        "missing-cert": (missing, pki.key, missing),
        "missing-key": (pki.chain, missing, missing),
        "encrypted-key": (pki.chain, pki.encrypted_key, pki.encrypted_key),
        "key-as-cert": (pki.key, pki.key, pki.key),
    }[case]
    server = ConfigServer(tmp_path / "server", tls_files=(cert, key))
    result = server.serve_once()
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("relaygate: "), lines
    assert str(named) in lines[0], lines
    assert not (server.data_dir / "tls").exists()


# ------------------------------------------------------------------ 4. $RELAYGATE_CONFIG


def test_config_from_environment(fresh_servers: ServerPool, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = ConfigServer(fresh_servers.base / "env", via_env=True, cwd=elsewhere)
    assert "--config" not in server.command("serve")
    add_server(fresh_servers, server)  # `user add` and `serve`, both through the variable
    banner = server.stdout_path.read_text()
    assert f"{HOST}:{server.starttls_port} (STARTTLS)" in banner, banner
    assert "quickstart" not in banner, banner

    with session(server, user=ALICE) as client:
        queue_id = send_one(client, ALICE, "config from the environment")

    def run(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relaygate", *args],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            env=dict(env),
            cwd=elsewhere,
            check=False,
        )

    good = clean_env(**{ENV_VAR: str(server.config_path)})
    listing = run("messages", "list", "--json", env=good)
    assert listing.returncode == 0, listing.stderr
    assert [e["id"] for e in json.loads(listing.stdout)] == [queue_id]
    table = run("messages", "list", env=good)
    assert table.returncode == 0, table.stderr
    assert queue_id in table.stdout and "config from the environment" in table.stdout

    # The variable is what was read: a wrong one fails, naming its file...
    missing = tmp_path / "missing.toml"
    bad = run("messages", "list", env=clean_env(**{ENV_VAR: str(missing)}))
    assert bad.returncode == 2, bad
    assert bad.stderr.splitlines() == [
        f"relaygate: {missing}: cannot read: No such file or directory"
    ], bad.stderr
    # ... and --config wins over it.
    both = run(
        "--config", str(server.config_path), "messages", "list", "--json",
        env=clean_env(**{ENV_VAR: str(missing)}),
    )  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert [e["id"] for e in json.loads(both.stdout)] == [queue_id]
    # Quickstart was never involved.
    assert not (elsewhere / "relaygate-data").exists()


# ------------------------------------------------------------------ 5. relative paths


def test_relative_paths_follow_the_config_file(fresh_servers: ServerPool, tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    server = ConfigServer(
        fresh_servers.base / "relative" / "etc",
        data_dir="spool",
        log_file="logs/relaygate.log",
        cwd=elsewhere,
        relative_config=True,  # --config ../servers/relative/etc/relaygate.toml
    )
    config_dir = server.config_path.parent
    assert not Path(server.command("serve")[4]).is_absolute()
    assert 'data_dir = "spool"' in server.config_path.read_text()
    add_server(fresh_servers, server)

    assert server.data_dir == config_dir / "spool"
    assert (config_dir / "spool" / "relaygate.db").is_file()
    assert (config_dir / "logs" / "relaygate.log").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    assert f"data: {config_dir / 'spool'}" in server.stdout_path.read_text()

    with session(server, user=ALICE) as client:
        queue_id = send_one(client, ALICE, "relative data_dir")
    server.wait_for_event("message.accepted", lambda e: e["queue_id"] == queue_id)
    assert server.message(queue_id)["subject"] == "relative data_dir"
    assert sorted(p.name for p in elsewhere.iterdir()) == []


# ------------------------------------------------------------------ 6. workers = 3


def test_three_workers_all_serve(fresh_servers: ServerPool) -> None:
    server = ConfigServer(fresh_servers.base / "three", workers=3)
    add_server(fresh_servers, server)  # start waits until each of the 3 greeted once
    workers = sorted(process_children(server.pid))
    assert len(workers) == 3, workers
    assert "3 worker(s)" in server.stdout_path.read_text()
    start = server.wait_for_event("start")
    assert start["workers"] == "3" and start["pid"] == str(server.pid), start

    # Open connections (kept open) until every worker holds one; then each of
    # those connections logs in and sends a message.
    context = server.client_context()
    held: dict[int, RawSMTP] = {}
    extra: list[RawSMTP] = []
    try:

        def every_worker_holds_one() -> bool:
            client = RawSMTP.connect(server.implicit_port, tls=context)
            holder = server.worker_for(client.local_port)
            assert holder in workers, (holder, workers)
            if holder in held:
                extra.append(client)
            else:
                held[holder] = client
            return len(held) == 3

        wait_until(every_worker_holds_one, 15.0, 0.0, "a connection held by each worker")
        ids = []
        for index, (pid, client) in enumerate(sorted(held.items())):
            client.ehlo()
            client.login(ALICE.address, ALICE.password)
            ids.append(send_one(client, ALICE, f"worker {index} (pid {pid})"))
            assert client.command("QUIT").code == 221
    finally:
        for client in [*held.values(), *extra]:
            client.close()
    assert {m["id"] for m in server.messages()} == set(ids)
    assert sorted(process_children(server.pid)) == workers  # none died or was replaced
