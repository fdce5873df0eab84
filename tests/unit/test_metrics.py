"""relaygate.metrics and stats.Tally: what each event counts, the names a
scrape shows, and the sum over processes in multiprocess mode."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relaygate import metrics, stats
from relaygate.http.metrics import render
from relaygate.storage.api import QueueSummary, StatRow


@pytest.fixture
def tally(monkeypatch: pytest.MonkeyPatch) -> stats.Tally:
    fresh = stats.Tally()
    monkeypatch.setattr(stats, "TALLY", fresh)
    return fresh


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_event_counts_under_its_exported_name(tally: stats.Tally) -> None:
    m = metrics.Metrics(CollectorRegistry())
    m.connection_opened("127.0.0.1:587")
    m.connection_opened("127.0.0.1:587")
    m.connection_opened("127.0.0.1:465")
    m.connection_greeted()
    m.connection_greeted()
    m.connection_closed()
    m.tls_handshake("TLSv1.3")
    m.tls_handshake(None)  # clear text: nothing
    m.auth_attempt("PLAIN", "ok")
    m.auth_attempt("PLAIN", "failed")
    m.auth_attempt("LOGIN", "throttled")
    m.message_accepted(0.02)
    m.message_accepted(None)
    m.message_refused("sender_denied")
    m.delivered("delivered", 3)
    m.delivered("bounced", 1)
    m.delivered("deferred", 0)
    m.delivery_attempt(0.3)
    s = _samples(m.registry)
    assert s[("relaygate_smtp_connections_total", (("listener", "127.0.0.1:587"),))] == 2
    assert s[("relaygate_smtp_connections_total", (("listener", "127.0.0.1:465"),))] == 1
    assert s[("relaygate_smtp_connections_active", ())] == 1
    assert s[("relaygate_tls_handshakes_total", (("version", "TLSv1.3"),))] == 1
    assert s[("relaygate_tls_handshakes_total", (("version", "TLSv1.2"),))] == 0
    assert s[("relaygate_auth_attempts_total", (("mechanism", "PLAIN"), ("result", "ok")))] == 1
    assert (
        s[("relaygate_auth_attempts_total", (("mechanism", "LOGIN"), ("result", "throttled")))] == 1
    )
    assert s[("relaygate_messages_accepted_total", ())] == 2
    # Every reason is exported from the start, at 0: a rate() has a series to work on.
    for reason in metrics.REFUSAL_REASONS:
        expected = 1 if reason == "sender_denied" else 0
        assert s[("relaygate_messages_refused_total", (("reason", reason),))] == expected
    assert s[("relaygate_deliveries_total", (("result", "delivered"),))] == 3
    assert s[("relaygate_deliveries_total", (("result", "bounced"),))] == 1
    assert s[("relaygate_deliveries_total", (("result", "deferred"),))] == 0
    assert s[("relaygate_submission_duration_seconds_count", ())] == 1
    assert s[("relaygate_submission_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert s[("relaygate_delivery_duration_seconds_sum", ())] == pytest.approx(0.3)

    hour = stats.hour_of(time.time())
    rows = {(r.name, r.label): r.count for r in tally.take() if r.hour == hour}
    assert rows == {
        ("login_failures", ""): 2,
        ("accepted", ""): 2,
        ("refused", "sender_denied"): 1,
        ("delivered", ""): 3,
        ("bounced", ""): 1,
    }
    assert tally.take() == []  # taken means emptied


def test_an_unknown_refusal_reason_is_a_bug_not_a_new_series() -> None:
    m = metrics.Metrics(CollectorRegistry())
    with pytest.raises(KeyError):
        m.message_refused("made_up")


def test_a_tally_given_back_after_a_failed_flush_adds_to_new_counts() -> None:
    tally = stats.Tally()
    tally.add("accepted")
    rows = tally.take()
    tally.add("accepted")
    tally.give_back(rows)
    assert [(r.name, r.count) for r in tally.take()] == [("accepted", 2)]


def test_the_scrape_sums_the_processes_and_forgets_a_dead_ones_open_connections(
    tmp_path: Path,
) -> None:
    # Multiprocess mode changes the client's globals: a process of its own.
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from relaygate import metrics
        from relaygate.http.metrics import render
        from relaygate.storage.api import QueueSummary
        metrics.enable(Path({str(tmp_path)!r}))
        children = []
        for n in (1, 2):
            pid = os.fork()
            if pid == 0:
                m = metrics.current()
                for _ in range(n):
                    m.connection_opened("l")
                    m.connection_greeted()
                    m.message_accepted(0.01)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        before = render(QueueSummary({{"queued": 4}}, None), 0.0).decode()
        metrics.process_gone(children[1])
        after = render(None, 0.0).decode()
        sys.stdout.write(before + "\\n=====\\n" + after)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    before, after = done.stdout.split("\n=====\n")

    def values(text: str) -> dict[str, float]:
        return {
            s.name + repr(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    first = values(before)
    assert first["relaygate_messages_accepted_total[]"] == 3
    assert first["relaygate_smtp_connections_total[('listener', 'l')]"] == 3
    assert first["relaygate_smtp_connections_active[]"] == 3  # livesum: both still counted
    assert first["relaygate_submission_duration_seconds_count[]"] == 3
    assert first["relaygate_queue_messages[('state', 'queued')]"] == 4
    assert first["relaygate_queue_oldest_seconds[]"] == 0
    second = values(after)
    assert second["relaygate_messages_accepted_total[]"] == 3  # counters outlive the process
    assert second["relaygate_smtp_connections_active[]"] == 1  # its open connections do not
    assert "relaygate_queue_messages[('state', 'queued')]" not in second


def test_without_multiprocess_mode_the_scrape_is_this_process() -> None:
    text = render(QueueSummary({"queued": 0, "sending": 2}, time.time() - 30), time.time())
    found = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert "relaygate_messages_accepted" in found
    (oldest,) = found["relaygate_queue_oldest_seconds"].samples
    assert 29 <= oldest.value <= 40


def test_the_grafana_dashboard_uses_only_metrics_we_export() -> None:
    path = Path(__file__).parents[2] / "contrib" / "grafana" / "relaygate.json"
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    exported = {
        sample.name
        for family in text_string_to_metric_families(
            render(QueueSummary({"queued": 0}, None), 0.0).decode()
        )
        for sample in family.samples
    }
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in metrics.Metrics(CollectorRegistry()).registry.collect():
        exported |= {family.name + suffix for suffix in suffixes[family.type]}
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            used.update(re.findall(r"relaygate_[a-z_]+", target["expr"]))
    assert used and used <= exported, used - exported
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))


class _BrokenStore:
    def __init__(self) -> None:
        self.rows: list[StatRow] = []
        self.fail = True

    async def add(self, rows: Sequence[StatRow]) -> None:
        if self.fail:
            raise sqlite3.OperationalError("database is locked")
        self.rows += rows

    async def read(self, first: int, end: int) -> list[StatRow]:
        return []

    async def prune(self, before: int) -> None:
        pass


def test_a_failed_flush_keeps_the_counts_for_the_next_one(tally: stats.Tally) -> None:
    store = _BrokenStore()
    tally.add("accepted")
    tally.add("refused", "size", 2)
    asyncio.run(stats.flush(store, tally))
    assert store.rows == []
    store.fail = False
    asyncio.run(stats.flush(store, tally))
    assert sorted((r.name, r.label, r.count) for r in store.rows) == [
        ("accepted", "", 1),
        ("refused", "size", 2),
    ]
    asyncio.run(stats.flush(store, tally))  # nothing new: nothing written
    assert len(store.rows) == 2
