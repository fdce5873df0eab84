"""GET /metrics and /api/v1/stats (issue 9): a server with two SMTP workers and
a delivery process (smarthost: an SMTP sink on loopback) is used over real
connections, then scraped with urllib and parsed with prometheus_client's
own parser. The counts must be the sum over every process; the hourly stats
must show the hour's traffic and survive a restart. Runs on both storage
backends (Makefile E2E_POSTGRES)."""

from __future__ import annotations

import calendar
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakes.smtp_sink import SMTPSink

from .delivery_helpers import loopback_address
from .helpers import (
    ALICE,
    Server,
    ServerPool,
    free_ports,
    make_message,
    session,
    wait_until,
)

RCPT = "someone@example.net"
METRICS_TOKEN = "scrape-Tk7Qw2Zr9mXv"  # in the token file, with a newline after it
WAIT = 30.0


@dataclass
class Metered:
    server: Server
    base: str  # http://127.0.0.1:PORT
    sink: SMTPSink
    listener: str  # the implicit-TLS listener's name in the metrics


@pytest.fixture(scope="module")
def metered(servers: ServerPool) -> Iterator[Metered]:
    sink = SMTPSink(loopback_address()).start()
    token_file = servers.base / "metrics.token"
    token_file.write_text(METRICS_TOKEN + "\n", encoding="utf-8")
    (port,) = free_ports(1)
    try:
        server = servers.create(
            "metrics",
            workers=2,
            users=[ALICE],
            sections={
                "http": {"address": f"127.0.0.1:{port}", "metrics_token_file": str(token_file)},
                "delivery": {"mode": "smarthost"},
                "delivery.smarthost": {"host": sink.address[0], "port": sink.port, "tls": "none"},
            },
        )
        yield Metered(server, f"http://127.0.0.1:{port}", sink, f"127.0.0.1:{server.implicit_port}")
    finally:
        sink.stop()


def _http(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str, token: str | None = METRICS_TOKEN) -> Samples:
    status, body = _http(f"{base}/metrics", token)
    assert status == 200, (status, body[:300])
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _stats(base: str, token: str, hours: str = "2") -> tuple[int, Any]:
    status, body = _http(f"{base}/api/v1/stats?hours={hours}", token)
    return status, json.loads(body)


def _hour(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(ts))


def _totals(report: dict[str, Any]) -> dict[str, Any]:
    """The hours summed: a test that runs across the turn of an hour still adds up."""
    total: dict[str, Any] = {"refused": {}}
    for hour in report["hours"]:
        for key, count in hour.items():
            if key == "refused":
                for reason, n in count.items():
                    total["refused"][reason] = total["refused"].get(reason, 0) + n
            elif key != "hour":
                total[key] = total.get(key, 0) + count
    return total


SENT: list[str] = []  # subjects accepted by the server, across the module's tests


def test_counts_are_summed_over_both_workers_and_the_delivery_process(metered: Metered) -> None:
    server, base = metered.server, metered.base
    listener = metered.listener
    # The start-up check of the test harness connected already: count from here.
    before = scrape(base)
    # One message per connection until both workers took some (bounded).
    holders: set[int] = set()
    for index in range(40):
        with session(server, user=ALICE) as client:
            holder = server.worker_for(client.local_port)
            subject = f"metrics #{index}"
            message = make_message(from_addr=ALICE.address, to=[RCPT], subject=subject)
            client.send_mail(ALICE.address, [RCPT], message)
            client.command("QUIT")
        SENT.append(subject)
        if holder is not None:
            holders.add(holder)
        if len(holders) == 2 and len(SENT) >= 4:
            break
    assert len(holders) == 2, "one worker served every connection"
    # A failed login and a refused sender, on one more connection.
    with session(server) as client:
        assert client.auth_plain(ALICE.address, "Not-the-password-4Rz").code == 535
        assert client.command(f"MAIL FROM:<{ALICE.address}>").code == 530  # not logged in
        client.login(ALICE.address, ALICE.password)
        assert client.command("MAIL FROM:<mallory@elsewhere.test>").code == 553
        assert client.command(f"MAIL FROM:<{ALICE.address}> SIZE=999999999999").code == 552
        # Held open: the scrape sees one open connection.
        samples = scrape(base)
        assert value(samples, "relaygate_smtp_connections_active") == 1
    sessions = len(SENT) + 1

    def delivered() -> bool:
        return value(scrape(base), "relaygate_deliveries_total", result="delivered") == len(SENT)

    wait_until(delivered, WAIT, 0.2, "the delivery process to count every delivery")
    samples = scrape(base)
    assert value(samples, "relaygate_messages_accepted_total") == len(SENT)
    assert value(samples, "relaygate_messages_refused_total", reason="sender_denied") == 1
    assert value(samples, "relaygate_messages_refused_total", reason="auth_required") == 1
    assert value(samples, "relaygate_messages_refused_total", reason="size") == 1
    assert value(samples, "relaygate_messages_refused_total", reason="limit") == 0
    assert (
        value(samples, "relaygate_auth_attempts_total", mechanism="PLAIN", result="ok") == sessions
    )
    assert value(samples, "relaygate_auth_attempts_total", mechanism="PLAIN", result="failed") == 1
    for name, labels in (
        ("relaygate_smtp_connections_total", {"listener": listener}),
        ("relaygate_tls_handshakes_total", {"version": "TLSv1.3"}),
    ):
        assert value(samples, name, **labels) - value(before, name, **labels) == sessions, name
    assert value(samples, "relaygate_submission_duration_seconds_count") == len(SENT)
    assert value(samples, "relaygate_submission_duration_seconds_sum") > 0
    assert value(samples, "relaygate_delivery_duration_seconds_count") == len(SENT)
    assert value(samples, "relaygate_deliveries_total", result="bounced") == 0
    assert value(samples, "relaygate_queue_messages", state="queued") == 0
    assert value(samples, "relaygate_queue_oldest_seconds") == 0
    assert len(metered.sink.messages) == len(SENT)
    wait_until(
        lambda: value(scrape(base), "relaygate_smtp_connections_active") == 0,
        10.0,
        0.1,
        "the open-connections gauge to go back to 0",
    )


def test_the_scrape_wants_the_token_from_the_file(metered: Metered) -> None:
    for token in (None, "wrong", METRICS_TOKEN + "x"):
        status, body = _http(f"{metered.base}/metrics", token)
        assert status == 401, (token, status)
        assert b"metrics token" in body
    # An API token is not the metrics token either.
    status, _ = _http(f"{metered.base}/metrics", _api_token_once(metered.server))
    assert status == 401


_TOKENS: dict[str, str] = {}


def _api_token_once(server: Server) -> str:
    if "api" not in _TOKENS:
        _TOKENS["api"] = server.api_token("stats-reader", "--read-only")
    return _TOKENS["api"]


def test_hourly_stats_show_the_hour_and_survive_a_restart(metered: Metered) -> None:
    server, base = metered.server, metered.base
    token = _api_token_once(server)
    expected = {
        "accepted": len(SENT),
        "delivered": len(SENT),
        "deferred": 0,
        "bounced": 0,
        "login_failures": 1,
        "refused": {"auth_required": 1, "sender_denied": 1, "size": 1},
    }
    seen: list[Any] = []

    def flushed() -> bool:  # every process flushes every 10 s
        status, report = _stats(base, token)
        seen.append(report)
        return status == 200 and _totals(report) == expected

    wait_until(flushed, WAIT, 0.5, f"the stats to show {expected} (last: {seen[-1:]})")
    report = seen[-1]
    assert len(report["hours"]) == 2
    hours = [h["hour"] for h in report["hours"]]
    now = time.time()
    assert hours[-1] in {_hour(now), _hour(now - 60)}  # the current hour last
    assert hours[0] == _hour(calendar.timegm(time.strptime(hours[-1], "%Y-%m-%dT%H:%M:%SZ")) - 3600)
    status, day = _stats(base, token, "24")
    assert status == 200 and len(day["hours"]) == 24
    for bad in ("0", "2161", "many"):
        status, error = _stats(base, token, bad)
        assert status == 400, (bad, error)
        assert error["error"].startswith("hours must be"), error
    status, error = _stats(base, "not-a-token")
    assert status == 401

    server.stop()
    server.start()
    status, report = _stats(base, token)
    assert status == 200 and _totals(report) == expected  # kept in the database
    # The same from the CLI, as JSON and as a table.
    printed = json.loads(server.cli("stats", "--hours", "2", "--json").stdout)
    assert _totals(printed) == expected
    table = server.cli("stats", "--hours", "1").stdout.splitlines()
    assert table[0].split()[:3] == ["HOUR", "(UTC)", "ACCEPTED"], table
    assert len(table) == 2, table  # the header and the current hour
    refused = server.cli("stats", "--hours", "0", check=False)
    assert refused.returncode == 2
    assert "--hours must be 1 to 2160" in refused.stderr
    # The Prometheus counters start again (a new run), as counters may.
    assert value(scrape(base), "relaygate_messages_accepted_total") == 0


def test_metrics_false_means_no_metrics_route(servers: ServerPool) -> None:
    (port,) = free_ports(1)
    servers.create(
        "no-metrics", sections={"http": {"address": f"127.0.0.1:{port}", "metrics": False}}
    )
    status, _ = _http(f"http://127.0.0.1:{port}/metrics", METRICS_TOKEN)
    assert status == 404
