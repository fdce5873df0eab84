"""LDAP directory accounts ([ldap], docs/identity.md) against a real slapd.

Each module run starts Debian's slapd on loopback ports (tests/fakes/slapd.py:
a test tree, a test CA for StartTLS and ldaps://) and real relaygate servers
pointed at it; clients are smtplib, swaks and the raw client. What a user
sees is asserted: replies (a directory failure must read exactly like a local
one), what may be sent as whom, the message log, and the log lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.identity_provider import AUDIENCE, ISSUER, JwksServer, SigningKey
from fakes.slapd import SERVICE_DN, SERVICE_PASSWORD, Slapd, make_ca_and_certificate, user_ldif

from .helpers import (
    HOST,
    SENT_SECRETS,
    RawSMTP,
    Server,
    ServerPool,
    TomlValue,
    User,
    b64,
    make_message,
    remember_credentials,
    session,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

DOMAIN = "example.test"
DAVE = User(f"dave@{DOMAIN}", "dave-directory-pw-1")
DAVE_ALIAS = f"d.alt@{DOMAIN}"
ERIN = User(f"erin@{DOMAIN}", "erin-directory-pw-2")  # disabled in the directory
FRANK = User(f"frank@{DOMAIN}", "frank-directory-pw-3")  # for the TTL test
GRACE = User(f"grace@{DOMAIN}", "grace-directory-pw-4")  # deleted in the TTL test
HEIDI = User(f"heidi@{DOMAIN}", "heidi-directory-pw-5")  # password changed in the TTL test
IVAN = User(f"ivan@{DOMAIN}", "ivan-directory-pw-6")  # live session re-checked
SHARED = f"shared@{DOMAIN}"  # two entries carry this mail: ambiguous
ALICE = User(f"alice@{DOMAIN}", "alice-local-pw-7")  # a local account
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure"
REMOTE = "someone@elsewhere.test"

for _user in (DAVE, ERIN, FRANK, GRACE, HEIDI, IVAN, ALICE):
    remember_credentials(_user.address, _user.password)
SENT_SECRETS.add(SERVICE_PASSWORD)  # the service bind password must never be logged


def _tree() -> str:
    return "\n".join(
        [
            user_ldif("dave", DAVE.password, DAVE.address, aliases=(DAVE_ALIAS, "@example.test")),
            user_ldif("erin", ERIN.password, ERIN.address, disabled=True),
            user_ldif("frank", FRANK.password, FRANK.address),
            user_ldif("grace", GRACE.password, GRACE.address),
            user_ldif("heidi", HEIDI.password, HEIDI.address),
            user_ldif("ivan", IVAN.password, IVAN.address),
            user_ldif("twin1", "twin-pw-1", SHARED),
            user_ldif("twin2", "twin-pw-1", SHARED),
        ]
    )


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    directory = Slapd(tmp_path_factory.mktemp("slapd"), _tree())
    with directory:
        yield directory


def ldap_section(slapd: Slapd, **overrides: TomlValue) -> dict[str, TomlValue]:
    section: dict[str, TomlValue] = {
        "url": slapd.url,
        "bind_dn": SERVICE_DN,
        "bind_password_file": str(slapd.service_password_file),
        "base_dn": "ou=people,dc=example,dc=test",
        "filter": "(&(objectClass=inetOrgPerson)(mail={address}))",
        "ca_file": str(slapd.ca_file),
        "alias_attributes": ["mailAlternateAddress"],
        "disabled_filter": "(employeeType=disabled)",
        "cache_ttl": "1m",
        "timeout": 2,
    }
    section.update(overrides)
    return section


@pytest.fixture(scope="module")
def server(servers: ServerPool, slapd: Slapd) -> Server:
    return servers.create(
        "ldap",
        users=[ALICE],
        sections={"ldap": ldap_section(slapd)},
    )


def _smtp(server: Server) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, server.starttls_port, timeout=20)
    client.starttls(context=server.client_context())
    client.ehlo()
    return client


def _auth(server: Server, user: str, password: str, mechanism: str = "PLAIN") -> str:
    """The reply to one login, as "code enhanced text"."""
    remember_credentials(user, password)
    with session(server) as client:
        reply = (
            client.auth_plain(user, password)
            if mechanism == "PLAIN"
            else (client.auth_login(user, password))
        )
        return f"{reply.status} {reply.text}"


# ------------------------------------------------------------------ logging in, sending


def test_directory_user_logs_in_and_sends_as_its_mail_and_alias(server: Server) -> None:
    with _smtp(server) as client:
        client.login(DAVE.address, DAVE.password)  # smtplib picks PLAIN
        for sender in (DAVE.address, DAVE_ALIAS):
            subject = f"ldap from {sender}"
            refused = client.sendmail(
                sender, [REMOTE], make_message(from_addr=sender, to=[REMOTE], subject=subject)
            )
            assert refused == {}
            entry = next(m for m in server.messages() if m["subject"] == subject)
            assert entry["account"] == DAVE.address
            assert entry["mail_from"] == sender
        # Another address, and the "@example.test" value the entry also holds (a
        # directory value never grants a whole domain): refused as for a local account.
        for sender in (f"carol@{DOMAIN}", f"anyone@{DOMAIN}"):
            code, text = client.mail(sender)
            assert code == 553, text
            assert text.startswith(b"5.7.1 ")
            client.rset()
    with _smtp(server) as local:
        local.login(ALICE.address, ALICE.password)
        code, local_text = local.mail(f"anyone@{DOMAIN}")
        assert code == 553
    assert text == local_text  # the same refusal as a local account gets
    events = server.log_events("auth.ok")
    assert any(e["user"] == DAVE.address for e in events)


def test_auth_login_with_smtplib_and_swaks(server: Server) -> None:
    with _smtp(server) as client:
        client.user, client.password = DAVE.address, DAVE.password
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
    swaks = shutil.which("swaks")
    assert swaks is not None, "swaks is missing: .ci/run installs it"
    result = subprocess.run(
        [
            swaks,
            "--server", f"{HOST}:{server.starttls_port}",
            "--tls",
            "--tls-ca-path", str(server.ca_bundle()),
            "--tls-verify",
            "--auth", "LOGIN",
            "--auth-user", DAVE.address,
            "--auth-password", DAVE.password,
            "--from", DAVE_ALIAS,
            "--to", REMOTE,
            "--header", "Subject: ldap swaks",
            "--h-From", DAVE_ALIAS,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    entry = next(m for m in server.messages() if m["subject"] == "ldap swaks")
    assert entry["account"] == DAVE.address


def test_every_failure_reads_like_a_wrong_local_password(server: Server) -> None:
    mark = server.log_mark()
    local = _auth(server, ALICE.address, "wrong-local-pw")
    assert local == AUTH_FAILED
    attempts = {
        "bad_password": (DAVE.address, "wrong-directory-pw"),
        "unknown_user": (f"nobody@{DOMAIN}", "whatever-pw-1"),
        "disabled": (ERIN.address, ERIN.password),  # the right password
        "ambiguous": (SHARED, "twin-pw-1"),
    }
    for reason, (user, password) in attempts.items():
        for mechanism in ("PLAIN", "LOGIN"):
            assert _auth(server, user, password, mechanism) == local, (reason, mechanism)
        events = server.log_events("auth.fail", mark)
        assert any(e["user"] == user and e["reason"] == reason for e in events), reason


def test_filter_injection_finds_nobody(server: Server) -> None:
    mark = server.log_mark()
    # "dav*@..." and "d*@..." would each match dave alone if not escaped, and log in.
    names = (
        "*)(uid=*",
        "*",
        f"*@{DOMAIN}",
        f"dav*@{DOMAIN}",
        f"d*@{DOMAIN}",
        f"dave@{DOMAIN})(uid=*",
    )
    for user in names:
        for password in (DAVE.password, "twin-pw-1"):
            assert _auth(server, user, password) == AUTH_FAILED, user
    fails = server.log_events("auth.fail", mark)
    assert len(fails) == 2 * len(names)
    assert {e["reason"] for e in fails} == {"unknown_user"}
    assert not server.log_events("auth.ok", mark)


def _empty_password_replies(server: Server, user: str) -> tuple[str, str]:
    """(AUTH PLAIN, AUTH LOGIN) with an empty password: the two replies."""
    with session(server) as client:
        payload = b64(f"\0{user}\0")
        SENT_SECRETS.add(payload)
        plain = client.command(f"AUTH PLAIN {payload}")
        assert client.command("AUTH LOGIN").code == 334
        assert client.command(b64(user)).code == 334
        login = client.command("")  # an empty response: the empty password
        return f"{plain.status} {plain.text}", f"{login.status} {login.text}"


def test_empty_password_is_refused_like_a_local_one(server: Server) -> None:
    mark = server.log_mark()
    local = _empty_password_replies(server, ALICE.address)
    assert _empty_password_replies(server, DAVE.address) == local
    assert local[1] == AUTH_FAILED
    reasons = [
        e["reason"] for e in server.log_events("auth.fail", mark) if e["user"] == DAVE.address
    ]
    assert reasons == ["empty_password"]


def test_directory_checks_directly(slapd: Slapd, tmp_path: Path) -> None:
    """The directory module on its own: an empty password never reaches a bind
    (slapd would answer an unauthenticated bind with success), and ``lookup`` (what
    OAuth logins use: search only) tells enabled users from the rest."""
    from relaygate.accounts.directory import Directory
    from relaygate.config import LDAPConfig

    section = ldap_section(slapd)
    config = LDAPConfig(
        url=slapd.url,
        bind_dn=SERVICE_DN,
        bind_password_file=slapd.service_password_file,
        base_dn=str(section["base_dn"]),
        filter=str(section["filter"]),
        ca_file=slapd.ca_file,
        alias_attributes=("mailAlternateAddress",),
        disabled_filter="(employeeType=disabled)",
        timeout=2,
    )

    async def run() -> None:
        directory = Directory(config, asyncio.get_running_loop())
        try:
            assert (await directory.verify(DAVE.address, "")).outcome == "empty_password"
            found = await directory.verify(DAVE.address.upper(), DAVE.password)
            assert found.outcome == "ok" and found.account is not None
            assert found.account.senders == (DAVE_ALIAS, DAVE.address)
            assert found.account.dn == "uid=dave,ou=people,dc=example,dc=test"
            user = await directory.lookup(DAVE.address)
            assert user is not None and user.address == DAVE.address
            assert await directory.lookup(ERIN.address) is None  # disabled
            assert await directory.lookup(SHARED) is None  # two entries
            assert await directory.lookup(f"nobody@{DOMAIN}") is None
            assert await directory.lookup("*") is None
        finally:
            directory.close()

    asyncio.run(run())


def test_scram_fails_for_a_directory_user_like_an_unknown_one(server: Server) -> None:
    with session(server) as client:
        directory = client.auth_scram("SCRAM-SHA-256", DAVE.address, DAVE.password)
    with session(server) as client:
        unknown = client.auth_scram("SCRAM-SHA-256", f"nobody@{DOMAIN}", "nobody-pw-9")
    assert directory.status == unknown.status == "535 5.7.8"
    assert directory.text == unknown.text


# ------------------------------------------------------------------ the cache TTL


def test_changes_in_the_directory_apply_within_the_cache_ttl(
    servers: ServerPool, slapd: Slapd
) -> None:
    ttl = 3.0
    server = servers.create("ttl", sections={"ldap": ldap_section(slapd, cache_ttl="3s")})
    for user in (FRANK, GRACE, HEIDI, IVAN):
        assert _auth(server, user.address, user.password) == "235 2.7.0 Authentication successful"
    verified = time.monotonic()
    live = RawSMTP.connect(server.implicit_port, tls=server.client_context())
    kept = RawSMTP.connect(server.implicit_port, tls=server.client_context())
    try:
        live.ehlo()
        live.login(IVAN.address, IVAN.password)
        kept.ehlo()
        kept.login(HEIDI.address, HEIDI.password)
        slapd.disable("frank")
        slapd.delete("grace")
        slapd.set_password("heidi", "heidi-new-pw-8")
        slapd.disable("ivan")
        remember_credentials(HEIDI.address, "heidi-new-pw-8")
        mark = server.log_mark()
        # Within the TTL: the verified logins still hold (from the cache).
        for user in (FRANK, GRACE, HEIDI):
            assert _auth(server, user.address, user.password).startswith("235"), user
        assert time.monotonic() - verified < ttl, "the machine was too slow for this TTL"
        assert all(e.get("cached") == "True" for e in server.log_events("auth.ok", mark))
        live.transaction(IVAN.address, [REMOTE])
        assert live.command("RSET").code == 250
        # After it: refused, each like a wrong password.
        time.sleep(max(0.0, ttl - (time.monotonic() - verified)) + 0.2)
        mark = server.log_mark()
        for user in (FRANK, GRACE, HEIDI):
            assert _auth(server, user.address, user.password) == AUTH_FAILED, user
        assert _auth(server, HEIDI.address, "heidi-new-pw-8").startswith("235")
        reasons = {e["user"]: e["reason"] for e in server.log_events("auth.fail", mark)}
        assert reasons == {
            FRANK.address: "disabled",
            GRACE.address: "unknown_user",
            HEIDI.address: "bad_password",
        }
        # The live session is re-checked at its next MAIL: logged out.
        reply = live.command(f"MAIL FROM:<{IVAN.address}>")
        assert reply.status == "530 5.7.0", str(reply)
        server.wait_for_event("auth.revoked", lambda e: e["user"] == IVAN.address, mark)
        # Still enabled (only its password changed): the session goes on.
        kept.transaction(HEIDI.address, [REMOTE])
        assert [e["user"] for e in server.log_events("auth.revoked", mark)] == [IVAN.address]
    finally:
        live.close()
        kept.close()
        slapd.enable("frank")
        slapd.enable("ivan")


# ------------------------------------------------------------------ the directory away


def test_directory_down_gives_a_temporary_failure_and_local_accounts_still_work(
    servers: ServerPool, slapd: Slapd
) -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        closed_port = probe.getsockname()[1]  # nothing listens once closed
    server = servers.create(
        "down",
        users=[ALICE],
        sections={"ldap": ldap_section(slapd, url=f"ldap://{HOST}:{closed_port}")},
    )
    mark = server.log_mark()
    assert _auth(server, DAVE.address, DAVE.password) == AUTH_TEMPORARY
    event = server.wait_for_event("ldap.unreachable", since=mark)
    assert event["user"] == DAVE.address and "reason" in event
    with session(server, user=ALICE) as client:
        client.send_mail(
            ALICE.address,
            [REMOTE],
            make_message(from_addr=ALICE.address, to=[REMOTE], subject="still"),
        )
    assert "still" in server.subjects()


class _Silent:
    """A 'directory' that accepts connections and never answers (nor reads)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("start_tls", [True, False])
def test_a_directory_that_never_answers_holds_logins_a_bounded_time(
    servers: ServerPool, slapd: Slapd, start_tls: bool
) -> None:
    silent = _Silent()
    try:
        server = servers.create(
            f"silent-{start_tls}",
            users=[ALICE],
            sections={
                "ldap": ldap_section(
                    slapd, url=f"ldap://{HOST}:{silent.port}", start_tls=start_tls, timeout=1
                )
            },
        )
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            stalled = [
                pool.submit(_auth, server, f"user{i}@{DOMAIN}", f"stall-pw-{i}") for i in range(6)
            ]
            time.sleep(0.3)  # the directory checks are under way (and stuck)
            local_started = time.monotonic()
            assert _auth(server, ALICE.address, ALICE.password).startswith("235")
            local_took = time.monotonic() - local_started
            replies = [f.result(timeout=30) for f in stalled]
            took = time.monotonic() - started
        assert replies == [AUTH_TEMPORARY] * 6
        assert local_took < 2.0, local_took  # local logins do not wait for the directory
        assert took < 10.0, took  # three times the 1 s timeout, plus the queue for threads
        assert silent.held, "relaygate never connected"
    finally:
        silent.close()


# ------------------------------------------------------------------ TLS to the directory


def test_starttls_and_ldaps_verify_the_directory_certificate(
    servers: ServerPool, slapd: Slapd, tmp_path: Path
) -> None:
    ldaps = servers.create("ldaps", sections={"ldap": ldap_section(slapd, url=slapd.ldaps_url)})
    assert _auth(ldaps, DAVE.address, DAVE.password).startswith("235")
    # A CA that did not sign slapd's certificate: no bind is attempted at all.
    other = tmp_path / "other-ca"
    other.mkdir()
    wrong_ca, _, _ = make_ca_and_certificate(other)
    for name, url in (("wrongca-starttls", slapd.url), ("wrongca-ldaps", slapd.ldaps_url)):
        server = servers.create(
            name, sections={"ldap": ldap_section(slapd, url=url, ca_file=str(wrong_ca))}
        )
        mark = server.log_mark()
        assert _auth(server, DAVE.address, DAVE.password) == AUTH_TEMPORARY, name
        event = server.wait_for_event("ldap.unreachable", since=mark)
        assert "certificate" in event["reason"].lower() or "ssl" in event["reason"].lower(), event


# ------------------------------------------------------------------ throttling


def test_parallel_guessing_of_a_directory_password_is_throttled(
    servers: ServerPool, slapd: Slapd
) -> None:
    server = servers.create(
        "throttle",
        sections={
            "ldap": ldap_section(slapd),
            "auth_throttle": {"account_per_hour": 5},
        },
    )
    guesses = [f"guess-{i}-pw" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda p: _auth(server, DAVE.address, p), guesses))
    failed = [r for r in replies if r == AUTH_FAILED]
    throttled = [r for r in replies if r.startswith("454 4.7.0 Too many failed logins")]
    assert len(failed) == 5, replies  # exactly the limit got checked, however parallel
    assert len(throttled) == 7, replies
    # Now even the right password is refused without being checked.
    assert _auth(server, DAVE.address, DAVE.password).startswith("454 4.7.0 Too many")
    wait_until(lambda: len(server.log_events("auth.throttled")) >= 8, 5.0, what="throttled")


# ------------------------------------------------------------------ configuration


def test_config_errors_are_one_line_each(tmp_path: Path, slapd: Slapd) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\ndata_dir = "data"\n\n[ldap]\nurl = "http://ldap.example.test"\n'
        'bind_dn = "cn=x"\nbind_password_file = "missing.password"\nbase_dn = "dc=x"\n'
        'filter = "(mail=alice)"\ncache_ttl = "soon"\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "relaygate", "config", "check", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines == [
        f"relaygate: {path}: ldap.url: must be a ldap:// or ldaps:// URL",
        f"relaygate: {path}: ldap.bind_password_file: cannot read {tmp_path / 'missing.password'}",
        f"relaygate: {path}: ldap.filter: must contain {{address}} (the login name)",
        f"relaygate: {path}: ldap.cache_ttl: not a duration: 'soon': use a duration such as"
        " 30d, 12h, 90m or 45s (units: s, m, h, d, w)",
    ], result.stderr
    path.write_text(
        f'[server]\ndata_dir = "data"\n\n[ldap]\nurl = "ldap://ldap.example.test"\n'
        f'bind_dn = "cn=x"\nbind_password_file = "{slapd.service_password_file}"\n'
        'base_dn = "dc=x"\nstart_tls = false\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "relaygate", "config", "check", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"relaygate: {path}: ldap.start_tls: false would send passwords in clear to a host"
        " that is not loopback: use start_tls = true or an ldaps:// URL"
    ]


def test_the_test_directory_refuses_binds_without_tls(slapd: Slapd) -> None:
    """So the logins above prove relaygate used StartTLS: slapd here refuses clear binds."""
    result = subprocess.run(
        ["ldapwhoami", "-x", "-H", slapd.url, "-D", SERVICE_DN, "-w", SERVICE_PASSWORD],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Confidentiality required" in result.stderr, result.stderr


# ------------------------------------------------------------------ OAuth tokens


def test_an_oauth_token_may_name_a_directory_user(servers: ServerPool, slapd: Slapd) -> None:
    """[oauth] + [ldap]: a token's address claim may name an enabled directory user
    (looked up with the service account; the token is the proof, no bind)."""
    key = SigningKey.rsa("ldap-k1")
    with JwksServer([key]) as idp:
        server = servers.create(
            "oauth-ldap",
            sections={
                "ldap": ldap_section(slapd),
                "oauth": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url},
            },
        )

        def xoauth2(address: str) -> str:
            token = key.token(email=address)
            SENT_SECRETS.add(token)
            return b64(f"user={address}\x01auth=Bearer {token}\x01\x01")

        mark = server.log_mark()
        with session(server) as client:
            reply = client.command(f"AUTH XOAUTH2 {xoauth2(DAVE.address)}")
            assert reply.status == "235 2.7.0", str(reply)
            message = make_message(from_addr=DAVE_ALIAS, to=[REMOTE], subject="ldap oauth")
            client.send_mail(DAVE_ALIAS, [REMOTE], message)
        assert server.message(queue_id_of_subject(server, "ldap oauth"))["account"] == DAVE.address
        for address in (ERIN.address, SHARED, f"nobody@{DOMAIN}"):  # disabled, two, none
            with session(server) as client:
                reply = client.command(f"AUTH XOAUTH2 {xoauth2(address)}")
                if reply.code == 334:  # the error challenge first
                    reply = client.command("")
                assert reply.status == "535 5.7.8", (address, str(reply))
        reasons = [e["reason"] for e in server.log_events("auth.fail", mark)]
        assert reasons == ["unknown_account"] * 3


def queue_id_of_subject(server: Server, subject: str) -> str:
    return str(next(m for m in server.messages() if m["subject"] == subject)["id"])
