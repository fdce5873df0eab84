"""`relaygate check` against real servers on 127.0.0.1: relaygate itself (every
check passes), a deliberately bad server (tests/fakes/bad_smtp.py: each check
fails or warns as it should), hostile servers (bounded, sanitized, exit 2 where
there is no SMTP conversation), and Postfix where it is installed
(test_e2e_check_postfix.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fakes.bad_smtp import BadSMTPServer

from .check_helpers import CHECK_TIMEOUT, details, run_check, statuses
from .helpers import ALICE, HOST, TLS_NAME, Server, ServerPool, api_call, clean_env, free_ports


@pytest.fixture(scope="module")
def relaygate(servers: ServerPool) -> Server:
    return servers.create("check", users=[ALICE])


# ------------------------------------------------------------------ relaygate


def test_relaygate_passes_every_check_on_starttls(relaygate: Server) -> None:
    result = run_check(
        f"{HOST}:{relaygate.starttls_port}",
        "--servername",
        TLS_NAME,
        "--ca-file",
        str(relaygate.ca_bundle()),
        "--user",
        ALICE.address,
        "--password-stdin",
        "--json",
        stdin=ALICE.password + "\n",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert (document["host"], document["port"]) == (HOST, relaygate.starttls_port)
    assert [c["id"] for c in document["checks"]] == [
        "starttls.offered",
        "tls.versions",
        "tls.certificate",
        "auth.before_tls",
        "auth.mechanisms",
        "relay.unauthenticated",
        "smuggling.bare_lf",
        "banner",
        "limits.size",
    ]
    assert set(statuses(result).values()) == {"pass"}, result.stdout
    assert "refused (550)" in details(result)["smuggling.bare_lf"]
    assert ALICE.password not in result.stdout + result.stderr
    # Nothing smuggled, nothing stored: relaygate refused both probe messages whole.
    assert not [m for m in relaygate.messages() if "smuggling probe" in str(m["subject"])]


def test_relaygate_passes_on_implicit_tls_and_the_table_is_readable(relaygate: Server) -> None:
    result = run_check(
        f"{HOST}:{relaygate.implicit_port}",
        "--implicit",
        "--servername",
        TLS_NAME,
        "--ca-file",
        str(relaygate.ca_bundle()),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["pass", "tls.versions"],
        ["pass", "tls.certificate"],
        ["pass", "auth.before_tls"],
        ["pass", "auth.mechanisms"],
        ["pass", "relay.unauthenticated"],
        ["pass", "banner"],
        ["pass", "limits.size"],
    ]
    assert "\x1b" not in result.stdout  # no colour when not on a terminal
    assert result.stderr == (
        "relaygate: smuggling.bare_lf not tested: it needs --user and --password-stdin\n"
    )


def test_relaygate_quickstart_certificate_is_untrusted_without_ca_file(
    relaygate: Server,
) -> None:
    result = run_check(f"{HOST}:{relaygate.starttls_port}", "--servername", TLS_NAME, "--json")
    assert result.returncode == 1
    assert statuses(result)["tls.certificate"] == "fail"
    assert details(result)["tls.certificate"] == "chain not trusted: self-signed certificate"
    # The quickstart certificate names 127.0.0.1 too; another name does not match.
    result = run_check(
        f"{HOST}:{relaygate.starttls_port}", "--ca-file", str(relaygate.ca_bundle()), "--json"
    )
    assert statuses(result)["tls.certificate"] == "pass"
    result = run_check(
        f"{HOST}:{relaygate.starttls_port}",
        "--ca-file",
        str(relaygate.ca_bundle()),
        "--servername",
        "mail.example.com",
        "--json",
    )
    assert result.returncode == 1
    assert details(result)["tls.certificate"].startswith("name mismatch (certificate names: ")


def test_a_wrong_password_fails_the_smuggling_check_without_printing_it(
    relaygate: Server,
) -> None:
    wrong = "Wrong-pw-7Hq9zLx2"
    result = run_check(
        f"{HOST}:{relaygate.starttls_port}",
        "--servername",
        TLS_NAME,
        "--ca-file",
        str(relaygate.ca_bundle()),
        "--user",
        ALICE.address,
        "--password-stdin",
        "--json",
        stdin=wrong + "\n",
    )
    assert result.returncode == 1
    assert details(result)["smuggling.bare_lf"].startswith(
        "could not test: login over TLS failed: 535"
    )
    assert wrong not in result.stdout + result.stderr


# ------------------------------------------------------------------ the bad server


def test_bad_server_fails_every_check_it_should(tmp_path: Path) -> None:
    with BadSMTPServer(tmp_path) as bad:
        result = run_check(
            f"{bad.host}:{bad.port}",
            "--ca-file",
            str(bad.cert_file),
            "--user",
            "someone@example.com",
            "--password-stdin",
            "--json",
            "--timeout",
            "5",
            stdin="anything\n",
        )
    assert result.returncode == 1, result.stderr
    found = statuses(result)
    why = details(result)
    assert found == {
        "starttls.offered": "pass",
        "tls.versions": "fail" if bad.legacy_tls else "warn",
        "tls.certificate": "fail",
        "auth.before_tls": "fail",
        "auth.mechanisms": "fail",
        "relay.unauthenticated": "fail",
        "smuggling.bare_lf": "fail",
        "banner": "warn",
        "limits.size": "warn",
    }, why
    # This machine's OpenSSL still does TLS 1.0 with SECLEVEL=0, so the fake
    # offers it and the check must see it; elsewhere the test says what it proved.
    if bad.legacy_tls:
        assert why["tls.versions"] == "TLS 1.0 and TLS 1.1 accepted (RFC 8996 forbids them)"
    assert why["tls.certificate"].startswith("expired on ")
    assert "name mismatch (certificate names: wrong.example)" in why["tls.certificate"]
    assert why["auth.before_tls"] == "AUTH PLAIN LOGIN advertised before TLS"
    assert why["relay.unauthenticated"].startswith(
        "before TLS: RCPT to an outside domain accepted: 250"
    )
    assert why["smuggling.bare_lf"].startswith("<LF>.<LF> ended the data")
    assert why["banner"] == "software version shown: Sendmail 8.15.2"
    # The relay probe never sent DATA: the only message is the smuggling probe's.
    assert len(bad.messages) == 1
    rcpts = [c for c in bad.commands if c.upper().startswith(b"RCPT")]
    assert all(b"relay-test@example.net" in c or b"someone@example.com" in c for c in rcpts)


def test_bad_server_on_implicit_tls(tmp_path: Path) -> None:
    with BadSMTPServer(tmp_path, implicit=True) as bad:
        result = run_check(f"{bad.host}:{bad.port}", "--implicit", "--json", "--timeout", "5")
    assert result.returncode == 1
    found = statuses(result)
    assert found["relay.unauthenticated"] == "fail"
    assert found["tls.certificate"] == "fail"
    assert "starttls.offered" not in found


# ------------------------------------------------------------------ hostile servers


def timed_check(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_check(*args)
    return result, time.monotonic() - started


def test_a_server_that_never_greets_is_unreachable_within_the_timeout(tmp_path: Path) -> None:
    with BadSMTPServer(tmp_path, behaviour="silent") as bad:
        result, took = timed_check(f"{bad.host}:{bad.port}", "--timeout", "1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"relaygate: cannot check {bad.host}:{bad.port}: no reply within 1 s\n"
    assert took < 10


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("endless", "a reply longer than 100 lines"),
        ("long_line", "a reply line longer than 4096 bytes"),
    ],
)
def test_an_endless_reply_is_cut_off(tmp_path: Path, behaviour: str, error: str) -> None:
    with BadSMTPServer(tmp_path, behaviour=behaviour) as bad:
        result, took = timed_check(f"{bad.host}:{bad.port}", "--timeout", "2")
    assert result.returncode == 2
    assert result.stderr == f"relaygate: cannot check {bad.host}:{bad.port}: {error}\n"
    assert took < 10


def test_a_server_that_never_finishes_starttls_fails_in_time(tmp_path: Path) -> None:
    with BadSMTPServer(tmp_path, behaviour="stall_tls") as bad:
        result, took = timed_check(f"{bad.host}:{bad.port}", "--timeout", "1", "--json")
    assert result.returncode == 1
    why = details(result)
    assert why["starttls.offered"] == "STARTTLS handshake failed: TLS handshake not done within 1 s"
    assert statuses(result)["tls.versions"] == "fail"
    assert took < 15


def test_hostile_bytes_from_the_server_are_never_printed_raw(tmp_path: Path) -> None:
    with BadSMTPServer(tmp_path, behaviour="hostile_text") as bad:
        table = run_check(f"{bad.host}:{bad.port}", "--timeout", "5")
        as_json = run_check(f"{bad.host}:{bad.port}", "--timeout", "5", "--json")
    for output in (table.stdout, table.stderr, as_json.stdout):
        assert not any(ord(c) < 0x20 and c != "\n" for c in output), repr(output)
    assert "\\x1b[2J" in table.stdout  # shown, escaped
    assert json.loads(as_json.stdout)["checks"]


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("refuse", "the server refused the session: 554 5.7.1 go away"),
        ("not_smtp", "not an SMTP reply: HTTP/1.1 400 Bad Request"),
    ],
)
def test_no_smtp_session_is_exit_2(tmp_path: Path, behaviour: str, error: str) -> None:
    with BadSMTPServer(tmp_path, behaviour=behaviour) as bad:
        result = run_check(f"{bad.host}:{bad.port}", "--timeout", "2")
    assert result.returncode == 2
    assert result.stderr == f"relaygate: cannot check {bad.host}:{bad.port}: {error}\n"


def test_a_server_that_never_answers_the_end_of_data_fails_the_probe_in_time(
    tmp_path: Path,
) -> None:
    with BadSMTPServer(tmp_path, behaviour="mute_data") as bad:
        started = time.monotonic()
        result = run_check(
            f"{bad.host}:{bad.port}",
            "--user",
            "someone@example.com",
            "--password-stdin",
            "--timeout",
            "1",
            "--json",
            stdin="anything\n",
        )
        took = time.monotonic() - started
    assert result.returncode == 1
    assert details(result)["smuggling.bare_lf"] == "could not test: no reply within 1 s"
    assert took < 20


def test_a_server_that_refuses_bare_lf_and_hangs_up_passes_the_smuggling_check(
    tmp_path: Path,
) -> None:
    with BadSMTPServer(tmp_path, behaviour="strict_close") as bad:
        result = run_check(
            f"{bad.host}:{bad.port}",
            "--user",
            "someone@example.com",
            "--password-stdin",
            "--timeout",
            "2",
            "--json",
            stdin="anything\n",
        )
    assert (statuses(result)["smuggling.bare_lf"], details(result)["smuggling.bare_lf"]) == (
        "pass",
        "bare LF never ends the data: <LF>.<LF> refused (521);"
        " then the server closed the connection",
    )
    assert bad.messages == []


def test_parallel_checks_against_relaygate_all_pass(relaygate: Server) -> None:
    args = [
        sys.executable,
        "-m",
        "relaygate",
        "check",
        f"{HOST}:{relaygate.starttls_port}",
        "--servername",
        TLS_NAME,
        "--ca-file",
        str(relaygate.ca_bundle()),
        "--json",
        "--user",
        ALICE.address,
        "--password-stdin",
    ]
    processes = [
        subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(ALICE.password + "\n", timeout=120) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out + err
        assert {c["status"] for c in json.loads(out)["checks"]} == {"pass"}


def test_a_refused_connection_is_exit_2_with_one_line() -> None:
    (port,) = free_ports(1)
    result = run_check(f"{HOST}:{port}")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"relaygate: cannot check {HOST}:{port}: Connection refused\n"


def test_ipv6_literal_is_parsed_and_tried() -> None:
    (port,) = free_ports(1)
    result = run_check(f"[::1]:{port}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"relaygate: cannot check [::1]:{port}: ")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["host:99999"], "not a port number (1 to 65535): '99999'"),
        (["host", "--user", "a@example.com"], "--user and --password-stdin go together"),
        (["host", "--password-stdin"], "--user and --password-stdin go together"),
        (
            ["host", "--user", "a@b.test>\r\nRCPT TO:<x@y.test>", "--password-stdin"],
            "--user must be an address, without control characters",
        ),
        (["host", "--timeout", "0"], "--timeout must be more than 0 and at most 300 seconds"),
        (["host", "--ca-file", "/nonexistent/ca.pem"], "--ca-file /nonexistent/ca.pem: "),
        (["host", "--user", "a@example.com", "--password-stdin"], "--password-stdin: no "),
    ],
)
def test_usage_errors_exit_2(args: list[str], error: str) -> None:
    result = run_check(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"relaygate: {error}")
    assert len(result.stderr.splitlines()) == 1


# ------------------------------------------------------------------ over the API


def _post(base: str, token: str, body: object) -> tuple[int, Any]:
    return api_call("POST", f"{base}/api/v1/check", token, body, timeout=CHECK_TIMEOUT)


@pytest.fixture(scope="module")
def api_server(servers: ServerPool) -> tuple[Server, str, str, str]:
    (http_port,) = free_ports(1)
    server = servers.create(
        "check-api", users=[ALICE], sections={"http": {"address": f"{HOST}:{http_port}"}}
    )

    writer, reader = server.api_token("auditor"), server.api_token("watcher", "--read-only")
    return server, f"http://{HOST}:{http_port}", writer, reader


def test_the_api_checks_like_the_cli(api_server: tuple[Server, str, str, str]) -> None:
    server, base, token, _ = api_server
    body = {
        "target": f"{HOST}:{server.starttls_port}",
        "servername": TLS_NAME,
        "ca_pem": server.ca_bundle().read_text(),
        "user": ALICE.address,
        "password": ALICE.password,
    }
    status, document = _post(base, token, body)
    assert status == 200, document
    assert (document["host"], document["port"]) == (HOST, server.starttls_port)
    assert {c["id"]: c["status"] for c in document["checks"]} == {
        "starttls.offered": "pass",
        "tls.versions": "pass",
        "tls.certificate": "pass",
        "auth.before_tls": "pass",
        "auth.mechanisms": "pass",
        "relay.unauthenticated": "pass",
        "smuggling.bare_lf": "pass",
        "banner": "pass",
        "limits.size": "pass",
    }, document
    # The CLI's --json says the same of the same server (details may name times).
    cli = run_check(
        f"{HOST}:{server.starttls_port}",
        "--servername",
        TLS_NAME,
        "--ca-file",
        str(server.ca_bundle()),
        "--json",
    )
    assert [c["id"] for c in json.loads(cli.stdout)["checks"]] == [
        c["id"] for c in document["checks"] if c["id"] != "smuggling.bare_lf"
    ]
    # Implicit TLS, no CA given: the self-signed chain fails, the rest passes.
    status, document = _post(
        base, token, {"target": f"{HOST}:{server.implicit_port}", "implicit": True}
    )
    assert status == 200, document
    found = {c["id"]: c["status"] for c in document["checks"]}
    assert found.pop("tls.certificate") == "fail"
    assert set(found.values()) == {"pass"}, document
    # Who asked is logged; the password never is.
    runs = server.log_events("check.run")
    assert any(e["target"] == f"{HOST}:{server.starttls_port}" for e in runs), runs
    assert all(e["by"] == "token:auditor" for e in runs), runs
    assert ALICE.password not in server.log_text()


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({}, 400, "target is required"),
        ({"target": "a b"}, 400, "not a host name"),
        ({"target": "x.test", "implicit": "yes"}, 400, "implicit must be true or false"),
        ({"target": "x.test", "timeout": 0}, 400, "timeout must be"),
        ({"target": "x.test", "timeout": 61}, 400, "timeout must be"),
        ({"target": "x.test", "user": "a@b.test"}, 400, "user and password go together"),
        ({"target": "x.test", "ca_pem": "not a certificate"}, 400, "ca_pem holds no PEM"),
        ({"target": "x.test", "ca_file": "/etc/passwd"}, 400, "unknown field 'ca_file'"),
        # A CR LF in the login would put commands of the caller's own on the line.
        (
            {"target": "x.test", "user": "a@b.test>\r\nDATA\r\n", "password": "x"},
            400,
            "user must not hold control characters",
        ),
        ({"target": "x.test", "servername": "a\x00b"}, 400, "servername must not hold"),
        ({"target": f"{HOST}:1", "timeout": 2}, 502, f"cannot check {HOST}:1"),
    ],
)
def test_the_api_refuses_bad_requests_clearly(
    api_server: tuple[Server, str, str, str], body: dict[str, object], status: int, error: str
) -> None:
    _, base, token, _ = api_server
    got, answer = _post(base, token, body)
    assert got == status and error in answer["error"], answer


def test_the_api_check_needs_a_write_token(api_server: tuple[Server, str, str, str]) -> None:
    server, base, _, reader = api_server
    body = {"target": f"{HOST}:{server.starttls_port}"}
    status, answer = _post(base, reader, body)
    assert (status, answer["error"]) == (403, "token watcher is read-only")
    assert _post(base, "rgt_wrong", body)[0] == 401


def test_the_api_runs_four_checks_at_once_at_most(
    api_server: tuple[Server, str, str, str], tmp_path: Path
) -> None:
    _, base, token, _ = api_server
    # A server that never greets holds each check for its timeout (then 502).
    with BadSMTPServer(tmp_path, behaviour="silent") as slow:
        body = {"target": f"{slow.host}:{slow.port}", "timeout": 3}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: _post(base, token, body), range(6)))
    codes = sorted(code for code, _ in answers)
    assert codes.count(429) >= 2 and codes.count(502) >= 1, answers
    assert set(codes) <= {429, 502}, answers
