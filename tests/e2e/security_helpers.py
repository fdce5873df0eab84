"""Helpers for the security end-to-end tests: SCRAM transcripts, app credentials,
smtplib logins from chosen source addresses, sending-counter surgery, timing
statistics and fail2ban-regex.

Built on ``helpers`` (servers, ``RawSMTP``); everything here is bounded in time
and talks only to 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import shutil
import smtplib
import sqlite3
import ssl
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import scramp

from .helpers import (
    HOST,
    RawSMTP,
    Reply,
    Server,
    b64,
    remember_credentials,
    session,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
FAIL2BAN_FILTER = REPO / "contrib" / "fail2ban" / "filter.d" / "relaygate.conf"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
CLIENT_TIMEOUT = 10.0
SECRET = re.compile(r"secret \(shown only now\): (rgc_[A-Za-z0-9_-]{43})\s*$", re.MULTILINE)

# Ciphers that make a TLS 1.2 handshake pick one of the server's two certificates.
CERT_CIPHERS = {
    "rsa": "ECDHE-RSA-AES128-GCM-SHA256",
    "ecdsa": "ECDHE-ECDSA-AES128-GCM-SHA256",
}


# ------------------------------------------------------------------ TLS


def cert_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text(encoding="ascii"))


def tls12_context(server: Server, kind: str) -> ssl.SSLContext:
    """A TLS 1.2 client context that can only accept the ``kind`` ("rsa"/"ecdsa") cert."""
    context = server.client_context(max_version=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers(CERT_CIPHERS[kind])
    return context


def peer_binding(client: RawSMTP) -> bytes:
    """tls-server-end-point data (RFC 5929) for the certificate this client saw."""
    assert isinstance(client.sock, ssl.SSLSocket), "not a TLS connection"
    der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).digest()


def peer_der(client: RawSMTP) -> bytes:
    assert isinstance(client.sock, ssl.SSLSocket), "not a TLS connection"
    der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


# ------------------------------------------------------------------ SCRAM


@dataclass
class ScramRun:
    """Every reply of one SCRAM exchange, and what the server-first said."""

    replies: list[Reply] = field(default_factory=list)
    server_first: dict[str, str] = field(default_factory=dict)
    client_nonce: str = ""

    @property
    def last(self) -> Reply:
        return self.replies[-1]

    @property
    def codes(self) -> list[int]:
        return [reply.code for reply in self.replies]

    @property
    def salt(self) -> bytes:
        return base64.b64decode(self.server_first["s"])


def _attributes(message: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in message.split(","))


def scram_exchange(
    client: RawSMTP,
    mechanism: str,
    user: str,
    password: str,
    *,
    binding: bytes | None = None,
    initial_response: bool = True,
) -> ScramRun:
    """Run SCRAM with scramp as the client, keeping every reply.

    For ``-PLUS`` the binding defaults to the certificate this connection saw.
    A ``binding`` given with a plain SCRAM-SHA-256 makes scramp send the GS2
    flag "y": "I could bind, but I think you cannot" (RFC 5802 section 6).
    """
    remember_credentials(user, password)
    if binding is None and mechanism.upper().endswith("-PLUS"):
        binding = peer_binding(client)
    channel_binding = None if binding is None else ("tls-server-end-point", binding)
    scram = scramp.ScramClient([mechanism], user, password, channel_binding=channel_binding)
    client_first = scram.get_client_first()
    run = ScramRun(client_nonce=_attributes(client_first.split(",", 2)[2])["r"])
    if initial_response:
        reply = client.command(f"AUTH {mechanism} {b64(client_first)}")
    else:
        reply = client.command(f"AUTH {mechanism}")
        run.replies.append(reply)
        if reply.code != 334:
            return run
        assert reply.text == "", str(reply)
        reply = client.command(b64(client_first))
    run.replies.append(reply)
    if reply.code != 334:
        return run
    server_first = base64.b64decode(reply.text).decode()
    run.server_first = _attributes(server_first)
    scram.set_server_first(server_first)
    reply = client.command(b64(scram.get_client_final()))
    run.replies.append(reply)
    if reply.code != 334:
        return run
    scram.set_server_final(base64.b64decode(reply.text).decode())  # the server proves itself
    run.replies.append(client.command(""))
    return run


# ------------------------------------------------------------------ app credentials


def new_credential(server: Server, address: str, name: str, *options: str) -> str:
    """``credential add``; the secret it prints once (remembered as a secret)."""
    out = server.quick_cli("credential", "add", address, "--name", name, *options).stdout.decode()
    found = SECRET.findall(out)
    assert len(found) == 1, out
    secret: str = found[0]
    assert out.count(secret) == 1, "the secret is printed exactly once"
    remember_credentials(address, secret)
    return secret


# ------------------------------------------------------------------ smtplib


@contextlib.contextmanager
def smtplib_session(
    server: Server, *, source: str | None = None, implicit: bool = True
) -> Iterator[smtplib.SMTP]:
    """A greeted smtplib session over TLS (implicit, or STARTTLS) from ``source``."""
    context = server.client_context()
    source_address = (source, 0) if source else None
    smtp: smtplib.SMTP
    if implicit:
        smtp = smtplib.SMTP_SSL(
            HOST,
            server.implicit_port,
            "client.test",
            timeout=CLIENT_TIMEOUT,
            context=context,
            source_address=source_address,
        )
    else:
        smtp = smtplib.SMTP(
            HOST,
            server.starttls_port,
            "client.test",
            timeout=CLIENT_TIMEOUT,
            source_address=source_address,
        )
    try:
        smtp.ehlo()
        if not implicit:
            smtp.starttls(context=context)
            smtp.ehlo()
        yield smtp
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()


def smtplib_auth(smtp: smtplib.SMTP, mechanism: str, user: str, password: str) -> int:
    """AUTH with exactly ``mechanism`` (PLAIN or LOGIN); the reply code."""
    remember_credentials(user, password)
    smtp.user, smtp.password = user, password
    authobject = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}[mechanism.upper()]
    try:
        code, _ = smtp.auth(mechanism, authobject)
    except smtplib.SMTPAuthenticationError as exc:
        return exc.smtp_code
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    return code


def raw_login(
    server: Server, user: str, password: str, *, source: str | None = None, implicit: bool = True
) -> Reply:
    """One AUTH PLAIN on a fresh connection from ``source``; its reply."""
    with session(server, source=source, implicit=implicit) as client:
        return client.auth_plain(user, password)


# ------------------------------------------------------------------ sending counters


def utc_window_keys(now: float) -> tuple[str, str]:
    """("h2026112914", "d20261129"): the fixed UTC hour and day windows of ``now``."""
    t = time.gmtime(now)
    return time.strftime("h%Y%m%d%H", t), time.strftime("d%Y%m%d", t)


def avoid_window_edge(period: float, margin: float) -> None:
    """If a fixed UTC window of ``period`` seconds ends within ``margin``, wait it out.

    Limits count per fixed window ("this UTC hour", "this minute"): a test that
    straddled the end would see its counts vanish half-way.
    """
    left = period - time.time() % period
    if left < margin:
        time.sleep(left + 0.1)


@contextlib.contextmanager
def database(server: Server) -> Iterator[sqlite3.Connection]:
    """The server's SQLite database, opened beside the running server."""
    db = sqlite3.connect(server.data_dir / "relaygate.db", timeout=10.0, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def counters(server: Server, scope: str) -> dict[str, tuple[int, int, int]]:
    """window -> (messages, recipients, new recipients) for ``scope``."""
    with database(server) as db:
        rows = db.execute(
            "SELECT window, messages, recipients, new_recipients FROM send_counters"
            " WHERE scope = ?",
            (scope,),
        ).fetchall()
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def move_window(server: Server, scope: str, old: str, new: str) -> None:
    """Re-label a counter row as belonging to another window (``old`` -> ``new``)."""
    with database(server) as db:
        changed = db.execute(
            "UPDATE send_counters SET window = ? WHERE scope = ? AND window = ?",
            (new, scope, old),
        ).rowcount
    assert changed == 1, f"no counter row {scope} {old}"


# ------------------------------------------------------------------ connections


def greeting(server: Server, *, source: str | None = None) -> Reply:
    """The banner a fresh plaintext connection to the STARTTLS port gets."""
    with RawSMTP.connect(server.starttls_port, source=source, timeout=5.0) as client:
        return client.greeting


def open_until_greeted(server: Server, source: str, timeout: float = 5.0) -> RawSMTP:
    """A connection that got 220 (retrying while earlier closes are still being counted)."""
    result: list[RawSMTP] = []

    def attempt() -> bool:
        client = RawSMTP.connect(server.starttls_port, source=source, timeout=5.0)
        if client.greeting.code == 220:
            result.append(client)
            return True
        client.close()
        return False

    wait_until(attempt, timeout, 0.05, f"a 220 greeting for {source}")
    return result[0]


# ------------------------------------------------------------------ configuration


def use_default_password_hashing(server: Server) -> None:
    """Drop the cheap ``[password_hash]`` test settings: argon2id at relaygate's defaults.

    Call before adding users (their hashes carry the cost) and before starting.
    """
    kept: list[str] = []
    skipping = False
    for line in server.config_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            skipping = line.strip() == "[password_hash]"
        if not skipping:
            kept.append(line)
    server.config_path.write_text("\n".join(kept) + "\n", encoding="utf-8")

    from relaygate.config import PasswordHashConfig, load_config

    loaded = load_config(server.config_path).password_hash
    assert loaded == PasswordHashConfig(), loaded


# ------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class Spread:
    q1: float
    median: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def __str__(self) -> str:
        return f"median {self.median * 1000:.1f} ms, IQR {self.q1 * 1000:.1f}-{self.q3 * 1000:.1f}"


def spread(samples: Sequence[float]) -> Spread:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Spread(q1, median, q3)


# ------------------------------------------------------------------ fail2ban


def fail2ban_regex_path() -> str | None:
    return shutil.which("fail2ban-regex")


@dataclass(frozen=True)
class Fail2banResult:
    lines: int
    ignored: int
    matched: int
    missed: int
    output: str


_SUMMARY = re.compile(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed")


def _fail2ban_regex(log: Path | str, *options: str) -> str:
    """``log``: a file, or a journal source ("systemd-journal[journalfiles=...]")."""
    program = fail2ban_regex_path()
    assert program is not None, "fail2ban-regex is not installed"
    result = subprocess.run(
        [program, *options, str(log), str(FAIL2BAN_FILTER)],  # the filter by absolute path
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def fail2ban_summary(log: Path | str, *options: str) -> Fail2banResult:
    """fail2ban-regex with our filter on ``log``: its line counts."""
    output = _fail2ban_regex(log, *options)
    match = _SUMMARY.search(output)
    assert match is not None, output
    lines, ignored, matched, missed = (int(g) for g in match.groups())
    return Fail2banResult(lines, ignored, matched, missed, output)


def fail2ban_hosts(log: Path | str, *options: str) -> list[str]:
    """The address fail2ban would hold responsible for each matched line, in order."""
    output = _fail2ban_regex(log, "-o", "ip", *options)
    return [line.strip() for line in output.splitlines() if line.strip()]


# ------------------------------------------------------------------ the journal

JOURNAL_REMOTE = Path("/lib/systemd/systemd-journal-remote")
JAIL = REPO / "contrib" / "fail2ban" / "jail.d" / "relaygate.conf"


def jail_setting(name: str) -> str:
    """A setting of the shipped jail (``backend``, ``journalmatch``, ...)."""
    for line in JAIL.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name and not line.lstrip().startswith("#"):
            return value.strip()
    raise AssertionError(f"{JAIL} has no {name} setting")


def write_journal(path: Path, entries: Sequence[tuple[str, str]]) -> None:
    """A journal file holding ``(unit, message)`` entries, as journald would
    store a service's standard error: systemd-journal-remote turns the journal
    export format into a real journal file, which fail2ban's systemd backend reads."""
    assert JOURNAL_REMOTE.exists(), f"{JOURNAL_REMOTE} is not installed (systemd-journal-remote)"
    now = int(time.time() * 1_000_000)
    export = []
    for index, (unit, message) in enumerate(entries):
        name = unit.removesuffix(".service")
        fields = {
            "__REALTIME_TIMESTAMP": str(now + index),
            "__MONOTONIC_TIMESTAMP": str(now + index),
            "_BOOT_ID": "0123456789abcdef0123456789abcdef",
            "_HOSTNAME": "mail-host",
            "_SYSTEMD_UNIT": unit,
            "SYSLOG_IDENTIFIER": name,
            "_PID": str(1000 + index % 7),
            "PRIORITY": "6",
            "MESSAGE": message,
        }
        assert "\n" not in message and "\n" not in "".join(fields.values())
        export.append("".join(f"{k}={v}\n" for k, v in fields.items()) + "\n")
    result = subprocess.run(
        [str(JOURNAL_REMOTE), f"--output={path}", "-"],
        input="".join(export),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and path.is_file(), result.stderr
    assert f"writing {len(entries)} entries" in result.stderr, result.stderr


def journal_source(path: Path) -> str:
    """How fail2ban-regex names a journal file (give the jail's journalmatch with -m)."""
    return f'systemd-journal[journalfiles="{path}"]'
