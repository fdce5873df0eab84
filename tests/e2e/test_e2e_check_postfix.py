"""`relaygate check` against a real Postfix, configured safely and badly.

Each Postfix is a private instance: its own config_directory, queue_directory
and data_directory under the test's tmp directory, started with
``postfix -c DIR start`` on a free port of 127.0.0.1 and always stopped
(``postfix -c DIR stop``, then SIGKILL to its master if it is still there).
It has no SASL (that needs Dovecot), so it advertises no AUTH: the checks
that need a login (smuggling.bare_lf) are not run against it.

The one allowed skip of the suite: where /usr/sbin/postfix is not installed
(the bench setup in /work/shared/bench/postfix/ installs it), these tests skip
with that reason. Starting Postfix needs root.
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
pytestmark = pytest.mark.skipif(
    not POSTFIX.exists(),
    reason="Postfix is not installed (/usr/sbin/postfix); the bench setup"
    " /work/shared/bench/postfix/setup.sh installs it",
)

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
}
SAFE = {
    "smtpd_tls_security_level": "encrypt",  # nothing before STARTTLS
    "smtpd_tls_protocols": ">=TLSv1.2",
    "smtpd_tls_mandatory_protocols": ">=TLSv1.2",
    "mynetworks": "192.0.2.1/32",  # nobody relays without a login
    "smtpd_relay_restrictions": "reject_unauth_destination",
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
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
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
    directory = Path(tempfile.mkdtemp(prefix="relaygate-check-postfix-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def running_postfix(directory: Path, settings: dict[str, str]) -> Iterator[tuple[int, Path]]:
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
        "maillog_file_prefixes": str(directory),
        "maillog_file": str(directory / "maillog"),
    }
    (config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
    (config / "master.cf").write_text(MASTER_CF.format(address=f"{HOST}:{port}"))
    started = postfix(config, "start")
    try:
        assert started.returncode == 0, f"postfix start: {started.stderr} {_log(directory)}"
        wait_until(lambda: _listening(port), 20, 0.1, "Postfix to listen")
        yield port, ca_file
    finally:
        postfix(config, "stop")
        pid_file = queue / "pid" / "master.pid"
        if pid_file.exists():  # stop did not finish: make sure
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
            except (ValueError, IndexError, ProcessLookupError):
                pass


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


def test_safe_postfix_has_no_failure(postfix_dir: Path) -> None:
    with running_postfix(postfix_dir, SAFE) as (port, ca_file):
        result = run_check(
            f"{HOST}:{port}", "--servername", "localhost", "--ca-file", str(ca_file), "--json"
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert statuses(result) == {
        "starttls.offered": "pass",
        "tls.versions": "pass",
        "tls.certificate": "pass",
        "auth.before_tls": "pass",
        "auth.mechanisms": "warn",  # no SASL configured: no AUTH at all
        "relay.unauthenticated": "pass",
        "banner": "pass",
        "limits.size": "pass",
    }, result.stdout
    why = details(result)
    assert why["auth.mechanisms"] == "no AUTH advertised after TLS"
    assert why["relay.unauthenticated"].startswith("before TLS: MAIL refused 530 5.7.0")
    assert "RCPT refused 554 5.7.1" in why["relay.unauthenticated"]
    assert why["limits.size"] == "SIZE 10240000 bytes"


def test_badly_configured_postfix_fails(postfix_dir: Path) -> None:
    with running_postfix(postfix_dir, BAD) as (port, ca_file):
        result = run_check(
            f"{HOST}:{port}", "--servername", "localhost", "--ca-file", str(ca_file), "--json"
        )
        log = _log(postfix_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    found = statuses(result)
    why = details(result)
    assert found["relay.unauthenticated"] == "fail"
    assert why["relay.unauthenticated"] == (
        "before TLS: RCPT to an outside domain accepted: 250 2.1.5 Ok"
    )
    assert found["tls.versions"] == "fail", why["tls.versions"]
    assert why["tls.versions"] == "TLS 1.0 and TLS 1.1 accepted (RFC 8996 forbids them)"
    assert found["banner"] == "warn"
    assert why["banner"].startswith("software version shown: Postfix 3.")
    # The relay probe never sent DATA: nothing was queued.
    assert "queued" not in log and "message-id" not in log.lower()
