"""End to end: ``relaygate verify`` (CLI and POST /api/v1/verify) and the
RCPT-time domain check, against FakeDNS (the internet's DNS, on loopback) and
SMTP sinks on 127.66.x.y standing in for other people's MX servers, all on
one ``[delivery] mx_port``. No sink may ever see DATA from a probe."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import select
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fakes.dns_server import FakeDNS
from fakes.smtp_sink import DEFAULT_EXTENSIONS, SMTPSink, make_tls_context, sinks_on_one_port

from .delivery_helpers import loopback_address
from .helpers import ALICE, Server, ServerPool, api_call, clean_env, free_ports, make_message

PROCESS_TIMEOUT = 60


@dataclass
class World:
    dns: FakeDNS
    sinks: dict[str, SMTPSink]  # by role
    port: int
    dead: str  # an address where nothing listens on the port
    silent: str  # an address whose listener never says a word
    config: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    roles = ["good", "catchall", "grey", "implicit", "fallback", "idn", "bulk", "hostile", "slow"]
    hosts = [loopback_address() for _ in roles]
    dead, silent = loopback_address(), loopback_address()
    # The "good" MX offers STARTTLS with a certificate nobody trusts: probes use it.
    tls, _ = make_tls_context("mx.untrusted.test", tmp_path_factory.mktemp("tls"), ips=())
    good_host, grey_host = hosts[0], hosts[2]
    without_utf8 = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE")
    started = sinks_on_one_port(
        hosts,
        lambda h, p: SMTPSink(
            h,
            p,
            tls=tls if h == good_host else None,
            extensions=without_utf8 if h == grey_host else DEFAULT_EXTENSIONS,
        ),
    )
    sinks = dict(zip(roles, started, strict=True))
    port = started[0].port
    quiet = socket.socket()
    quiet.bind((silent, port))
    quiet.listen(16)  # the kernel completes handshakes; no one ever answers
    dns = FakeDNS().start()
    for role in roles:
        if role != "implicit":
            dns.add_a(f"mx.{role}.test", sinks[role].host)
            dns.add_mx(f"{role}.test", [(10, f"mx.{role}.test")])
    dns.add_a("implicit.test", sinks["implicit"].host)  # no MX: RFC 5321 5.1
    dns.add_a("mx-dead.fallback.test", dead)
    dns.add_mx("fallback.test", [(5, "mx-dead.fallback.test")])
    dns.add_mx("xn--bcher-kva.test", [(10, "mx.idn.test")])
    dns.add_mx("mailinator.com", [(10, "mx.catchall.test")])  # a known disposable domain
    dns.null_mx("nullmx.test")
    dns.add_a("mx.silent.test", silent)
    dns.add_mx("silent.test", [(10, "mx.silent.test")])
    dns.add_mx("slowdns.test", [(10, "mx.good.test")])
    dns.drop_queries("slowdns.test")
    dns.add_a("nomail.test", "127.0.0.1")  # exists, so no NXDOMAIN; then
    dns.remove("nomail.test", "A")  # neither MX nor address records
    dns.add_txt("nomail.test", "v=spf1 -all")
    sinks["good"].only_recipients(["alice@good.test", "postmaster@good.test"])
    sinks["fallback"].only_recipients(["alice@fallback.test"])
    sinks["implicit"].only_recipients(["alice@implicit.test"])
    sinks["idn"].only_recipients(["user@xn--bcher-kva.test"])
    sinks["grey"].reply_to("RCPT", "450 4.2.0 Greylisted, come back later", times=None)
    sinks["hostile"].reply_to(
        "RCPT", b"550 5.1.1 \x1b[2J\x1b]0;pwned\x07 no\x00 such\r user \xff", times=None
    )
    config = tmp_path_factory.mktemp("verify") / "relaygate.toml"
    config.write_text(
        '[server]\nhostname = "relay.verify.test"\n'
        f'[delivery]\nresolvers = ["{dns.address}"]\nmx_port = {port}\n'
        "allow_private_targets = true\n"
        '[verify]\npace = 0\ntimeout = 2\nprobe_from = "probe@relay.verify.test"\n',
        encoding="utf-8",
    )
    try:
        yield World(dns, sinks, port, dead, silent, config)
    finally:
        for sink in started:
            sink.stop()
        quiet.close()
        dns.stop()


def verify_command(world: World) -> list[str]:
    return [sys.executable, "-m", "relaygate", "--config", str(world.config), "verify"]


def verify(world: World, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*verify_command(world), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=clean_env(),
        check=False,
    )


def json_lines(text: str) -> dict[str, dict[str, Any]]:
    found = [json.loads(line) for line in text.splitlines()]
    return {item["address"]: item for item in found}


def lines(sink: SMTPSink) -> str:
    """Every command line the sink received, as one text (reprs of the bytes)."""
    return "\n".join(e.text for e in sink.events if e.kind == "command")


def assert_no_data(world: World) -> None:
    for sink in world.sinks.values():
        assert not any(c.upper().startswith(("DATA", "BDAT")) for c in sink.commands())
        assert sink.messages == []


def test_each_result_over_dns_and_smtp(world: World) -> None:
    addresses = [
        "alice@good.test",
        "bob@good.test",
        "postmaster@good.test",
        "anyone@catchall.test",
        "someone@grey.test",
        "x@nullmx.test",
        "x@missing.test",
        "x@nomail.test",
        "alice@implicit.test",
        "alice@fallback.test",
        "user@bücher.test",
        "usér@catchall.test",
        "usér@grey.test",
        "throwaway@mailinator.com",
        "x@silent.test",
        "x@slowdns.test",
        "not an address",
    ]
    started = time.monotonic()
    run = verify(world, "--json", "--smtp", *addresses)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 30
    got = json_lines(run.stdout)
    assert list(got) == addresses  # one object per address, in order

    def summary(address: str) -> tuple[str, list[str], object]:
        item = got[address]
        return item["result"], item["reasons"], item["catch_all"]

    assert set(got["alice@good.test"]) == {
        "address",
        "result",
        "reasons",
        "mx",
        "smtp",
        "catch_all",
        "detail",
    }
    assert summary("alice@good.test") == ("deliverable", [], False)
    assert got["alice@good.test"]["smtp"]["code"] == 250
    assert got["alice@good.test"]["mx"] == ["mx.good.test"]
    assert summary("bob@good.test") == ("undeliverable", ["mailbox_unknown"], None)
    assert got["bob@good.test"]["smtp"] == {"code": 550, "text": "5.1.1 No such user"}
    assert summary("postmaster@good.test") == ("risky", ["role"], False)
    assert summary("anyone@catchall.test") == ("risky", ["catch_all"], True)
    assert summary("someone@grey.test") == ("unknown", ["greylisted"], None)
    assert got["someone@grey.test"]["smtp"]["code"] == 450
    assert summary("x@nullmx.test") == ("undeliverable", ["null_mx"], None)
    assert summary("x@missing.test") == ("undeliverable", ["no_domain"], None)
    assert summary("x@nomail.test") == ("undeliverable", ["no_mx"], None)
    assert summary("alice@implicit.test") == ("deliverable", [], False)
    assert got["alice@implicit.test"]["mx"] == ["implicit.test"]
    assert summary("alice@fallback.test") == ("deliverable", [], False)
    assert got["alice@fallback.test"]["mx"] == ["mx-dead.fallback.test", "mx.fallback.test"]
    assert summary("user@bücher.test") == ("deliverable", [], False)
    assert "RCPT TO:<user@xn--bcher-kva.test>" in lines(world.sinks["idn"])
    assert summary("usér@catchall.test") == ("risky", ["catch_all"], True)
    assert "RCPT TO:<usér@catchall.test>" in lines(world.sinks["catchall"])
    assert "MAIL FROM:<probe@relay.verify.test> SMTPUTF8" in lines(world.sinks["catchall"])
    assert summary("usér@grey.test") == ("unknown", ["probe_refused"], None)
    assert "SMTPUTF8" in got["usér@grey.test"]["detail"]
    assert summary("throwaway@mailinator.com") == ("risky", ["disposable", "catch_all"], True)
    assert summary("x@silent.test") == ("unknown", ["timeout"], None)
    assert summary("x@slowdns.test") == ("unknown", ["timeout"], None)
    assert summary("not an address") == ("undeliverable", ["syntax"], None)
    # The probe: our MAIL FROM, never <>, never DATA; RSET and QUIT at the end.
    good = world.sinks["good"].commands()
    assert "MAIL FROM:<probe@relay.verify.test>" in lines(world.sinks["good"])
    assert "RSET" in good and "QUIT" in good
    assert good[:3] == ["EHLO", "STARTTLS", "EHLO"]  # the rest went encrypted
    assert_no_data(world)


def test_a_server_that_stops_answering_costs_one_timeout(world: World) -> None:
    sink = world.sinks["slow"]
    sink.delay_reply("RCPT", 30, times=None)  # banner, EHLO and MAIL answered; RCPT never
    addresses = [f"user{n}@slow.test" for n in range(20)]
    started = time.monotonic()
    run = verify(world, "--json", "--smtp", *addresses)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    got = json_lines(run.stdout)
    assert {(v["result"], tuple(v["reasons"])) for v in got.values()} == {("unknown", ("timeout",))}
    # [verify] timeout = 2, per_host = 2: two connections wait once each, in parallel.
    assert elapsed < 15, elapsed
    assert sink.connections <= 2
    assert_no_data(world)


def test_without_smtp_only_dns_is_asked(world: World) -> None:
    before = world.sinks["good"].connections
    run = verify(world, "alice@good.test", "x@nullmx.test")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["ADDRESS", "RESULT", "REASONS", "DETAIL"]
    assert lines[1].split()[:2] == ["alice@good.test", "deliverable"]
    assert lines[2].split()[:3] == ["x@nullmx.test", "undeliverable", "null_mx"]
    assert world.sinks["good"].connections == before


def test_a_thousand_addresses_at_one_domain_open_a_handful_of_connections(
    world: World, tmp_path: Path
) -> None:
    sink = world.sinks["bulk"]
    known = [f"user{n}@bulk.test" for n in range(0, 1000, 2)]
    sink.only_recipients(known)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"user{n}@bulk.test" for n in range(1000)) + "\n")
    before = sink.connections
    run = verify(world, "--smtp", "--file", str(listing))
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert len(rows) == 1000
    assert list(rows[0]) == [
        "address",
        "result",
        "reasons",
        "mx",
        "smtp_code",
        "smtp_text",
        "catch_all",
        "detail",
    ]
    results = {row["address"]: row["result"] for row in rows}
    assert results["user0@bulk.test"] == "deliverable"
    assert results["user1@bulk.test"] == "undeliverable"
    assert sum(r == "deliverable" for r in results.values()) == 500
    opened = sink.connections - before
    # per_host = 2, rcpts_per_connection = 100: ten connections, not a thousand.
    assert 1 <= opened <= 12, opened
    assert_no_data(world)


def test_csv_input_with_an_email_column_and_json_lines_out(world: World, tmp_path: Path) -> None:
    listing = tmp_path / "people.csv"
    listing.write_text('name,email\n"Alice, A.",alice@good.test\nNobody,x@missing.test\n')
    run = verify(world, "--json", "--file", str(listing))
    assert run.returncode == 0, run.stderr
    got = json_lines(run.stdout)
    assert list(got) == ["alice@good.test", "x@missing.test"]
    assert got["x@missing.test"]["result"] == "undeliverable"
    run = verify(world, "--file", "-", stdin="alice@good.test\n# a comment\n\nx@nullmx.test\n")
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert [r["address"] for r in rows] == ["alice@good.test", "x@nullmx.test"]
    assert rows[1]["reasons"] == "null_mx"


def test_hostile_remote_replies_are_cleaned_everywhere(world: World) -> None:
    for args in (["--smtp"], ["--smtp", "--json"]):
        run = verify(world, *args, "victim@hostile.test")
        assert run.returncode == 0, run.stderr
        for char in ("\x1b", "\x00", "\x07", "\r", "\udcff", "\ufffd"):
            assert char not in run.stdout
        assert "undeliverable" in run.stdout and "\\x1b[2J" in run.stdout
    got = json_lines(run.stdout)["victim@hostile.test"]
    assert got["smtp"]["text"].startswith("5.1.1 \\x1b[2J\\x1b]0;pwned\\x07 no\\x00 such")
    assert got["reasons"] == ["mailbox_unknown"]
    run = verify(world, "\x1b[31mevil@good.test")
    assert "\x1b" not in run.stdout and "syntax" in run.stdout


def test_usage_errors_exit_2_with_one_line(world: World, tmp_path: Path) -> None:
    for args in ([], ["--file", str(tmp_path / "absent.txt")], ["--concurrency", "0", "a@b.test"]):
        run = verify(world, *args)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert verify(world, "--file", str(empty)).returncode == 2


def test_verify_needs_no_config_and_makes_no_data_dir(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "relaygate", "verify", "--json", "bad@@address"],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["reasons"] == ["syntax"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the server side


@pytest.fixture(scope="module")
def checking_server(servers: ServerPool, world: World) -> Iterator[tuple[Server, str, str]]:
    (http_port,) = free_ports(1)
    server = servers.create(
        "verify-rcpt-check",
        users=[ALICE],
        sections={
            "http": {"address": f"127.0.0.1:{http_port}"},
            "delivery": {
                "resolvers": [world.dns.address],
                "mx_port": world.port,
                "allow_private_targets": True,
            },
            "submission": {"check_recipient_domains": True},
            "verify": {"pace": 0, "timeout": 2, "max_api_addresses": 5},
            # A recipient limit too: RCPT then passes the domain check, then the limit.
            "sending_limits": {"recipients_per_day": 1000},
        },
    )
    token = server.api_token("verifier")
    yield server, f"http://127.0.0.1:{http_port}", token


def test_rcpt_time_domain_check(checking_server: tuple[Server, str, str], world: World) -> None:
    server, _, _ = checking_server
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.implicit_port, context=server.client_context(), timeout=20
    ) as client:
        client.login(ALICE.address, ALICE.password)
        assert client.mail(ALICE.address)[0] == 250
        code, text = client.rcpt("x@missing.test")
        assert (code, text) == (550, b"5.1.2 Domain missing.test does not exist")
        code, text = client.rcpt("x@nullmx.test")
        assert (code, text) == (550, b"5.1.2 Domain nullmx.test accepts no mail (null MX)")
        code, text = client.rcpt("x@nomail.test")
        assert code == 550 and text.startswith(b"5.1.2 Domain nomail.test has no MX")
        started = time.monotonic()
        code, text = client.rcpt("x@slowdns.test")
        assert (code, text) == (
            451,
            b"4.4.3 DNS lookup for slowdns.test timed out, try again later",
        )
        assert time.monotonic() - started < 10
        assert client.rcpt("friend@good.test")[0] == 250
        # A second recipient at a domain seen before: answered from the cache.
        world.dns.clear_queries()
        assert client.rcpt("other@good.test")[0] == 250
        assert client.rcpt("y@missing.test")[0] == 550
        assert [q for q in world.dns.queries if q[0] in ("good.test", "missing.test")] == []
        message = make_message(
            from_addr=ALICE.address, to=["friend@good.test"], subject="verify-rcpt-check"
        )
        assert client.data(message)[0] == 250
    assert "verify-rcpt-check" in server.subjects()
    refused = server.log_events("rcpt.refused")
    assert {e["reason"] for e in refused} == {"domain"}
    assert {e["reply"] for e in refused} == {"550 5.1.2", "451 4.4.3"}


def test_the_verify_api_route(checking_server: tuple[Server, str, str], world: World) -> None:
    _, base, token = checking_server
    status, body = api_call(
        "POST",
        f"{base}/api/v1/verify",
        token,
        {"addresses": ["alice@good.test", "bob@good.test", "x@nullmx.test"], "smtp": True},
    )
    assert status == 200, body
    results = {r["address"]: r for r in body["results"]}
    assert results["alice@good.test"]["result"] == "deliverable"
    assert results["bob@good.test"]["smtp"] == {"code": 550, "text": "5.1.1 No such user"}
    assert results["x@nullmx.test"]["reasons"] == ["null_mx"]
    status, body = api_call("POST", f"{base}/api/v1/verify", token, {"addresses": ["a@b.test"] * 6})
    assert status == 400 and "at most 5 addresses" in body["error"]
    bad_bodies: list[dict[str, Any]] = [
        {"addresses": []},
        {"addresses": [1]},
        {"addresses": ["a@b.test"], "x": 1},
        {"addresses": ["a@b.test"], "smtp": "yes"},
    ]
    for bad in bad_bodies:
        assert api_call("POST", f"{base}/api/v1/verify", token, bad)[0] == 400
    assert (
        api_call("POST", f"{base}/api/v1/verify", "wrong-token", {"addresses": ["a@b.test"]})[0]
        == 401
    )
    assert_no_data(world)


def test_the_rcpt_check_is_turned_on_by_a_reload(fresh_servers: ServerPool, world: World) -> None:
    server = fresh_servers.create(
        "verify-reload",
        workers=2,
        users=[ALICE],
        sections={"delivery": {"resolvers": [world.dns.address]}},
    )

    def rcpt_reply(recipient: str) -> tuple[int, bytes]:
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.implicit_port, context=server.client_context(), timeout=20
        ) as client:
            client.login(ALICE.address, ALICE.password)
            client.mail(ALICE.address)
            return client.rcpt(recipient)

    assert rcpt_reply("x@missing.test")[0] == 250  # off by default
    server.sections["submission"] = {"check_recipient_domains": True}
    server.write_config()
    result = server.cli("reload")
    assert "restart" not in result.stdout, result.stdout
    for _ in range(4):  # whichever worker takes the connection
        assert rcpt_reply("x@missing.test") == (550, b"5.1.2 Domain missing.test does not exist")


def test_parallel_api_requests_share_one_dns_look_up(
    checking_server: tuple[Server, str, str], world: World
) -> None:
    _, base, token = checking_server
    world.dns.add_a("mx.parallel.test", world.sinks["good"].host)
    world.dns.add_mx("parallel.test", [(10, "mx.parallel.test")])
    world.dns.clear_queries()
    body = {"addresses": [f"user{n}@parallel.test" for n in range(5)]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: api_call("POST", f"{base}/api/v1/verify", token, body), range(8))
        )
    assert {status for status, _ in answers} == {200}
    for _, answer in answers:
        assert [r["result"] for r in answer["results"]] == ["deliverable"] * 5
    assert world.dns.queries.count(("parallel.test", "MX")) == 1


def test_a_progress_bar_on_a_terminal_only(world: World, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"x{n}@nullmx.test\n" for n in range(60)))
    leader, follower = pty.openpty()
    try:
        run = subprocess.run(
            [*verify_command(world), "--file", str(listing)],
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            timeout=PROCESS_TIMEOUT,
            env=clean_env(),
            check=False,
        )
        os.close(follower)
        follower = -1
        seen = b""
        while select.select([leader], [], [], 0.5)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert run.returncode == 0
    assert b"60/60" in seen and b"[####" in seen
    assert "60/60" not in run.stdout and len(run.stdout.splitlines()) == 61  # header + rows
    assert "60/60" not in verify(world, "--file", str(listing)).stderr  # not a terminal
