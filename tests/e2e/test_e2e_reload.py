"""End to end: reloading a running server, and asking it whether it is healthy.

SIGHUP and ``relaygate reload`` re-read the configuration in every process
without closing a connection; a broken file changes nothing; a replaced
certificate or a new DKIM key is used within seconds with no signal at all;
the log file is reopened (logrotate). ``relaygate health`` and ``/healthz``
report listeners, storage, queue and certificate; commands that only read
never make a data_dir, and exit statuses say runtime (1) from usage (2).
"""

from __future__ import annotations

import datetime
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fakes.smtp_sink import SMTPSink

from .delivery_helpers import new_server, submit_one
from .helpers import (
    HOST,
    PROCESS_TIMEOUT,
    RawSMTP,
    Server,
    ServerPool,
    User,
    clean_env,
    free_ports,
    make_message,
    session,
    wait_until,
)

ALICE = User("alice@example.test", "Reload-pw-4vQm8x", senders=("@example.test",))
RELOAD_WAIT = 15.0  # seconds for a change to reach every process (watchers look every 2-3 s)


def write_certificate(directory: Path, name: str, days: float = 90) -> tuple[Path, Path]:
    """A self-signed ECDSA certificate for ``name`` valid ``days`` more; (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    # Written beside and renamed into place, as certbot and admins do.
    for path, data in (
        (
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        (cert_path, cert.public_bytes(serialization.Encoding.PEM)),
    ):
        temporary = path.with_suffix(".new")
        temporary.write_bytes(data)
        temporary.chmod(0o600)
        temporary.replace(path)
    return cert_path, key_path


def unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_name(server: Server, *, implicit: bool) -> str:
    """The common name of the certificate a new connection is shown."""
    if implicit:
        client = RawSMTP.connect(server.implicit_port, tls=unverified())
    else:
        client = RawSMTP.connect(server.starttls_port)
        client.ehlo()
        client.starttls(unverified())
    with client:
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        return common_name(sock)


def common_name(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def https_name(port: int) -> str:
    """The common name the HTTPS listener shows a new connection."""
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        unverified().wrap_socket(raw) as sock,
    ):
        return common_name(sock)


def too_many_recipients_at(server: Server, count: int) -> int | None:
    """In a new session, the first RCPT (1-based) refused, or None within ``count``."""
    with session(server, user=ALICE) as client:
        assert client.command(f"MAIL FROM:<{ALICE.address}>").code == 250
        for index in range(1, count + 1):
            reply = client.command(f"RCPT TO:<r{index}@dest.test>")
            if reply.code != 250:
                return index
        client.command("RSET")
    return None


# ------------------------------------------------------------------ reload


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "supervised"])
def test_reload_applies_limits_and_keeps_open_connections(
    fresh_servers: ServerPool, workers: int
) -> None:
    server = fresh_servers.create(
        "limits", workers=workers, limits={"max_recipients": 5}, users=[ALICE]
    )
    assert too_many_recipients_at(server, 6) == 6
    with session(server, user=ALICE) as before:
        server.limits["max_recipients"] = 2
        server.write_config()
        mark = server.log_mark()
        result = server.cli("reload")
        assert result.stdout.startswith("relaygate: reloaded (pid ")
        [event] = server.log_events("config.reloaded", since=mark)
        assert "limits" in event["changed"].split(",")
        assert event["restart_needed"] == "-"
        # The connection opened before the reload is still there and still sends.
        assert before.command("NOOP").code == 250
        message = make_message(from_addr=ALICE.address, to=["kept@dest.test"], subject="kept")
        queue_id = before.send_mail(ALICE.address, ["kept@dest.test"], message)
        assert queue_id
    # Every worker takes the new limit: many new sessions all see it.
    for _ in range(6):
        assert too_many_recipients_at(server, 4) == 3


def test_sighup_with_a_broken_file_changes_nothing(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("broken", workers=2, limits={"max_recipients": 5}, users=[ALICE])
    good = server.config_path.read_text()
    server.config_path.write_text(good.replace("max_recipients = 5", 'max_recipients = "many"'))
    # The CLI checks the file itself and never signals a server with a broken one.
    result = server.cli("reload", check=False)
    assert result.returncode == 2
    assert "max_recipients" in result.stderr and "Traceback" not in result.stderr
    # A bare SIGHUP (kill -HUP) with the broken file: refused, logged, serving on.
    mark = server.log_mark()
    server.signal(signal.SIGHUP)
    event = server.wait_for_event("config.reload_failed", since=mark)
    assert "limits.max_recipients" in event["problem"]
    assert too_many_recipients_at(server, 6) == 6  # the running config stays
    assert server.process is not None and server.process.poll() is None
    server.config_path.write_text(good)


def test_reload_names_settings_that_need_a_restart(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("restart", workers=1, users=[ALICE])
    old_port = server.starttls_port
    server.starttls_port = free_ports(1)[0]
    server.write_config()
    result = server.cli("reload")
    assert "change only with a restart: listeners" in result.stdout
    server.starttls_port = old_port  # the file says another port; the server keeps this one
    with session(server, user=ALICE, implicit=False):
        pass
    server.write_config()


def test_log_file_is_reopened_after_rotation(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("logs", workers=2, users=[ALICE])
    rotated = server.log_path.with_suffix(".log.1")
    server.log_path.rename(rotated)  # logrotate without copytruncate
    server.cli("reload")
    wait_until(server.log_path.exists, RELOAD_WAIT, what="a new log file")
    before = rotated.read_text()
    # Sessions on both workers: every process writes to the new file now.
    for _ in range(6):
        with session(server, user=ALICE):
            pass
    wait_until(
        lambda: server.log_path.read_text().count("auth.ok") >= 6,
        RELOAD_WAIT,
        what="the logins in the new log file",
    )
    assert "config.reloaded" in server.log_path.read_text()
    assert rotated.read_text() == before  # nothing more went to the rotated file


# ------------------------------------------------------------------ watched files


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "supervised"])
def test_replaced_certificate_is_used_without_a_signal(
    fresh_servers: ServerPool, tmp_path: Path, workers: int
) -> None:
    cert, key = write_certificate(tmp_path / "tls", "first.test")
    server = fresh_servers.create(
        "certs",
        workers=workers,
        sections={"tls": {"cert_file": str(cert), "key_file": str(key)}},
        users=[ALICE],
        start=False,
    )
    trusted = tmp_path / "trusted.pem"  # both certificates, for the helpers' checks
    trusted.write_bytes(cert.read_bytes())
    server.ca_file = trusted
    server.start()
    assert served_name(server, implicit=True) == "first.test"
    held = RawSMTP.connect(server.implicit_port, tls=unverified())
    held.ehlo()
    # A half-copied pair (a key that is not a key) is refused; the old one stays.
    mark = server.log_mark()
    key.write_bytes(b"not a key\n")
    server.wait_for_event("tls.reload_failed", since=mark, timeout=RELOAD_WAIT)
    assert served_name(server, implicit=True) == "first.test"

    write_certificate(tmp_path / "tls", "second.test")
    trusted.write_bytes(trusted.read_bytes() + cert.read_bytes())
    for implicit in (True, False):  # implicit TLS and STARTTLS, every worker

        def renewed(implicit: bool = implicit) -> bool:
            return all(served_name(server, implicit=implicit) == "second.test" for _ in range(4))

        wait_until(
            renewed,
            RELOAD_WAIT,
            interval=0.3,
            what="the new certificate",
        )
    assert server.log_events("tls.reloaded", since=mark)
    # The session opened on the old certificate goes on.
    assert held.command("NOOP").code == 250
    held.close()


def test_replaced_certificate_reaches_the_https_listener_too(
    fresh_servers: ServerPool, tmp_path: Path
) -> None:
    cert, key = write_certificate(tmp_path / "tls", "first.test")
    http_port = free_ports(1)[0]
    server = fresh_servers.create(
        "https",
        sections={
            "tls": {"cert_file": str(cert), "key_file": str(key)},
            "http": {"address": f"{HOST}:{http_port}", "tls": True},
        },
        start=False,
    )
    server.ca_file = cert
    server.start()
    assert https_name(http_port) == "first.test"
    mark = server.log_mark()
    write_certificate(tmp_path / "tls", "second.test")
    wait_until(
        lambda: https_name(http_port) == "second.test",
        RELOAD_WAIT,
        interval=0.3,
        what="the new certificate on HTTPS",
    )
    server.wait_for_event("tls.reloaded", lambda e: e["worker"] == "http", since=mark)


def test_new_dkim_key_signs_without_a_restart(fresh_servers: ServerPool) -> None:
    host = "127.66.9.1"
    port = free_ports(1)[0]
    sink = SMTPSink(host, port).start()
    try:
        extra = (
            '\n[delivery]\nmode = "smarthost"\n'
            f'\n[delivery.smarthost]\nhost = "{host}"\nport = {port}\ntls = "none"\n'
        )
        server = new_server(fresh_servers, "dkim", extra_toml=extra, users=[ALICE])
        submit_one(server, ALICE, ["bob@dest.test"], "before the key")
        [first] = sink.wait_for_messages(1, RELOAD_WAIT)
        assert b"DKIM-Signature" not in first.data
        server.cli("dkim", "generate", "example.test")
        mark = server.log_mark()
        server.wait_for_event("dkim.keys_loaded", since=mark, timeout=RELOAD_WAIT)
        submit_one(server, ALICE, ["bob@dest.test"], "after the key")
        received = sink.wait_for_messages(2, RELOAD_WAIT)
        assert b"DKIM-Signature:" in received[1].data and b"d=example.test" in received[1].data
    finally:
        sink.stop()


# ------------------------------------------------------------------ health


def test_health_cli_and_healthz(fresh_servers: ServerPool) -> None:
    http_port = free_ports(1)[0]
    server = fresh_servers.create(
        "health", workers=1, sections={"http": {"address": f"{HOST}:{http_port}"}}
    )
    result = server.cli("health")
    lines = result.stdout.splitlines()
    assert f"ok    listener {HOST}:{server.starttls_port}: 220 greeting" in "\n".join(lines)
    assert any(
        line.startswith("ok    listener") and str(server.implicit_port) in line for line in lines
    )
    assert any(line.startswith("ok    storage") for line in lines)
    assert any(line.startswith("ok    queue: empty") for line in lines)
    assert any(line.startswith("ok    certificate selfsigned-ecdsa.crt") for line in lines)
    assert lines[-1] == "relaygate is healthy"
    report = json.loads(server.cli("health", "--json").stdout)
    assert report["status"] == "ok"

    with urllib.request.urlopen(f"http://{HOST}:{http_port}/healthz", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        body = json.loads(response.read())
    assert body["status"] == "ok"
    assert {c["name"] for c in body["checks"]} >= {"storage", "queue"}

    # A flood of probes (no token needed) costs one round of checks a second,
    # not one connection to every listener per request.
    mark = server.log_mark()
    started = time.monotonic()

    def probe() -> None:
        with urllib.request.urlopen(f"http://{HOST}:{http_port}/healthz", timeout=10) as reply:
            assert reply.status == 200

    probes = [threading.Thread(target=probe) for _ in range(40)]
    for thread in probes:
        thread.start()
    for thread in probes:
        thread.join(30)
    rounds = int(time.monotonic() - started) + 2
    assert len(server.log_events("connect", since=mark)) <= 2 * rounds

    server.stop()
    down = server.cli("health", check=False)
    assert down.returncode == 1
    assert f"fail  listener {HOST}:{server.starttls_port}: cannot connect" in down.stdout
    assert down.stdout.splitlines()[-1] == "relaygate is NOT healthy"


def test_health_warns_before_the_certificate_expires(
    fresh_servers: ServerPool, tmp_path: Path
) -> None:
    cert, key = write_certificate(tmp_path / "tls", "soon.test", days=5)
    server = fresh_servers.create(
        "expiring", sections={"tls": {"cert_file": str(cert), "key_file": str(key)}}, start=False
    )
    server.ca_file = cert
    server.start()
    result = server.cli("health")
    assert "warn  certificate server.crt: expires in 4 days" in result.stdout
    strict = server.cli("health", "--strict", check=False)
    assert strict.returncode == 1


# ------------------------------------------------------------------ CLI exit statuses


def run_cli(
    config: Path, *args: str, cwd: Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=clean_env(),
        cwd=cwd,
        check=False,
    )


@pytest.mark.sqlite_only
def test_commands_that_only_read_never_make_a_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "nowhere"
    config = tmp_path / "relaygate.toml"
    config.write_text(f'[server]\ndata_dir = "{data_dir}"\n')
    for args in (
        ("messages", "list"),
        ("messages", "show", "abc"),
        ("queue", "list"),
        ("user", "list"),
        ("credential", "list", "a@example.test"),
        ("dkim", "list"),
        ("token", "list"),
        ("stats",),
    ):
        result = run_cli(config, *args, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr == (
            f"relaygate: no relaygate data in {data_dir} (it has no relaygate.db;"
            f" that data_dir is from the config file {config})\n"
        ), args
        assert not data_dir.exists(), args
    health = run_cli(config, "health", cwd=tmp_path)
    assert health.returncode == 1 and "fail  storage: no database at" in health.stdout
    assert not data_dir.exists()


@pytest.mark.sqlite_only
def test_exit_status_one_for_runtime_errors_two_for_usage(tmp_path: Path) -> None:
    config = tmp_path / "relaygate.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    add = run_cli(config, "user", "add", "a@example.test", "--password-stdin", cwd=tmp_path)
    assert add.returncode == 2  # no password on stdin: the user's to correct
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "relaygate",
            "--config",
            str(config),
            "user",
            "add",
            "a@example.test",
            "--password-stdin",
        ],
        input="Exit-pw-81hdq2\n",
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    cases = {
        ("user", "disable", "nobody@example.test"): 1,  # no such account
        ("messages", "show", "nosuchid"): 1,
        ("queue", "retry", "nosuchid"): 1,
        ("token", "revoke", "nosuch"): 1,
        ("user", "add", "not an address", "--password-stdin"): 2,
        ("stats", "--hours", "0"): 2,
        ("reload",): 1,  # no server running
        ("no-such-command",): 2,
    }
    for args, status in cases.items():
        result = run_cli(config, *args, cwd=tmp_path, stdin="Exit-pw-81hdq2\n")
        assert result.returncode == status, (args, result.returncode, result.stderr)
        assert result.stderr.startswith("relaygate: ") or "usage:" in result.stderr, args
        assert "Traceback" not in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nworkers = -1\n")
    result = run_cli(broken, "user", "list", cwd=tmp_path)
    assert result.returncode == 2 and "server.workers" in result.stderr


def test_reload_storm_under_load_loses_nothing(fresh_servers: ServerPool) -> None:
    """Thirty reloads while three clients submit: every message is accepted, no
    session is dropped, and every accepted message is in the message log."""
    server = fresh_servers.create("storm", workers=2, users=[ALICE])
    accepted: list[str] = []
    errors: list[str] = []

    def client(number: int) -> None:
        try:
            with session(server, user=ALICE) as smtp:
                for index in range(20):
                    message = make_message(
                        from_addr=ALICE.address,
                        to=["r@dest.test"],
                        subject=f"storm {number}.{index}",
                    )
                    accepted.append(smtp.send_mail(ALICE.address, ["r@dest.test"], message))
        except Exception as exc:  # reported below, with the test's own assertion
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(30):
        server.signal(signal.SIGHUP)
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(accepted) == 60
    logged = {m["id"] for m in server.messages()}
    assert set(accepted) <= logged
    assert server.process is not None and server.process.poll() is None
    assert server.log_events("config.reloaded")
    assert not server.log_events("worker.exit") and not server.log_events("internal.error")


def test_reload_moves_delivery_to_a_new_route(fresh_servers: ServerPool) -> None:
    """The delivery process takes a changed [delivery] too: after a reload that
    adds a route, the next message for that domain goes to the new smarthost."""
    first_host, second_host = "127.66.9.2", "127.66.9.3"
    port = free_ports(1)[0]
    first = SMTPSink(first_host, port).start()
    second = SMTPSink(second_host, port).start()
    try:

        def delivery(route: bool) -> str:
            text = (
                '\n[delivery]\nmode = "smarthost"\n'
                f'\n[delivery.smarthost]\nhost = "{first_host}"\nport = {port}\ntls = "none"\n'
            )
            if route:
                text += (
                    '\n[[delivery.routes]]\ndomain = "routed.test"\n'
                    f'host = "{second_host}"\nport = {port}\ntls = "none"\n'
                )
            return text

        server = new_server(fresh_servers, "routes", extra_toml=delivery(False), users=[ALICE])
        submit_one(server, ALICE, ["bob@routed.test"], "before the route")
        first.wait_for_messages(1, RELOAD_WAIT)
        server.extra_toml = delivery(True)
        server.write_config()
        server.cli("reload")
        submit_one(server, ALICE, ["bob@routed.test"], "after the route")
        [routed] = second.wait_for_messages(1, RELOAD_WAIT)
        assert b"Subject: after the route" in routed.data
        assert len(first.messages) == 1
    finally:
        first.stop()
        second.stop()
