"""SCRAM-SHA-256 and SCRAM-SHA-256-PLUS end to end, with scramp (and msmtp) as clients.

Channel binding is tls-server-end-point (RFC 5929): the SHA-256 of the DER
certificate the client saw. The server holds two certificates (ECDSA and
RSA); a TLS 1.2 client limited to one cipher suite makes it show one of them,
so both bindings get exercised. Every exchange runs on a real TLS socket, over
the implicit-TLS port and after STARTTLS.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import scramp

from .helpers import (
    ALICE,
    CAROL,
    HOST,
    RawSMTP,
    Server,
    ServerPool,
    User,
    auth_mechanisms,
    b64,
    check_stored,
    make_message,
    queue_id_of,
    remember_credentials,
    session,
)
from .security_helpers import (
    AUTH_FAILED,
    cert_der,
    peer_binding,
    peer_der,
    scram_exchange,
    tls12_context,
)

RCPT = "rcpt@example.net"
PAT = User("pat@example.com", "Pat-pw-7Hs2kLq9")
SCRAM = "SCRAM-SHA-256"
PLUS = "SCRAM-SHA-256-PLUS"
MECHANISMS = [SCRAM, PLUS]
PORTS = pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])


@pytest.fixture(scope="module")
def scram_server(servers: ServerPool) -> Server:
    return servers.create("scram", users=[ALICE, CAROL, PAT])


def _tls_session(server: Server, implicit: bool, kind: str) -> RawSMTP:
    """A TLS 1.2 session in which the server had to show its ``kind`` certificate."""
    context = tls12_context(server, kind)
    if implicit:
        client = RawSMTP.connect(server.implicit_port, tls=context)
    else:
        client = RawSMTP.connect(server.starttls_port)
        client.ehlo()
        client.starttls(context)
    client.ehlo()
    cert = server.rsa_cert if kind == "rsa" else server.ecdsa_cert
    assert peer_der(client) == cert_der(cert), f"the server did not show its {kind} certificate"
    assert client.tls_version == "TLSv1.2"
    return client


# ------------------------------------------------------------------ offer


def test_auth_is_offered_only_under_tls(scram_server: Server) -> None:
    with RawSMTP.connect(scram_server.starttls_port) as client:
        assert auth_mechanisms(client.ehlo()) == set()
        refused = client.command(f"AUTH {SCRAM} {b64('n,,n=x,r=abcdefgh')}")
        assert refused.status == "538 5.7.11", str(refused)
        client.starttls(scram_server.client_context())
        offered = auth_mechanisms(client.ehlo())
    assert {SCRAM, PLUS} <= offered, offered
    with session(scram_server, ehlo=False) as client:
        assert {SCRAM, PLUS} <= auth_mechanisms(client.ehlo())


# ------------------------------------------------------------------ success


@pytest.mark.parametrize("mechanism", MECHANISMS)
@PORTS
def test_scram_login_then_send(scram_server: Server, mechanism: str, implicit: bool) -> None:
    subject = f"after {mechanism} login ({'implicit' if implicit else 'starttls'})"
    mark = scram_server.log_mark()
    with session(scram_server, implicit=implicit) as client:
        run = scram_exchange(client, mechanism, ALICE.address, ALICE.password)
        assert run.codes == [334, 334, 235], [str(r) for r in run.replies]
        assert run.last.status == "235 2.7.0"
        # server-first: our nonce extended, a salt, the iteration count.
        assert set(run.server_first) == {"r", "s", "i"}, run.server_first
        assert run.server_first["r"].startswith(run.client_nonce)
        assert len(run.server_first["r"]) > len(run.client_nonce)
        assert int(run.server_first["i"]) >= 4096  # RFC 7677's minimum
        queue_id = client.send_mail(
            ALICE.address, [RCPT], make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
        )
    entry = scram_server.message(queue_id)
    assert entry["credential"] is None, entry
    check_stored(
        scram_server,
        queue_id,
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    event = scram_server.wait_for_event(
        "auth.ok", lambda e: e.get("mechanism") == mechanism, since=mark
    )
    assert event["user"] == ALICE.address


def test_scram_without_initial_response(scram_server: Server) -> None:
    with session(scram_server) as client:
        run = scram_exchange(client, PLUS, ALICE.address, ALICE.password, initial_response=False)
    assert run.codes == [334, 334, 334, 235], [str(r) for r in run.replies]


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
@PORTS
def test_scram_plus_binds_to_the_certificate_shown(
    scram_server: Server, kind: str, implicit: bool
) -> None:
    with _tls_session(scram_server, implicit, kind) as client:
        run = scram_exchange(client, PLUS, ALICE.address, ALICE.password)
        assert run.last.status == "235 2.7.0", [str(r) for r in run.replies]
        assert client.command(f"MAIL FROM:<{ALICE.address}>").status == "250 2.1.0"


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
@PORTS
def test_plain_scram_with_each_certificate(scram_server: Server, kind: str, implicit: bool) -> None:
    with _tls_session(scram_server, implicit, kind) as client:
        run = scram_exchange(client, SCRAM, ALICE.address, ALICE.password)
        assert run.last.status == "235 2.7.0", [str(r) for r in run.replies]


# ------------------------------------------------------------------ failures


@PORTS
def test_scram_plus_with_a_wrong_binding_is_refused(scram_server: Server, implicit: bool) -> None:
    """A man in the middle shows his own certificate: the client's binding names it."""
    with session(scram_server, implicit=implicit) as client:
        wrong = hashlib.sha256(peer_der(client) + b"tampered").digest()
        run = scram_exchange(client, PLUS, ALICE.address, ALICE.password, binding=wrong)
        assert run.codes == [334, 535], [str(r) for r in run.replies]
        assert str(run.last) == AUTH_FAILED
        # The session is still usable, and not logged in.
        assert client.command(f"MAIL FROM:<{ALICE.address}>").status == "530 5.7.0"
        assert scram_exchange(client, PLUS, ALICE.address, ALICE.password).last.code == 235


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize(
    "who",
    [
        (ALICE.address, "Wrong-scram-pw-4Lm"),
        ("nobody-scram@example.com", "Nobody-scram-pw-1Zx"),
        (CAROL.address, CAROL.password),  # disabled, with its right password
    ],
    ids=["wrong-password", "unknown-user", "disabled-account"],
)
def test_failures_have_the_same_shape(
    scram_server: Server, mechanism: str, who: tuple[str, str]
) -> None:
    """A server-first comes back either way; the refusal comes only at the proof."""
    with session(scram_server) as client:
        run = scram_exchange(client, mechanism, *who)
        assert run.codes == [334, 535], [str(r) for r in run.replies]
        assert str(run.last) == AUTH_FAILED
        assert set(run.server_first) == {"r", "s", "i"}
        assert run.server_first["r"].startswith(run.client_nonce)
        real = scram_exchange(client, mechanism, ALICE.address, ALICE.password)
        assert real.last.code == 235
    assert run.server_first["i"] == real.server_first["i"]
    assert len(run.server_first["r"]) == len(real.server_first["r"])


def test_unknown_users_get_stable_salts(scram_server: Server) -> None:
    """Asking twice must not tell a decoy (made up per request) from a stored salt."""
    salts: dict[str, list[bytes]] = {}
    for user in (ALICE.address, "ghost1@example.com", "ghost2@example.com") * 2:
        with session(scram_server) as client:
            run = scram_exchange(client, SCRAM, user, "Whatever-pw-9Kk")
            assert run.last.code == 535
            salts.setdefault(user, []).append(run.salt)
    for user, seen in salts.items():
        assert seen[0] == seen[1], user
    assert len({seen[0] for seen in salts.values()}) == 3


@pytest.mark.parametrize("user", ["ghost3@example.com", CAROL.address])
def test_decoy_salts_look_like_real_ones(scram_server: Server, user: str) -> None:
    with session(scram_server) as client:
        real = scram_exchange(client, SCRAM, ALICE.address, "Wrong-pw-1Qa")
        decoy = scram_exchange(client, SCRAM, user, "Wrong-pw-1Qa")
    assert len(decoy.salt) == len(real.salt), (len(decoy.salt), len(real.salt))


@PORTS
def test_downgrade_to_plain_scram_is_detected(scram_server: Server, implicit: bool) -> None:
    """GS2 flag "y" ("I can bind, I think you cannot") while -PLUS is on offer: refused,
    even with the right password (RFC 5802 section 6)."""
    with session(scram_server, implicit=implicit) as client:
        assert PLUS in auth_mechanisms(client.ehlo())
        run = scram_exchange(
            client, SCRAM, ALICE.address, ALICE.password, binding=peer_binding(client)
        )
        assert 235 not in run.codes, [str(r) for r in run.replies]
        assert str(run.last) == AUTH_FAILED
        assert client.command(f"MAIL FROM:<{ALICE.address}>").status == "530 5.7.0"


def test_plus_without_binding_is_refused(scram_server: Server) -> None:
    """GS2 flag "n" (no channel binding) under the -PLUS name: refused."""
    remember_credentials(ALICE.address, ALICE.password)
    with session(scram_server) as client:
        nonce = base64.b64encode(os.urandom(18)).decode()
        reply = client.command(f"AUTH {PLUS} {b64(f'n,,n={ALICE.address},r={nonce}')}")
        assert str(reply) == AUTH_FAILED
        assert client.command(f"MAIL FROM:<{ALICE.address}>").status == "530 5.7.0"


def test_replayed_exchange_is_refused(scram_server: Server) -> None:
    """Messages captured from a good exchange do not log in again."""
    remember_credentials(ALICE.address, ALICE.password)
    scram = scramp.ScramClient([SCRAM], ALICE.address, ALICE.password)
    first = scram.get_client_first()
    with session(scram_server) as client:
        reply = client.command(f"AUTH {SCRAM} {b64(first)}")
        scram.set_server_first(base64.b64decode(reply.text).decode())
        final = scram.get_client_final()
        assert client.command(b64(final)).code == 334
        assert client.command("").code == 235
    with session(scram_server) as client:
        reply = client.command(f"AUTH {SCRAM} {b64(first)}")
        assert reply.code == 334
        replayed = client.command(b64(final))
        assert replayed.code in (501, 535), str(replayed)
        assert client.command(f"MAIL FROM:<{ALICE.address}>").status == "530 5.7.0"


# ------------------------------------------------------------------ cancel


def test_cancel_at_every_step(scram_server: Server) -> None:
    remember_credentials(ALICE.address, ALICE.password)
    with session(scram_server) as client:
        # Before the client-first.
        assert client.command(f"AUTH {SCRAM}").code == 334
        assert client.command("*").status == "501 5.0.0"
        # After the server-first.
        scram = scramp.ScramClient([SCRAM], ALICE.address, ALICE.password)
        assert client.command(f"AUTH {SCRAM} {b64(scram.get_client_first())}").code == 334
        assert client.command("*").status == "501 5.0.0"
        # After the server-final: the server proved itself, but the client walks away.
        scram = scramp.ScramClient([SCRAM], ALICE.address, ALICE.password)
        reply = client.command(f"AUTH {SCRAM} {b64(scram.get_client_first())}")
        scram.set_server_first(base64.b64decode(reply.text).decode())
        assert client.command(b64(scram.get_client_final())).code == 334
        assert client.command("*").status == "501 5.0.0"
        assert client.command(f"MAIL FROM:<{ALICE.address}>").status == "530 5.7.0"
        # Cancelling costs nothing: a full exchange still works on this connection.
        assert scram_exchange(client, PLUS, ALICE.address, ALICE.password).last.code == 235


# ------------------------------------------------------------------ password change


def test_password_change_replaces_the_scram_keys_at_once(scram_server: Server) -> None:
    new_password = "Pat-new-pw-3Vb8nM"
    with session(scram_server) as client:
        assert scram_exchange(client, SCRAM, PAT.address, PAT.password).last.code == 235
    salt_before = _salt_of(scram_server, PAT.address)
    scram_server.set_password(PAT.address, new_password)
    assert _salt_of(scram_server, PAT.address) != salt_before
    for mechanism in MECHANISMS:
        with session(scram_server) as client:
            old = scram_exchange(client, mechanism, PAT.address, PAT.password)
            assert str(old.last) == AUTH_FAILED, mechanism
            new = scram_exchange(client, mechanism, PAT.address, new_password)
            assert new.last.status == "235 2.7.0", mechanism
    with session(scram_server) as client:
        assert client.auth_plain(PAT.address, PAT.password).code == 535
        assert client.auth_plain(PAT.address, new_password).code == 235


def _salt_of(server: Server, user: str) -> bytes:
    with session(server) as client:
        return scram_exchange(client, SCRAM, user, "Not-the-pw-0Oo").salt


# ------------------------------------------------------------------ msmtp


@PORTS
def test_msmtp_scram_sha_256(scram_server: Server, tmp_path: Path, implicit: bool) -> None:
    msmtp = shutil.which("msmtp")
    if msmtp is None:
        pytest.skip("msmtp is not installed")
    subject = f"msmtp scram-sha-256 {'implicit' if implicit else 'starttls'}"
    log = tmp_path / "msmtp.log"
    rc = tmp_path / "msmtprc"
    port = scram_server.implicit_port if implicit else scram_server.starttls_port
    rc.write_text(
        "\n".join(
            [
                "account default",
                f"host {HOST}",
                f"port {port}",
                "domain client.test",
                "tls on",
                f"tls_starttls {'off' if implicit else 'on'}",
                f"tls_trust_file {scram_server.ca_bundle()}",
                "tls_host_override localhost",
                "auth scram-sha-256",
                f"user {ALICE.address}",
                f"password {ALICE.password}",
                f"from {ALICE.address}",
                f"logfile {log}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    rc.chmod(0o600)
    remember_credentials(ALICE.address, ALICE.password)
    mark = scram_server.log_mark()
    message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
    result = subprocess.run(
        [msmtp, "-C", str(rc), RCPT], input=message, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    queue_id = queue_id_of(log.read_text(encoding="utf-8", errors="replace"))
    listed = {m["id"]: m for m in scram_server.messages()}
    assert listed[queue_id]["account"] == ALICE.address
    assert listed[queue_id]["subject"] == subject
    check_stored(
        scram_server,
        queue_id,
        user=ALICE.address,
        mail_from=ALICE.address,
        rcpts=[RCPT],
        subject=subject,
    )
    event = scram_server.wait_for_event("auth.ok", lambda e: e["user"] == ALICE.address, mark)
    assert event["mechanism"] == SCRAM
