"""`relaygate check` against a real Postfix, configured safely and badly.

Each Postfix is a private instance: its own config_directory, queue_directory
and data_directory under the test's tmp directory, started with
``postfix -c DIR start`` on a free port of 127.0.0.1 and always stopped
(``postfix -c DIR stop``, then SIGKILL to its master if it is still there).
Logins go to a private Dovecot (SASL only: no mail protocols, a passwd-file
with one account, its auth service on a free loopback port), so the AUTH
checks and the bare-LF smuggling probe run against Postfix too; the probe's
messages go to Postfix's ``discard`` transport, never anywhere else.

Postfix and Dovecot are installed by .ci/run (and by the bench setup in
/work/shared/bench/postfix/): where either is missing these tests fail with
that reason, never skip, like the suite's other real peers. Starting them needs
root, as CI has.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .check_helpers import details, run_check, statuses
from .helpers import HOST, free_ports, wait_until

POSTFIX = Path("/usr/sbin/postfix")
DOVECOT = Path("/usr/sbin/dovecot")
USER = "probe@example.test"
PASSWORD = "Probe-pw-4Kd8sWq2"
DOVECOT_CONF = """\
protocols =
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
ssl = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {base}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""

MASTER_CF = """\
{address} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

COMMON = {
    "compatibility_level": "3.6",
    "myhostname": "postfix-check.example.test",
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "mydestination": "",
    "alias_maps": "",
    "alias_database": "",
    "local_recipient_maps": "",
    "message_size_limit": "10240000",
    "smtpd_sasl_auth_enable": "yes",
    "smtpd_sasl_type": "dovecot",
    # mail that is accepted goes nowhere
    "default_transport": "discard",
    "relay_transport": "discard",
}
SAFE = {
    "smtpd_tls_security_level": "encrypt",  # nothing before STARTTLS
    "smtpd_tls_protocols": ">=TLSv1.2",
    "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
    "mynetworks": "192.0.2.1/32",  # nobody relays without a login
    "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
    "smtpd_tls_auth_only": "yes",
    "smtpd_forbid_bare_newline": "yes",  # the CVE-2023-51764 fix
    "smtpd_banner": "$myhostname ESMTP",
}
BAD = {
    "smtpd_tls_security_level": "may",
    "smtpd_tls_auth_only": "no",
    "smtpd_tls_protocols": ">=TLSv1",  # TLS 1.0 and 1.1 allowed again
    "smtpd_tls_mandatory_protocols": ">=TLSv1",
    "smtpd_tls_ciphers": "medium",
    "tls_medium_cipherlist": "DEFAULT:@SECLEVEL=0",
    "mynetworks": "127.0.0.0/8",  # everyone on this host may relay: an open relay here
    "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated,"
    " reject_unauth_destination",
    "smtpd_forbid_bare_newline": "no",  # Postfix 3.7's default: bare LF ends lines
    "smtpd_banner": "$myhostname ESMTP $mail_name $mail_version",
}


def write_certificate(directory: Path) -> Path:
    """A self-signed certificate for localhost and 127.0.0.1; key and chain in one
    file (smtpd_tls_chain_files); returns the certificate for --ca-file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "chain.pem").write_bytes(key_pem + pem)
    os.chmod(directory / "chain.pem", 0o600)
    (directory / "cert.pem").write_bytes(pem)
    return directory / "cert.pem"


def postfix(config: Path, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POSTFIX), "-c", str(config), action],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def postfix_dir() -> Iterator[Path]:
    """Not under pytest's tmp_path: its parents are private to root, and Postfix's
    daemons run as the postfix user."""
    missing = [str(p) for p in (POSTFIX, DOVECOT) if not p.exists()]
    if missing:
        pytest.fail(
            f"not installed: {', '.join(missing)} (apt-get install postfix dovecot-core;"
            " .ci/run does)"
        )
    directory = Path(tempfile.mkdtemp(prefix="relaygate-check-postfix-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def dovecot_auth(postfix_dir: Path) -> Iterator[int]:
    """A Dovecot that only authenticates (USER, PASSWORD); its port."""
    base = postfix_dir / "dovecot"
    base.mkdir()
    base.chmod(0o755)
    (base / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    (base / "users").chmod(0o644)
    (port,) = free_ports(1)
    conf = base / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(base=base, port=port))
    try:
        # It forks into the background: its output goes to a file, never to a pipe
        # this process would wait on.
        with open(base / "start.log", "wb") as out:
            started = subprocess.run(
                [str(DOVECOT), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=30,
                check=False,
            )
        assert started.returncode == 0, f"dovecot: {(base / 'start.log').read_text()}"
        wait_until(lambda: _accepts(port), 20, 0.1, "Dovecot auth to listen")
        yield port
    finally:
        subprocess.run(
            [str(DOVECOT), "-c", str(conf), "stop"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
        _kill_from(base / "run" / "master.pid")


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def _kill_from(pid_file: Path) -> None:
    """A daemon that outlived its stop command: SIGKILL (its pid file is gone otherwise)."""
    if not pid_file.exists():
        return
    try:
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    except (ValueError, IndexError, ProcessLookupError):
        pass


@contextmanager
def running_postfix(
    directory: Path, settings: dict[str, str], auth_port: int
) -> Iterator[tuple[int, Path]]:
    """(port, CA file) of a private Postfix, stopped whatever happens."""
    assert os.geteuid() == 0, "starting Postfix needs root"
    config, queue, data = directory / "conf", directory / "queue", directory / "data"
    for path in (config, queue, data):
        path.mkdir(parents=True)
    shutil.chown(data, "postfix")
    ca_file = write_certificate(config)
    (port,) = free_ports(1)
    main = {
        **COMMON,
        **settings,
        "queue_directory": str(queue),
        "data_directory": str(data),
        "smtpd_tls_chain_files": str(config / "chain.pem"),
        "smtpd_sasl_path": f"inet:{HOST}:{auth_port}",
        "maillog_file_prefixes": str(directory),
        "maillog_file": str(directory / "maillog"),
    }
    (config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
    (config / "master.cf").write_text(MASTER_CF.format(address=f"{HOST}:{port}"))
    try:
        started = postfix(config, "start")
        assert started.returncode == 0, f"postfix start: {started.stderr} {_log(directory)}"
        wait_until(lambda: _listening(port), 20, 0.1, "Postfix to listen")
        yield port, ca_file
    finally:
        postfix(config, "stop")
        _kill_from(queue / "pid" / "master.pid")


def _log(directory: Path) -> str:
    path = directory / "maillog"
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        try:
            sock.connect((HOST, port))
        except OSError:
            return False
        return sock.recv(4).startswith(b"220")


def check_postfix(port: int, ca_file: Path) -> subprocess.CompletedProcess[str]:
    return run_check(
        f"{HOST}:{port}",
        "--servername",
        "localhost",
        "--ca-file",
        str(ca_file),
        "--user",
        USER,
        "--password-stdin",
        "--json",
        stdin=PASSWORD + "\n",
    )


def test_safe_postfix_has_no_failure(postfix_dir: Path, dovecot_auth: int) -> None:
    with running_postfix(postfix_dir, SAFE, dovecot_auth) as (port, ca_file):
        result = check_postfix(port, ca_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert statuses(result) == {
        "starttls.offered": "pass",
        "tls.versions": "pass",
        "tls.certificate": "pass",
        "auth.before_tls": "pass",
        "auth.mechanisms": "warn",  # Dovecot here offers PLAIN LOGIN, no SCRAM
        "relay.unauthenticated": "pass",
        "smuggling.bare_lf": "pass",
        "banner": "pass",
        "limits.size": "pass",
    }, result.stdout
    why = details(result)
    assert why["auth.mechanisms"] == "no SCRAM mechanism offered (after TLS: PLAIN LOGIN)"
    assert why["relay.unauthenticated"].startswith("before TLS: MAIL refused 530 5.7.0")
    assert "RCPT refused 554 5.7.1" in why["relay.unauthenticated"]
    assert why["smuggling.bare_lf"].startswith("bare LF never ends the data: <LF>.<LF> ")
    assert why["limits.size"] == "SIZE 10240000 bytes"
    assert PASSWORD not in result.stdout + result.stderr


def test_badly_configured_postfix_fails(postfix_dir: Path, dovecot_auth: int) -> None:
    with running_postfix(postfix_dir, BAD, dovecot_auth) as (port, ca_file):
        result = check_postfix(port, ca_file)
        log = _log(postfix_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    found = statuses(result)
    why = details(result)
    assert found == {
        "starttls.offered": "pass",
        "tls.versions": "fail",
        "tls.certificate": "pass",
        "auth.before_tls": "fail",
        "auth.mechanisms": "fail",
        "relay.unauthenticated": "fail",
        "smuggling.bare_lf": "fail",
        "banner": "warn",
        "limits.size": "pass",
    }, why
    assert why["tls.versions"] == "TLS 1.0 and TLS 1.1 accepted (RFC 8996 forbids them)"
    assert why["auth.before_tls"] == "AUTH PLAIN LOGIN advertised before TLS"
    assert why["relay.unauthenticated"] == (
        "before TLS: RCPT to an outside domain accepted: 250 2.1.5 Ok"
    )
    # CVE-2023-51764: Postfix 3.7 without smtpd_forbid_bare_newline ends the data at <LF>.<LF>.
    assert why["smuggling.bare_lf"].startswith("<LF>.<LF> ended the data: the text after it")
    assert why["banner"].startswith("software version shown: Postfix 3.")
    # The relay probe never sent DATA: the one message Postfix took is the probe's,
    # from the login to itself (discarded).
    assert log.count("message-id=") == 1, log
    assert "relay-test@example.net" not in log.split("message-id=")[1]
