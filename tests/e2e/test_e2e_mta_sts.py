"""End to end: MTA-STS (RFC 8461) on MX delivery.

A real relaygate (``[delivery] mode = "mx"``) looks domains up in ``FakeDNS``
and delivers to SMTP sinks on fresh 127.66.x.y addresses (all on ``mx_port``).
Each test domain publishes ``_mta-sts.<domain> TXT "v=STSv1; id=..."`` and its
policy is served by ``PolicySite``: one small HTTPS server (a thread running
``http.server``) on a 127.66.x.y address and the port relaygate is told to
use (``mta_sts_port``), which picks the certificate for ``mta-sts.<domain>``
by SNI. Every certificate (policy hosts and MX hosts) comes from its own
throwaway CA; all of those CAs are in one bundle, the server's
``SSL_CERT_FILE``. ``untrusted_tls`` comes from a CA that is left out.

The module's server retries only after 10 minutes (``retry_schedule =
[600]``): a second attempt happens only when a test asks for it with
``relaygate queue retry``. A second server, ``mta_sts = false``, checks that
policies can be switched off.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fakes.dns_server import FakeDNS
from fakes.smtp_sink import SMTPSink, make_tls_context

from .delivery_helpers import (
    WAIT,
    DeliveryServer,
    ca_bundle,
    delivery_toml,
    find_dsns,
    history,
    loopback_address,
    new_server,
    queue_rows_for,
    start_sinks,
    status_of,
    submit_one,
    wait_status,
)
from .helpers import ServerPool, User, free_ports, wait_until

pytestmark = pytest.mark.timeout(60)

SENDER = User("alice@example.test", "Alice-sts-pw-4Rq8Zm2x")

VERIFIED = "sts-verified.test"  # enforce, MX listed, trusted certificate
MISMATCH = "sts-mismatch.test"  # enforce, MX not listed (until the policy changes)
CLEAR = "sts-clear.test"  # enforce, MX listed, no STARTTLS offered
UNTRUSTED = "sts-untrusted.test"  # enforce, MX listed, certificate from an unknown CA
WRONG_NAME = "sts-wrong-name.test"  # enforce, MX listed, trusted certificate for another name
WILDCARD = "sts-wildcard.test"  # enforce, mx: *.backup.<domain>; the preferred MX unlisted
BACKUP_MX = f"b.backup.{WILDCARD}"
TESTING = "sts-testing.test"  # testing, MX not listed
CACHED = "sts-cached.test"  # enforce: two messages, one fetch
SWITCHED_OFF = "sts-off.test"  # enforce, MX not listed, on the mta_sts = false server
DOMAINS = (
    VERIFIED,
    MISMATCH,
    CLEAR,
    UNTRUSTED,
    WRONG_NAME,
    WILDCARD,
    TESTING,
    CACHED,
    SWITCHED_OFF,
)

DEFERRED_WAIT = 10.0  # one attempt: DNS, a policy fetch, one SMTP connection


def mx_host(domain: str) -> str:
    return f"mx.{domain}"


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {host}" for host in mx)]
    return "\r\n".join([*lines, f"max_age: {max_age}", ""])


# ------------------------------------------------------------------ the policy web server


@dataclass(frozen=True)
class Request:
    host: str | None  # the Host header
    path: str


class PolicySite:
    """``https://mta-sts.<domain>/.well-known/mta-sts.txt`` for every domain of
    ``contexts`` (domain -> server context with a certificate for
    ``mta-sts.<domain>``), on ``host`` and a free port; the certificate is
    chosen by SNI. ``publish`` sets a domain's policy body; a domain without
    one gets 404."""

    def __init__(self, host: str, contexts: Mapping[str, ssl.SSLContext]) -> None:
        self._lock = threading.Lock()
        self._contexts = {f"mta-sts.{domain}": ctx for domain, ctx in contexts.items()}
        self._bodies: dict[str, bytes] = {}
        self._requests: list[Request] = []
        self._server_names: list[str | None] = []
        first = next(iter(contexts.values()))
        first.sni_callback = self._sni
        self._server = _Server((host, 0), _Handler)
        self._server.site = self
        self._server.socket = first.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mta-sts-site",
            daemon=True,
        )

    def _sni(self, sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        with self._lock:
            self._server_names.append(name)
        context = self._contexts.get((name or "").lower())
        if context is not None:
            sock.context = context

    def start(self) -> PolicySite:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def publish(self, domain: str, body: str) -> None:
        with self._lock:
            self._bodies[f"mta-sts.{domain}"] = body.encode()

    def body_for(self, host_header: str | None) -> bytes | None:
        name = (host_header or "").rsplit(":", 1)[0].lower()
        with self._lock:
            return self._bodies.get(name)

    def record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def requests(self, domain: str) -> list[Request]:
        """The HTTP requests (Host: mta-sts.<domain>:PORT) for ``domain``'s policy."""
        with self._lock:
            return [r for r in self._requests if r.host == f"mta-sts.{domain}:{self.port}"]

    def handshakes(self, domain: str) -> int:
        """TLS connections that asked (SNI) for ``mta-sts.<domain>``."""
        with self._lock:
            return self._server_names.count(f"mta-sts.{domain}")


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
        host = self.headers.get("Host")
        site.record(Request(host, self.path))
        body = site.body_for(host) if self.path == "/.well-known/mta-sts.txt" else None
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body or b"")))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body or b"")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


# ------------------------------------------------------------------ the world


@dataclass
class World:
    dns: FakeDNS
    site: PolicySite
    port: int  # every MX sink listens on this port (relaygate's mx_port)
    server: DeliveryServer  # mta_sts = true (the default)
    mx_tls: dict[str, ssl.SSLContext]  # MX host name -> context for it, trusted
    untrusted_tls: ssl.SSLContext  # from a CA relaygate does not know
    bundle: Path
    pool: ServerPool

    def mx(self, domain: str, address: str) -> None:
        """``domain``'s one MX, ``mx_host(domain)``, at ``address``."""
        self.dns.add_mx(domain, [(10, mx_host(domain))])
        self.dns.add_a(mx_host(domain), address)

    def publish(self, domain: str, policy_id: str, body: str) -> None:
        """Serve ``body`` as ``domain``'s policy and announce it with id ``policy_id``."""
        self.site.publish(domain, body)
        self.dns.remove(f"_mta-sts.{domain}", "TXT")
        self.dns.add_txt(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id};")
        self.dns.remove(f"mta-sts.{domain}", "A")
        self.dns.add_a(f"mta-sts.{domain}", self.site.host)

    def sinks(self, count: int, **options: Any) -> AbstractContextManager[list[SMTPSink]]:
        hosts = [loopback_address() for _ in range(count)]
        return start_sinks(hosts, self.port, **options)

    def txt_queries(self, domain: str) -> int:
        return self.dns.queries.count((f"_mta-sts.{domain}", "TXT"))


def _server_toml(dns: FakeDNS, port: int, https_port: int, *, mta_sts: bool) -> str:
    return delivery_toml(
        {
            "mode": "mx",
            "resolvers": [dns.address],
            "mx_port": port,
            "allow_private_targets": True,  # the sinks are on 127.66.x.y
            "mta_sts": mta_sts,
            "mta_sts_port": https_port,
            "retry_schedule": [600],
            "delay_warning_after": 0,
            "per_destination": 2,
            "connect_timeout": 3,
            "command_timeout": 10,
        }
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("e2e-mta-sts")
    tls_dir = base / "tls"
    cas: list[Path] = []
    site_tls: dict[str, ssl.SSLContext] = {}
    mx_tls: dict[str, ssl.SSLContext] = {}
    for domain in DOMAINS:
        site_tls[domain], site_ca = make_tls_context(f"mta-sts.{domain}", tls_dir, ips=())
        cas.append(site_ca)
    for host in [*map(mx_host, DOMAINS), BACKUP_MX]:
        mx_tls[host], mx_ca = make_tls_context(host, tls_dir, ips=())
        cas.append(mx_ca)
    untrusted, _ = make_tls_context("mx.untrusted.test", base / "untrusted", ips=())
    bundle = ca_bundle(base / "trusted-cas.pem", cas)
    [port] = free_ports(1)
    pool = ServerPool(base / "servers")
    site = PolicySite(loopback_address(), site_tls).start()
    try:
        with FakeDNS() as dns:
            try:
                server = new_server(
                    pool,
                    "mta-sts",
                    extra_toml=_server_toml(dns, port, site.port, mta_sts=True),
                    users=[SENDER],
                    env={"SSL_CERT_FILE": str(bundle)},
                )
                yield World(dns, site, port, server, mx_tls, untrusted, bundle, pool)
            finally:
                problems = pool.finish()
                if problems:
                    pytest.fail("\n".join(problems), pytrace=False)
    finally:
        site.stop()


@pytest.fixture(scope="module")
def switched_off(world: World) -> DeliveryServer:
    """A server like the module's, with ``mta_sts = false``."""
    return new_server(
        world.pool,
        "mta-sts-off",
        extra_toml=_server_toml(world.dns, world.port, world.site.port, mta_sts=False),
        users=[SENDER],
        env={"SSL_CERT_FILE": str(world.bundle)},
    )


def _wait_deferred(server: DeliveryServer, queue_id: str) -> dict[str, Any]:
    """Until the message's first attempt is recorded and its row is back in the queue."""
    rows: list[dict[str, Any]] = []

    def deferred() -> bool:
        rows[:] = queue_rows_for(server, queue_id)
        return any(r["attempts"] >= 1 and r["status"] == "queued" for r in rows)

    wait_until(deferred, DEFERRED_WAIT, 0.1, f"a deferred attempt of {queue_id}")
    [row] = rows
    return row


def _mta_sts_errors(server: DeliveryServer, domain: str) -> list[dict[str, str]]:
    """``delivery.mta_sts`` log events (a discovery problem) about ``domain``."""
    return [e for e in server.log_events("delivery.mta_sts") if e.get("domain") == domain]


# ------------------------------------------------------------------ enforce


def test_enforce_listed_mx_with_a_trusted_certificate_is_delivered_verified(
    world: World,
) -> None:
    domain, host = VERIFIED, mx_host(VERIFIED)
    world.publish(domain, "v1", policy_text("enforce", host))
    with world.sinks(1, tls=world.mx_tls[host], hostname=host) as [sink]:
        world.mx(domain, sink.host)
        queue_id = submit_one(world.server, SENDER, [f"user@{domain}"], "sts: enforce, verified")
        wait_status(world.server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.tls
        assert received.rcpt_to == [f"user@{domain}"]
        commands = sink.commands(received.connection_id)
        assert commands.index("STARTTLS") < commands.index("MAIL"), commands
    [attempt] = history(world.server, queue_id)
    assert attempt.outcome == "delivered", attempt
    assert attempt.host == f"{host}[{sink.host}]:{world.port}", attempt
    # Not opportunistic ("unverified"): the policy made TLS required and verified.
    assert attempt.tls.endswith(" verified") and "unverified" not in attempt.tls, attempt
    assert world.site.requests(domain) == [
        Request(f"mta-sts.{domain}:{world.site.port}", "/.well-known/mta-sts.txt")
    ]
    assert world.site.handshakes(domain) == 1  # SNI named the policy host
    assert _mta_sts_errors(world.server, domain) == []


def test_enforce_unlisted_mx_defers_until_the_policy_names_it(world: World) -> None:
    domain, host = MISMATCH, mx_host(MISMATCH)
    world.publish(domain, "v1", policy_text("enforce", f"other-mx.{domain}"))
    with world.sinks(1, tls=world.mx_tls[host], hostname=host) as [sink]:
        world.mx(domain, sink.host)
        queue_id = submit_one(world.server, SENDER, [f"user@{domain}"], "sts: unlisted MX")
        row = _wait_deferred(world.server, queue_id)
        reply = str(row["last_reply"])
        assert reply.startswith("451 4.7.5"), row
        assert "MTA-STS" in reply and "id=v1" in reply, row
        assert status_of(world.server, queue_id) == "queued"
        [attempt] = history(world.server, queue_id)
        assert (attempt.outcome, attempt.host) == ("deferred", "-"), attempt
        assert attempt.reply == reply
        assert sink.connections == 0  # not even a connection to the unlisted host
        assert len(world.site.requests(domain)) == 1
        assert find_dsns(world.server, queue_id) == []

        # The domain fixes its policy: a new id announces it.
        world.publish(domain, "v2", policy_text("enforce", f"other-mx.{domain}", host))
        retried = world.server.cli("queue", "retry", queue_id).stdout
        assert retried.startswith("1 "), retried
        wait_status(world.server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.tls
    deferred, delivered = history(world.server, queue_id)
    assert deferred.outcome == "deferred"
    assert delivered.outcome == "delivered", delivered
    assert delivered.host == f"{host}[{sink.host}]:{world.port}", delivered
    assert delivered.tls.endswith(" verified") and "unverified" not in delivered.tls, delivered
    assert len(world.site.requests(domain)) == 2  # the new id: fetched again
    assert queue_rows_for(world.server, queue_id) == []


def test_enforce_listed_mx_without_starttls_defers_and_sends_nothing_in_clear(
    world: World,
) -> None:
    domain, host = CLEAR, mx_host(CLEAR)
    world.publish(domain, "v1", policy_text("enforce", host))
    with world.sinks(1, hostname=host) as [sink]:  # no tls: STARTTLS is not offered
        world.mx(domain, sink.host)
        queue_id = submit_one(world.server, SENDER, [f"user@{domain}"], "sts: no STARTTLS")
        row = _wait_deferred(world.server, queue_id)
        reply = str(row["last_reply"])
        assert reply.startswith("451 4.7.5"), row
        assert "does not offer STARTTLS" in reply, row
        assert status_of(world.server, queue_id) == "queued"
        assert sink.messages == []
        commands = sink.commands()
        assert "EHLO" in commands, commands  # it did connect and look
        assert not {"MAIL", "RCPT", "DATA"} & set(commands), commands
        assert [a.outcome for a in history(world.server, queue_id)] == ["deferred"]
        assert find_dsns(world.server, queue_id) == []
        world.server.cli("queue", "delete", queue_id)
    assert len(world.site.requests(domain)) == 1


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param(UNTRUSTED, id="unknown-ca"),
        pytest.param(WRONG_NAME, id="certificate-for-another-host"),
    ],
)
def test_enforce_listed_mx_with_an_unverifiable_certificate_defers(
    world: World, domain: str
) -> None:
    host = mx_host(domain)
    # From a CA relaygate does not know; or trusted, but for mx.sts-verified.test.
    tls = world.untrusted_tls if domain == UNTRUSTED else world.mx_tls[mx_host(VERIFIED)]
    world.publish(domain, "v1", policy_text("enforce", host))
    with world.sinks(1, tls=tls, hostname=host) as [sink]:
        world.mx(domain, sink.host)
        queue_id = submit_one(world.server, SENDER, [f"user@{domain}"], f"sts: bad cert {domain}")
        row = _wait_deferred(world.server, queue_id)
        assert str(row["last_reply"]).startswith("451 4."), row
        assert "certificate" in str(row["last_reply"]).lower(), row
        assert sink.connections >= 1  # it was tried, and given up on at the handshake
        assert sink.messages == []
        assert not {"MAIL", "RCPT", "DATA"} & set(sink.commands()), sink.commands()
        world.server.cli("queue", "delete", queue_id)
    assert len(world.site.requests(domain)) == 1


def test_enforce_skips_an_unlisted_preferred_mx_for_a_wildcard_listed_one(world: World) -> None:
    domain, preferred = WILDCARD, mx_host(WILDCARD)
    world.publish(domain, "w1", policy_text("enforce", f"*.backup.{domain}"))
    with (
        world.sinks(1, tls=world.mx_tls[preferred], hostname=preferred) as [unlisted],
        world.sinks(1, tls=world.mx_tls[BACKUP_MX], hostname=BACKUP_MX) as [backup],
    ):
        world.dns.add_mx(domain, [(10, preferred), (20, BACKUP_MX)])
        world.dns.add_a(preferred, unlisted.host)
        world.dns.add_a(BACKUP_MX, backup.host)
        queue_id = submit_one(world.server, SENDER, [f"user@{domain}"], "sts: wildcard")
        wait_status(world.server, queue_id, "delivered")
        [received] = backup.wait_for_messages(1, WAIT)
        assert received.tls
        assert unlisted.connections == 0
    [attempt] = history(world.server, queue_id)
    assert attempt.host == f"{BACKUP_MX}[{backup.host}]:{world.port}", attempt
    assert attempt.tls.endswith(" verified") and "unverified" not in attempt.tls, attempt


# ------------------------------------------------------------------ testing mode


def test_testing_mode_with_an_unlisted_mx_is_delivered_opportunistically(world: World) -> None:
    domain, host = TESTING, mx_host(TESTING)
    world.publish(domain, "t1", policy_text("testing", f"other-mx.{domain}"))
    with world.sinks(1, tls=world.untrusted_tls, hostname=host) as [sink]:
        world.mx(domain, sink.host)
        queue_id = submit_one(world.server, SENDER, [f"user@{domain}"], "sts: testing mode")
        wait_status(world.server, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert received.tls
    [attempt] = history(world.server, queue_id)
    assert attempt.outcome == "delivered", attempt
    assert attempt.host == f"{host}[{sink.host}]:{world.port}", attempt
    assert attempt.tls.endswith(" unverified"), attempt  # TLS as usual: opportunistic
    # The policy was fetched (and is what let this through), not missed.
    assert len(world.site.requests(domain)) == 1
    assert _mta_sts_errors(world.server, domain) == []


# ------------------------------------------------------------------ the cache


def test_policy_is_cached_between_deliveries(world: World) -> None:
    domain, host = CACHED, mx_host(CACHED)
    world.publish(domain, "c1", policy_text("enforce", host))
    with world.sinks(1, tls=world.mx_tls[host], hostname=host) as [sink]:
        world.mx(domain, sink.host)
        first = submit_one(world.server, SENDER, [f"user@{domain}"], "sts: cached #1")
        wait_status(world.server, first, "delivered")
        sink.wait_for_messages(1, WAIT)
        # Let the kept-alive connection close, so the second message needs a new
        # connection and therefore a new look at the domain's policy.
        sink.wait_until(lambda: any(e.kind == "disconnect" for e in sink.events), WAIT)
        assert len(world.site.requests(domain)) == 1
        lookups = world.txt_queries(domain)
        assert lookups >= 1

        second = submit_one(world.server, SENDER, [f"user@{domain}"], "sts: cached #2")
        wait_status(world.server, second, "delivered")
        assert len(sink.wait_for_messages(2, WAIT)) == 2
        assert sink.connections == 2
    # The TXT record was looked at again, its id was the same: no second fetch.
    assert world.txt_queries(domain) > lookups
    assert len(world.site.requests(domain)) == 1
    assert world.site.handshakes(domain) == 1
    for queue_id in (first, second):
        [attempt] = history(world.server, queue_id)
        assert attempt.tls.endswith(" verified") and "unverified" not in attempt.tls, attempt


# ------------------------------------------------------------------ switched off


def test_mta_sts_false_ignores_an_enforce_policy(
    world: World, switched_off: DeliveryServer
) -> None:
    domain, host = SWITCHED_OFF, mx_host(SWITCHED_OFF)
    world.publish(domain, "o1", policy_text("enforce", f"other-mx.{domain}"))
    with world.sinks(1, hostname=host) as [sink]:  # no STARTTLS either
        world.mx(domain, sink.host)
        queue_id = submit_one(switched_off, SENDER, [f"user@{domain}"], "sts: switched off")
        wait_status(switched_off, queue_id, "delivered")
        [received] = sink.wait_for_messages(1, WAIT)
        assert not received.tls
    [attempt] = history(switched_off, queue_id)
    assert attempt.outcome == "delivered", attempt
    assert attempt.host == f"{host}[{sink.host}]:{world.port}", attempt
    assert attempt.tls == "none", attempt
    # Not even looked for.
    assert world.txt_queries(domain) == 0
    assert world.site.requests(domain) == []
    assert world.site.handshakes(domain) == 0
