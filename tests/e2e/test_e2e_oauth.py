"""OAUTHBEARER and XOAUTH2 end to end: a real server with [oauth], its signing
keys served over HTTP by a stand-in identity provider on 127.0.0.1, and real
clients (a raw socket client over STARTTLS and implicit TLS, aiosmtplib, msmtp).

Every token sent is noted as a secret: the pool's teardown fails the module
if any server log holds one.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.message
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtplib
import pytest

from fakes.identity_provider import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    SigningKey,
    claims,
    hmac_token,
    unsigned_token,
)

from .helpers import (
    HOST,
    SENT_SECRETS,
    RawSMTP,
    Reply,
    Server,
    ServerPool,
    User,
    auth_mechanisms,
    b64,
    check_stored,
    make_message,
    queue_id_of,
    session,
)

ALICE = User("alice@oauth.test", "Alice-oauth-pw-7Hs2kQ")
DORA = User("dora@oauth.test", "Dora-oauth-pw-4Lp9xW", disabled=True)
RCPT = "rcpt@example.net"
RSA = SigningKey.rsa("k1")
EC = SigningKey.ec("k2")
CLIENT_TIMEOUT = 30


def _noted(token: str) -> str:
    SENT_SECRETS.add(token)
    return token


def _oauthbearer(token: str, user: str | None = ALICE.address) -> str:
    authzid = f"a={user}" if user else ""
    return b64(f"n,{authzid},\x01host=localhost\x01port=587\x01auth=Bearer {token}\x01\x01")


def _xoauth2(token: str, user: str = ALICE.address) -> str:
    return b64(f"user={user}\x01auth=Bearer {token}\x01\x01")


def token(key: SigningKey = RSA, **kwargs: object) -> str:
    kwargs.setdefault("email", ALICE.address)
    return _noted(key.token(**kwargs))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def idp() -> Iterator[JwksServer]:
    with JwksServer([RSA, EC]) as server:
        yield server


def _oauth_section(idp: JwksServer) -> dict[str, str | float | list[str]]:
    return {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_url": idp.url,
        "jwks_min_interval": 1,
        "scope": "openid email",
    }


@pytest.fixture(scope="module")
def server(servers: ServerPool, idp: JwksServer) -> Server:
    return servers.create("oauth", users=[ALICE, DORA], sections={"oauth": _oauth_section(idp)})


def _tls_client(server: Server, implicit: bool = True) -> RawSMTP:
    context = server.client_context()
    if implicit:
        client = RawSMTP.connect(server.implicit_port, tls=context)
    else:
        client = RawSMTP.connect(server.starttls_port)
        client.ehlo()
        client.starttls(context)
    client.ehlo()
    return client


def _send(client: RawSMTP, subject: str) -> str:
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
    return client.send_mail(ALICE.address, [RCPT], message)


def _challenge(reply: Reply) -> dict[str, str]:
    assert reply.code == 334, str(reply)
    document: dict[str, str] = json.loads(base64.b64decode(reply.lines[0]))
    return document


# ------------------------------------------------------------------ offered after TLS only


def test_offered_after_starttls_only(server: Server) -> None:
    with RawSMTP.connect(server.starttls_port) as client:
        assert not auth_mechanisms(client.ehlo())
        before_tls = client.command(f"AUTH OAUTHBEARER {_oauthbearer(token())}")
        plain = client.command("AUTH PLAIN " + b64(f"\0{ALICE.address}\0x"))
        assert before_tls.status == plain.status == "538 5.7.11", (before_tls, plain)
        client.starttls(server.client_context())
        assert {"OAUTHBEARER", "XOAUTH2", "PLAIN"} <= auth_mechanisms(client.ehlo())


def test_not_offered_without_oauth_section(servers: ServerPool) -> None:
    plain = servers.create("no-oauth", users=[ALICE])
    with session(plain) as client:
        assert "OAUTHBEARER" not in auth_mechanisms(client.ehlo())
        reply = client.command(f"AUTH OAUTHBEARER {_oauthbearer(token())}")
        assert reply.status == "504 5.5.4", str(reply)


# ------------------------------------------------------------------ valid tokens send mail


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_valid_token_sends_mail(server: Server, implicit: bool) -> None:
    subject = f"oauthbearer {'implicit' if implicit else 'starttls'}"
    with _tls_client(server, implicit) as client:
        reply = client.command(f"AUTH OAUTHBEARER {_oauthbearer(token())}")
        assert reply.status == "235 2.7.0", str(reply)
        queue_id = _send(client, subject)
    check_stored(
        server, queue_id, user=ALICE.address, mail_from=ALICE.address, rcpts=[RCPT], subject=subject
    )
    [event] = [e for e in server.log_events("auth.ok") if e.get("mechanism") == "OAUTHBEARER"][-1:]
    assert event["user"] == ALICE.address


def test_continuation_form_kid_less_and_ec_tokens(server: Server) -> None:
    with _tls_client(server) as client:
        assert client.command("AUTH OAUTHBEARER").code == 334
        reply = client.command(_oauthbearer(token(EC), user=None))  # no a=: the token names
        assert reply.status == "235 2.7.0", str(reply)
    with _tls_client(server) as client:
        assert client.command("AUTH XOAUTH2 =").code == 334
        reply = client.command(_xoauth2(token(EC)))
        assert reply.status == "235 2.7.0", str(reply)


def test_the_token_binds_the_sender(server: Server) -> None:
    # A token login is an account login: sender binding applies unchanged.
    with _tls_client(server) as client:
        assert client.command(f"AUTH XOAUTH2 {_xoauth2(token())}").code == 235
        reply = client.command("MAIL FROM:<someone-else@example.com>")
        assert reply.status == "553 5.7.1", str(reply)


def test_aiosmtplib_xoauth2_and_oauthbearer(server: Server) -> None:
    message = email.message.EmailMessage()
    message["From"], message["To"], message["Subject"] = ALICE.address, RCPT, "aiosmtplib xoauth2"
    message.set_content("Sent with a token.\n")

    async def run() -> tuple[str, int, str]:
        smtp = aiosmtplib.SMTP(
            hostname=HOST,
            port=server.starttls_port,
            start_tls=True,
            tls_context=server.client_context(),
            local_hostname="client.test",
            timeout=10,
        )
        async with smtp:
            await smtp.auth_xoauth2(ALICE.address, token())
            _, response = await smtp.send_message(message)
        async with smtp:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await smtp.auth_xoauth2(ALICE.address, token(audience="other"))
        async with smtp:  # OAUTHBEARER: aiosmtplib has no helper, so execute_command
            await smtp.ehlo()
            answer = await smtp.execute_command(
                b"AUTH", b"OAUTHBEARER", _oauthbearer(token()).encode()
            )
        return response, refused.value.code, f"{answer.code} {answer.message}"

    response, refused_code, oauthbearer = asyncio.run(asyncio.wait_for(run(), 60))
    assert response.startswith("2.0.0 Ok: queued as "), response
    assert refused_code == 535
    assert oauthbearer.startswith("235 2.7.0"), oauthbearer


# ------------------------------------------------------------------ refused tokens

OTHER_RSA = SigningKey.rsa("k1")  # the same kid as the real key: a forgery


def _refused_cases() -> list[tuple[str, Callable[[], str], str, str | None]]:
    """(case, how to make the token, the reason logged, the a= name the client gives).

    Tokens are made when the test runs, not when it is collected: a slow run
    would otherwise present "valid" tokens that expired while it waited."""
    return [
        (
            "expired",
            lambda: token(now=time.time() - 3600, lifetime=600),
            "expired",
            ALICE.address,
        ),
        ("wrong audience", lambda: token(audience="someone-else"), "audience", ALICE.address),
        (
            "wrong issuer",
            lambda: token(issuer="https://evil.example/realms/mail"),
            "issuer",
            ALICE.address,
        ),
        ("wrong key", lambda: token(OTHER_RSA), "signature", ALICE.address),
        (
            "alg none",
            lambda: _noted(unsigned_token(claims(ALICE.address))),
            "algorithm",
            ALICE.address,
        ),
        (
            "HS256 with the public key",
            lambda: _noted(hmac_token(claims(ALICE.address), RSA.public_pem())),
            "algorithm",
            ALICE.address,
        ),
        ("unknown account", lambda: token(email="nobody@oauth.test"), "unknown_account", None),
        ("disabled account", lambda: token(email=DORA.address), "disabled_account", None),
        ("a= mismatch", lambda: token(email=DORA.address), "authzid_mismatch", ALICE.address),
        ("no address claim", lambda: token(email=None), "claim_missing", None),
        ("unverified email", lambda: token(email_verified=False), "email_unverified", None),
    ]


@pytest.mark.parametrize("case", _refused_cases(), ids=lambda c: c[0])
def test_refused_token_gets_the_error_challenge_then_535(
    server: Server, case: tuple[str, Callable[[], str], str, str | None]
) -> None:
    _, make_token, reason, user = case
    bad = make_token()
    mark = server.log_mark()
    with _tls_client(server, implicit=False) as client:
        challenge = _challenge(client.command(f"AUTH OAUTHBEARER {_oauthbearer(bad, user)}"))
        assert challenge == {
            "status": "invalid_token",
            "schemes": "bearer",
            "scope": "openid email",
            "openid-configuration": ISSUER + "/.well-known/openid-configuration",
        }
        final = client.command("AQ==")
        assert final.status == "535 5.7.8", str(final)
        assert final.text == "Authentication credentials invalid"
        assert client.command("MAIL FROM:<x@oauth.test>").status == "530 5.7.0"  # not logged in
    [event] = server.log_events("auth.fail", since=mark)
    assert event["reason"] == reason, event
    assert event["mechanism"] == "OAUTHBEARER"
    assert event["reply"] == "535"


def test_xoauth2_failure_is_gmail_style(server: Server) -> None:
    with _tls_client(server) as client:
        challenge = _challenge(client.command(f"AUTH XOAUTH2 {_xoauth2(token(lifetime=-600))}"))
        assert challenge == {"status": "401", "schemes": "Bearer", "scope": "openid email"}
        assert client.command("").status == "535 5.7.8"


def test_a_client_that_ignores_the_challenge_is_not_logged_in(server: Server) -> None:
    with _tls_client(server) as client:
        # It pipelines its mail right behind the bad token: MAIL is taken as
        # the dummy response, and nothing of the transaction gets through.
        client.send(
            f"AUTH OAUTHBEARER {_oauthbearer(token(audience='x'))}\r\n"
            f"MAIL FROM:<{ALICE.address}>\r\nRCPT TO:<{RCPT}>\r\n".encode()
        )
        assert client.reply().code == 334
        assert client.reply().status == "535 5.7.8"
        assert client.reply().status == "530 5.7.0"
        assert client.command("NOOP").status == "250 2.0.0"


def test_garbage_is_a_syntax_error_not_a_crash(server: Server) -> None:
    with _tls_client(server) as client:
        for payload in (
            "not-base64!",
            b64("n,,\x01auth=Basic x\x01\x01"),
            b64(b"\xff\xfe\x00"),
            b64("p=tls-unique,,\x01auth=Bearer x\x01\x01"),
        ):
            reply = client.command(f"AUTH OAUTHBEARER {payload}")
            assert reply.code == 501, (payload, str(reply))
        reply = client.command(f"AUTH OAUTHBEARER {_oauthbearer('a.b.c')}")
        assert reply.code == 334 and client.command("AQ==").status == "535 5.7.8"


# ------------------------------------------------------------------ line lengths


def _padded_token(line_length: int) -> str:
    """A valid token whose AUTH OAUTHBEARER line is about ``line_length`` octets."""
    base = len(f"AUTH OAUTHBEARER {_oauthbearer(token())}\r\n")
    pad = int((line_length - base) * 9 / 16)  # base64url in the JWT, then base64 again
    big = token(padding="x" * pad)
    return big


def test_a_12000_octet_auth_line_is_accepted(server: Server) -> None:
    big = _padded_token(12_000)
    line = f"AUTH OAUTHBEARER {_oauthbearer(big)}"
    assert 11_900 <= len(line) + 2 <= 12_100, len(line)
    with _tls_client(server) as client:
        reply = client.command(line)
        assert reply.status == "235 2.7.0", str(reply)
        _send(client, "after a 12000-octet AUTH line")


def test_a_13000_octet_auth_line_is_refused_clearly(server: Server) -> None:
    with _tls_client(server) as client:
        reply = client.command("AUTH OAUTHBEARER " + "A" * 13_000)
        assert reply.status == "500 5.5.2", str(reply)
        assert reply.text == "Line too long"
        assert client.command("NOOP").status == "250 2.0.0"  # the session goes on


def test_other_commands_keep_1000_octets(server: Server) -> None:
    with _tls_client(server) as client:
        reply = client.command("NOOP " + "x" * 1_100)
        assert reply.status == "500 5.5.2", str(reply)
        assert reply.text == "Line too long"


def test_a_long_continuation_response_is_accepted(server: Server) -> None:
    big = _padded_token(12_000)
    with _tls_client(server, implicit=False) as client:
        assert client.command("AUTH XOAUTH2").code == 334
        reply = client.command(_xoauth2(big))
        assert reply.status == "235 2.7.0", str(reply)


# ------------------------------------------------------------------ keys: rotation, outage, flood


def test_key_rotation_flood_and_outage(server: Server, idp: JwksServer) -> None:
    # Rotation: the provider publishes a new key; a token naming it makes the
    # server fetch the set again (jwks_min_interval = 1 s here).
    new = SigningKey.rsa("k-rotated")
    idp.serve([RSA, EC, new])
    time.sleep(1.1)
    with _tls_client(server) as client:
        assert client.command(f"AUTH OAUTHBEARER {_oauthbearer(token(new))}").code == 235
    # A flood of tokens with made-up kids: a fetch a second at most.
    time.sleep(1.1)
    before, started = idp.requests, time.monotonic()
    for batch in range(4):  # 10 a connection: 50 commands before login are allowed
        with _tls_client(server) as client:
            for i in range(10):
                random_kid = token(kid=f"random-{batch}-{i}")
                reply = client.command(f"AUTH OAUTHBEARER {_oauthbearer(random_kid)}")
                assert reply.code == 334, str(reply)
                assert client.command("AQ==").status == "535 5.7.8"
    elapsed = time.monotonic() - started
    fetched = idp.requests - before
    assert 1 <= fetched <= elapsed / 1.0 + 1, (fetched, elapsed)
    # The provider goes away: the keys already known keep working.
    idp.serve_raw(b"<html>down for maintenance</html>", status=503)
    time.sleep(1.1)
    mark = server.log_mark()
    with _tls_client(server) as client:
        reply = client.command(
            f"AUTH OAUTHBEARER {_oauthbearer(token(kid='unknown-during-outage'))}"
        )
        assert reply.code == 334 and client.command("AQ==").code == 535
        assert client.command(f"AUTH OAUTHBEARER {_oauthbearer(token())}").code == 235
    [failed] = server.log_events("oauth.jwks_failed", since=mark)
    assert failed["reason"] == "HTTP 503" and failed["keys_kept"] == "3", failed
    idp.serve([RSA, EC])


def test_no_keys_at_all_is_a_temporary_failure(servers: ServerPool) -> None:
    with JwksServer() as down:
        down.serve_raw(b"nope", status=500)
        section = {**_oauth_section(down), "jwks_url": down.url}
        lonely = servers.create("oauth-no-keys", users=[ALICE], sections={"oauth": section})
        with _tls_client(lonely) as client:
            reply = client.command(f"AUTH OAUTHBEARER {_oauthbearer(token())}")
            assert reply.status == "454 4.7.0", str(reply)
        assert lonely.log_events("oauth.jwks_failed")


# ------------------------------------------------------------------ throttling, parallel clients


def test_token_failures_count_in_the_failed_login_throttle(
    servers: ServerPool, idp: JwksServer
) -> None:
    strict = servers.create(
        "oauth-throttled",
        users=[ALICE],
        sections={"oauth": _oauth_section(idp), "auth_throttle": {"ip_per_minute": 3}},
    )
    with _tls_client(strict) as client:
        for _ in range(3):
            assert client.command(f"AUTH XOAUTH2 {_xoauth2(token(audience='x'))}").code == 334
            assert client.command("").status == "535 5.7.8"
    with _tls_client(strict) as client:
        # Over the limit: refused without the challenge, even with a good token.
        reply = client.command(f"AUTH XOAUTH2 {_xoauth2(token())}")
        assert reply.status == "454 4.7.0", str(reply)
    assert strict.log_events("auth.throttled")


def test_parallel_good_and_bad_tokens(server: Server) -> None:
    def attempt(i: int) -> int:
        good = i % 2 == 0
        with _tls_client(server) as client:
            chosen = token() if good else token(issuer="https://evil.example")
            reply = client.command(f"AUTH OAUTHBEARER {_oauthbearer(chosen)}")
            if reply.code == 334:
                reply = client.command("AQ==")
            return reply.code

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        codes = list(pool.map(attempt, range(20), timeout=60))
    assert codes == [235 if i % 2 == 0 else 535 for i in range(20)]


# ------------------------------------------------------------------ msmtp


@pytest.mark.parametrize("auth", ["oauthbearer", "xoauth2"])
def test_msmtp(server: Server, tmp_path: Path, auth: str) -> None:
    msmtp = shutil.which("msmtp")
    assert msmtp is not None, "msmtp is not installed"
    subject = f"msmtp {auth}"
    token_file = tmp_path / "token"
    token_file.write_text(token() + "\n", encoding="utf-8")
    log, rc = tmp_path / "msmtp.log", tmp_path / "msmtprc"
    rc.write_text(
        "\n".join(
            [
                "account default",
                f"host {HOST}",
                f"port {server.starttls_port}",
                "domain client.test",
                "tls on",
                "tls_starttls on",
                f"tls_trust_file {server.ca_bundle()}",
                "tls_host_override localhost",
                f"auth {auth}",
                f"user {ALICE.address}",
                f"passwordeval cat {token_file}",
                f"from {ALICE.address}",
                f"logfile {log}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    rc.chmod(0o600)
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
    check_stored(
        server,
        queue_id_of(logged),
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    # A bad token: msmtp reports the failure and exits non-zero.
    token_file.write_text(token(lifetime=-3600) + "\n", encoding="utf-8")
    refused = subprocess.run(
        [msmtp, "-C", str(rc), "-a", "default", RCPT],
        input=message,
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert refused.returncode != 0
    assert b"535" in refused.stderr or b"authentication failed" in refused.stderr.lower(), (
        refused.stderr
    )


# ------------------------------------------------------------------ peers that stall


def test_a_client_that_never_answers_the_challenge_is_timed_out(
    servers: ServerPool, idp: JwksServer
) -> None:
    impatient = servers.create(
        "oauth-timeouts",
        users=[ALICE],
        limits={"idle_timeout": 1, "command_timeout": 1},
        sections={"oauth": _oauth_section(idp)},
    )
    with _tls_client(impatient) as client:
        assert client.command(f"AUTH OAUTHBEARER {_oauthbearer(token(audience='x'))}").code == 334
        started = time.monotonic()
        reply = client.reply(timeout=15)  # we never send the dummy response
        assert reply.status == "421 4.4.2", str(reply)
        assert client.wait_closed(timeout=10)
        assert time.monotonic() - started < 10


def test_a_stalling_identity_provider_stalls_nobody_else(server: Server, idp: JwksServer) -> None:
    time.sleep(1.1)  # past jwks_min_interval: the next unknown kid fetches
    idp.delay = 2.0
    try:
        with (
            _tls_client(server) as waiting,
            _tls_client(server) as other,
        ):
            started = time.monotonic()
            waiting.send(
                f"AUTH OAUTHBEARER {_oauthbearer(token(kid='unknown-while-slow'))}\r\n".encode()
            )
            time.sleep(0.2)  # the fetch is under way now
            # Meanwhile another client logs in with a known key and gets answered at once.
            quick = other.command(f"AUTH XOAUTH2 {_xoauth2(token())}")
            assert quick.code == 235, str(quick)
            assert time.monotonic() - started < 1.5
            assert waiting.reply(timeout=15).code == 334  # the unknown kid, after the fetch
            assert waiting.command("AQ==").status == "535 5.7.8"
    finally:
        idp.delay = 0.0
