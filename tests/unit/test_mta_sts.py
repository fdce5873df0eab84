"""MTA-STS (RFC 8461): policy parsing, MX matching, and discovery end to end.

Discovery runs against ``FakeDNS`` and a small HTTPS server on 127.0.0.5
(a thread running ``http.server``), whose certificate comes from a throwaway
CA trusted through ``SSL_CERT_FILE``. Nothing leaves this machine.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from relaygate.delivery.mta_sts import MTASTS, Policy, PolicyError, apply, parse_policy
from relaygate.storage.sqlite_queue import read_policy, write_policy

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:  # `fakes` lives in tests/, beside unit/
    sys.path.insert(0, _TESTS_DIR)

from fakes import FakeDNS, make_tls_context  # noqa: E402

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")

DOMAIN = "example.test"
POLICY_HOST = "mta-sts.example.test"
POLICY_IP = "127.0.0.5"
T0 = 1_700_000_000.0
DAY = 86400

POLICY = (
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mx1.example.test\r\n"
    "mx: *.backup.example.test\r\n"
    "max_age: 86400\r\n"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10.0))


# -- parse_policy ----------------------------------------------------------------


def test_parse_policy_crlf() -> None:
    policy = parse_policy(POLICY)
    assert policy == Policy(
        mode="enforce", mx=("mx1.example.test", "*.backup.example.test"), max_age=DAY, id=""
    )


def test_parse_policy_lf_whitespace_unknown_keys_and_id() -> None:
    text = (
        "version: STSv1\n"
        "mode:testing   \n"
        "\n"
        "mx: MX.Example.COM.\n"
        "mx: mx.example.com\n"
        "comment_1: anything at all; even = signs\n"
        "max_age: 0\n"
    )
    policy = parse_policy(text, policy_id="abc123")
    assert policy == Policy(mode="testing", mx=("mx.example.com",), max_age=0, id="abc123")


def test_parse_policy_mode_none_needs_no_mx() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 31557600")
    assert policy.mode == "none"
    assert policy.mx == ()
    assert policy.max_age == 31557600


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("mode: enforce\nmx: mx.example.com\nmax_age: 86400\n", id="no-version"),
        pytest.param("version: STSv2\nmode: enforce\nmx: a.example.com\nmax_age: 1", id="v2"),
        pytest.param("version: stsv1\nmode: enforce\nmx: a.example.com\nmax_age: 1", id="case"),
        pytest.param("version: STSv1\nmx: mx.example.com\nmax_age: 86400\n", id="no-mode"),
        pytest.param("version: STSv1\nmode: Enforce\nmx: a.example.com\nmax_age: 1", id="Mode"),
        pytest.param("version: STSv1\nmode: strict\nmx: a.example.com\nmax_age: 1", id="mode?"),
        pytest.param("version: STSv1\nMode: enforce\nmx: a.example.com\nmax_age: 1", id="Key"),
        pytest.param("version: STSv1\nmode: enforce\nmx: mx.example.com\n", id="no-max-age"),
        pytest.param(
            "version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: 31557601", id="max-age>"
        ),
        pytest.param("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: -1", id="neg"),
        pytest.param("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: 1d", id="1d"),
        pytest.param(
            "version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: 00000000001", id="11dig"
        ),
        pytest.param("version: STSv1\nmode: enforce\nmax_age: 86400\n", id="enforce-no-mx"),
        pytest.param("version: STSv1\nmode: testing\nmax_age: 86400\n", id="testing-no-mx"),
        pytest.param(
            "version: STSv1\nmode: enforce\nmx: *.*.example.com\nmax_age: 1", id="double-wild"
        ),
        pytest.param("version: STSv1\nmode: enforce\nmx: *\nmax_age: 1", id="bare-wild"),
        pytest.param("version: STSv1\nmode: enforce\nmx: a b.example\nmax_age: 1", id="space"),
        pytest.param("version: STSv1\nmode: enforce\nmx: mx.ex_ample.com\nmax_age: 1", id="_"),
        pytest.param("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age\n", id="colon"),
        pytest.param("version: STSv1\nmode enforce\nmx: a.example.com\nmax_age: 1", id="nocolon"),
        pytest.param("version: STSv1\nmode: enforce\nmx:\nmax_age: 1", id="empty-value"),
        pytest.param(
            "version: STSv1\nmode: testing\nmode: enforce\nmx: a.example.com\nmax_age: 1",
            id="two-modes",
        ),
        pytest.param(
            "version: STSv1\nversion: STSv1\nmode: none\nmax_age: 1\nmax_age: 2", id="twice"
        ),
        pytest.param("<html><body>Not found</body></html>", id="html"),
        pytest.param("", id="empty"),
    ],
)
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


# -- matches / apply ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("mx1.example.test", True),
        ("MX1.Example.TEST.", True),
        ("mx2.example.test", False),
        ("example.test", False),
        ("a.backup.example.test", True),
        ("A.BACKUP.example.test.", True),
        ("backup.example.test", False),
        ("a.b.backup.example.test", False),
        ("abackup.example.test", False),
        ("", False),
        (".", False),
    ],
)
def test_matches(host: str, expected: bool) -> None:
    assert parse_policy(POLICY).matches(host) is expected


def test_matches_pattern_with_final_dot_and_case() -> None:
    policy = Policy(mode="enforce", mx=("*.Example.COM.", "MX.Other.Test."), max_age=1, id="x")
    assert policy.matches("mail.example.com")
    assert policy.matches("mx.other.test")
    assert not policy.matches("example.com")


def test_apply_enforce_keeps_matching_hosts_and_requires_tls() -> None:
    hosts = ["evil.attacker.test", "mx1.example.test", "x.backup.example.test", "mx1.example.test"]
    assert apply(parse_policy(POLICY), hosts) == (
        ["mx1.example.test", "x.backup.example.test", "mx1.example.test"],
        True,
    )
    assert apply(parse_policy(POLICY), ["evil.attacker.test"]) == ([], True)


@pytest.mark.parametrize("mode", ["testing", "none"])
def test_apply_testing_and_none_change_nothing(mode: str) -> None:
    policy = parse_policy(POLICY.replace("mode: enforce", f"mode: {mode}"))
    hosts = ["evil.attacker.test", "mx1.example.test"]
    result, tls = apply(policy, hosts)
    assert (result, tls) == (hosts, False)
    assert result is not hosts


def test_apply_without_policy() -> None:
    assert apply(None, ["a.example", "b.example"]) == (["a.example", "b.example"], False)


# -- a policy web server -----------------------------------------------------------


@dataclass
class Request:
    path: str
    host: str | None


class PolicySite:
    """HTTPS on 127.0.0.5:<free port>, answering every GET as its attributes say."""

    def __init__(self, context: ssl.SSLContext, host: str = POLICY_IP) -> None:
        self.status = 200
        self.content_type: str | None = "text/plain; charset=utf-8"
        self.body = POLICY.encode()
        self.framing = "length"  # "length" | "chunked" | "eof"
        self.extra_headers: list[tuple[str, str]] = []
        self.delay = 0.0
        self.requests: list[Request] = []
        self.server_names: list[str | None] = []
        self._lock = threading.Lock()
        context.sni_callback = self._sni
        self._server = _Server((host, 0), _Handler)
        self._server.site = self
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _sni(self, _sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        with self._lock:
            self.server_names.append(name)

    def serve(self, policy: str) -> None:
        self.body = policy.encode()

    def start(self) -> PolicySite:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    site: PolicySite

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that refused our certificate, say: not the test's business


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5.0
    server: _Server

    def do_GET(self) -> None:
        site = self.server.site
        site.record(Request(self.path, self.headers.get("Host")))
        if site.delay:
            time.sleep(site.delay)
        self.send_response(site.status)
        if site.content_type is not None:
            self.send_header("Content-Type", site.content_type)
        for name, value in site.extra_headers:
            self.send_header(name, value)
        if site.framing == "length":
            self.send_header("Content-Length", str(len(site.body)))
        elif site.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        if site.framing == "chunked":
            for i in range(0, len(site.body), 7):
                piece = site.body[i : i + 7]
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        else:
            self.wfile.write(site.body)
        self.wfile.flush()
        if site.framing == "eof":
            assert isinstance(self.connection, ssl.SSLSocket)
            self.connection.unwrap()  # close_notify, then the TCP close
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- discovery end to end ----------------------------------------------------------


@dataclass
class World:
    dns: FakeDNS
    site: PolicySite
    db_path: Path
    db: sqlite3.Connection
    sts: MTASTS
    tmp_path: Path

    def publish(self, policy_id: str, domain: str = DOMAIN) -> None:
        self.dns.remove(f"_mta-sts.{domain}", "TXT")
        self.dns.add_txt(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id};")

    def lookup(self, now: float, domain: str = DOMAIN) -> Policy | None:
        return run(self.sts.policy_for(domain, now))


class ConnectionCache:
    """storage.api.PolicyCache on one sqlite3 connection (the SQL of SQLitePolicyCache,
    without its thread: these tests run each lookup in a new event loop)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def get(self, domain: str, now: float) -> tuple[str, str] | None:
        return read_policy(self.db, domain, now)

    async def put(
        self, domain: str, policy_id: str, text: str, now: float, expires_at: float
    ) -> None:
        write_policy(self.db, domain, policy_id, text, now=now, expires_at=expires_at)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    context, ca_path = make_tls_context(POLICY_HOST, tmp_path / "tls", ips=())
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    site = PolicySite(context).start()
    fake = FakeDNS().start()
    try:
        fake.add_txt("_mta-sts.example.test", "v=STSv1; id=20240101T000000;")
        fake.add_txt("_mta-sts.example.test", "some other text record")
        fake.add_a(POLICY_HOST, POLICY_IP)
        db_path = tmp_path / "relaygate.db"
        db = sqlite3.connect(db_path, isolation_level=None)
        sts = MTASTS(
            ConnectionCache(db), fake.async_resolver(), https_port=site.port, fetch_timeout=3.0
        )
        yield World(fake, site, db_path, db, sts, tmp_path)
        db.close()
    finally:
        fake.stop()
        site.stop()


def test_policy_fetched_then_served_from_cache(world: World) -> None:
    policy = world.lookup(T0)
    assert policy == Policy(
        mode="enforce",
        mx=("mx1.example.test", "*.backup.example.test"),
        max_age=DAY,
        id="20240101T000000",
    )
    assert world.sts.last_error is None
    assert world.site.requests == [
        Request("/.well-known/mta-sts.txt", f"{POLICY_HOST}:{world.site.port}")
    ]
    assert world.site.server_names == [POLICY_HOST]  # SNI
    row = world.db.execute(
        "SELECT domain, id, policy, fetched_at, expires_at FROM mta_sts_policies"
    ).fetchone()
    assert row == (DOMAIN, "20240101T000000", POLICY, T0, T0 + DAY)

    assert world.lookup(T0 + 3600) == policy
    assert world.lookup(T0 + DAY - 1, domain="Example.TEST.") == policy
    assert len(world.site.requests) == 1
    # The cache is committed: another connection (another process) sees it.
    other = MTASTS(
        ConnectionCache(sqlite3.connect(world.db_path)), world.dns.async_resolver(), https_port=1
    )
    assert run(other.policy_for(DOMAIN, T0 + 10)) == policy
    assert len(world.site.requests) == 1


def test_concurrent_lookups_fetch_once(world: World) -> None:
    world.site.delay = 0.2

    async def both() -> list[Policy | None]:
        return list(
            await asyncio.gather(world.sts.policy_for(DOMAIN, T0), world.sts.policy_for(DOMAIN, T0))
        )

    first, second = run(both())
    assert first is not None
    assert first == second
    assert len(world.site.requests) == 1


def test_new_id_triggers_refetch(world: World) -> None:
    assert world.lookup(T0) is not None
    world.site.serve(POLICY.replace("mode: enforce", "mode: testing"))
    world.publish("20240202")
    policy = world.lookup(T0 + 60)
    assert policy is not None
    assert (policy.mode, policy.id) == ("testing", "20240202")
    assert len(world.site.requests) == 2
    assert world.db.execute("SELECT id FROM mta_sts_policies").fetchall() == [("20240202",)]


def test_expired_cache_refetches(world: World) -> None:
    assert world.lookup(T0) is not None
    world.site.serve(POLICY.replace("max_age: 86400", "max_age: 604800"))
    policy = world.lookup(T0 + DAY + 1)
    assert policy is not None
    assert policy.max_age == 7 * DAY
    assert len(world.site.requests) == 2
    row = world.db.execute("SELECT fetched_at, expires_at FROM mta_sts_policies").fetchone()
    assert row == (T0 + DAY + 1, T0 + DAY + 1 + 7 * DAY)


def test_txt_missing_keeps_cached_policy_until_max_age(world: World) -> None:
    policy = world.lookup(T0)
    assert policy is not None
    world.dns.remove("_mta-sts.example.test")
    assert world.lookup(T0 + DAY - 1) == policy
    assert world.lookup(T0 + DAY + 1) is None
    assert world.sts.last_error is None
    assert len(world.site.requests) == 1


def test_txt_dns_failure_keeps_cached_policy(world: World) -> None:
    policy = world.lookup(T0)
    world.dns.servfail("_mta-sts.example.test", "TXT")
    assert world.lookup(T0 + 60) == policy
    assert world.sts.last_error is not None
    assert "_mta-sts.example.test" in world.sts.last_error


def test_no_txt_record_means_no_policy(world: World) -> None:
    world.dns.remove("_mta-sts.example.test")
    assert world.lookup(T0) is None
    assert world.sts.last_error is None
    assert world.site.requests == []


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(["v=STSv1; id=a1;", "v=STSv1; id=b2;"], id="two-records"),
        pytest.param(["v=STSv1;"], id="no-id"),
        pytest.param(["v=STSv1; id=not-alnum;"], id="bad-id"),
        pytest.param(["v=STSv1; id=" + "a" * 33], id="long-id"),
        pytest.param(["v=STSv1; id=abc; junk"], id="junk"),
    ],
)
def test_unusable_txt_record_means_no_policy(world: World, records: list[str]) -> None:
    world.dns.remove("_mta-sts.example.test")
    for record in records:
        world.dns.add_txt("_mta-sts.example.test", record)
    assert world.lookup(T0) is None
    assert world.sts.last_error is not None
    assert world.site.requests == []


def test_txt_record_variants_accepted(world: World) -> None:
    world.dns.remove("_mta-sts.example.test")
    world.dns.add_txt("_mta-sts.example.test", "v=STSv1 ;id=X9 ; ext=ok")
    policy = world.lookup(T0)
    assert policy is not None
    assert policy.id == "X9"


@pytest.mark.parametrize(
    ("status", "content_type", "headers", "reason"),
    [
        pytest.param(404, "text/plain", [], "404", id="404"),
        pytest.param(500, "text/plain", [], "500", id="500"),
        pytest.param(
            301,
            "text/plain",
            [("Location", f"https://{POLICY_HOST}/elsewhere.txt")],
            "redirect",
            id="redirect",
        ),
        pytest.param(200, "text/html", [], "text/html", id="html"),
        pytest.param(200, None, [], "missing", id="no-content-type"),
    ],
)
def test_http_failures_mean_no_policy(
    world: World,
    status: int,
    content_type: str | None,
    headers: list[tuple[str, str]],
    reason: str,
) -> None:
    world.site.status = status
    world.site.content_type = content_type
    world.site.extra_headers = headers
    assert world.lookup(T0) is None
    assert world.sts.last_error is not None
    assert reason in world.sts.last_error
    assert [r.path for r in world.site.requests] == ["/.well-known/mta-sts.txt"]
    assert world.db.execute("SELECT COUNT(*) FROM mta_sts_policies").fetchone() == (0,)


def test_failed_fetch_falls_back_to_cached_policy_of_another_id(world: World) -> None:
    policy = world.lookup(T0)
    assert policy is not None
    world.publish("20240303")
    world.site.status = 404
    assert world.lookup(T0 + 60) == policy
    assert world.sts.last_error is not None
    assert "404" in world.sts.last_error
    assert len(world.site.requests) == 2
    # Once the cached policy expires there is nothing to fall back on.
    assert world.lookup(T0 + DAY + 1) is None


def test_malformed_policy_means_no_policy(world: World) -> None:
    world.site.serve("version: STSv1\nmode: enforce\nmax_age: 86400\n")  # no mx
    assert world.lookup(T0) is None
    assert world.sts.last_error is not None
    assert "mx" in world.sts.last_error


def test_untrusted_certificate_means_no_policy(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, other_ca = make_tls_context("someone.else.test", world.tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    assert world.lookup(T0) is None
    assert world.sts.last_error is not None
    assert "certificate" in world.sts.last_error.lower()
    assert world.site.requests == []


def test_certificate_for_another_name_means_no_policy(world: World) -> None:
    # mta-sts.other.test resolves to the same server, whose certificate
    # names only mta-sts.example.test.
    world.publish("abc", domain="other.test")
    world.dns.add_a("mta-sts.other.test", POLICY_IP)
    assert world.lookup(T0, domain="other.test") is None
    assert world.sts.last_error is not None
    assert "certificate" in world.sts.last_error.lower()
    assert world.site.server_names == ["mta-sts.other.test"]
    assert world.site.requests == []


def test_policy_host_without_address_means_no_policy(world: World) -> None:
    world.dns.remove(POLICY_HOST)
    assert world.lookup(T0) is None
    assert world.sts.last_error is not None
    assert POLICY_HOST in world.sts.last_error


def test_nothing_listening_means_no_policy(world: World) -> None:
    with socket.socket() as probe:  # a port that refuses connections
        probe.bind((POLICY_IP, 0))
        port = probe.getsockname()[1]
    sts = MTASTS(
        ConnectionCache(world.db), world.dns.async_resolver(), https_port=port, fetch_timeout=3.0
    )
    assert run(sts.policy_for(DOMAIN, T0)) is None
    assert sts.last_error is not None
    assert POLICY_IP in sts.last_error


def test_slow_server_times_out(world: World) -> None:
    world.site.delay = 1.5
    sts = MTASTS(
        ConnectionCache(world.db),
        world.dns.async_resolver(),
        https_port=world.site.port,
        fetch_timeout=0.5,
    )
    started = time.monotonic()
    assert run(sts.policy_for(DOMAIN, T0)) is None
    assert time.monotonic() - started < 1.4
    assert sts.last_error is not None
    assert "took over" in sts.last_error


def test_oversized_policy_refused(world: World) -> None:
    world.site.serve(POLICY + "padding: " + "x" * 200 + "\r\n")
    sts = MTASTS(
        ConnectionCache(world.db),
        world.dns.async_resolver(),
        https_port=world.site.port,
        max_body=len(POLICY),
    )
    assert run(sts.policy_for(DOMAIN, T0)) is None
    assert sts.last_error is not None
    assert "larger than" in sts.last_error


@pytest.mark.parametrize("framing", ["chunked", "eof"])
def test_other_body_framings(world: World, framing: str) -> None:
    world.site.framing = framing
    policy = world.lookup(T0)
    assert world.sts.last_error is None
    assert policy == parse_policy(POLICY, policy_id="20240101T000000")


def test_mode_none_policy_is_returned_and_changes_nothing(world: World) -> None:
    world.site.serve("version: STSv1\nmode: none\nmax_age: 86400\n")
    policy = world.lookup(T0)
    assert policy is not None
    assert policy.mode == "none"
    assert apply(policy, ["any.host.test"]) == (["any.host.test"], False)


def test_enforce_end_to_end_with_apply(world: World) -> None:
    policy = world.lookup(T0)
    mx_hosts = ["mx1.example.test", "mx9.example.test", "b.backup.example.test"]
    assert apply(policy, mx_hosts) == (["mx1.example.test", "b.backup.example.test"], True)


def test_invalid_domain_is_not_looked_up(world: World) -> None:
    assert world.lookup(T0, domain="bad domain\r\nHost: x") is None
    assert world.sts.last_error is not None
    assert world.site.requests == []
