"""Prometheus metrics: every metric relaygate exports, defined here and nowhere else.

One ``serve`` is several processes (SMTP workers, delivery, HTTP); a scrape of
/metrics must see their sum. prometheus_client's multiprocess mode does that:
each process writes its values to memory-mapped files in one directory
(``data_dir/metrics``), and the HTTP process reads them all at scrape time
(http/metrics.py). ``enable`` points the client at the directory; the
supervisor calls it once, before forking, after wiping what a previous run
left. The metrics themselves are made on first use (``current()``), in the
process that uses them, so each process gets files of its own.

The same events feed the hourly stats (stats.py): one call here counts both,
so a caller cannot update one and forget the other. The calls are cheap: a
pre-bound counter child (a lock and an mmap write in multiprocess mode) and
a dictionary increment, no I/O.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

from relaygate import stats

DIRECTORY = "metrics"  # under data_dir
ENV = "PROMETHEUS_MULTIPROC_DIR"

# relaygate_messages_refused_total{reason}: a small fixed set (docs/metrics.md).
REFUSAL_REASONS: Final = (
    "sender_denied",  # MAIL FROM not among the login's sender patterns
    "header_from",  # From: not among them (end of DATA)
    "limit",  # a sending limit (messages or recipients per hour or day)
    "session_limit",  # max_messages_per_session or max_session_duration
    "auth_required",  # MAIL without logging in first (a client trying to relay)
    "size",  # larger than limits.max_message_size
    "recipients",  # more than limits.max_recipients
    "recipient_domain",  # [submission] check_recipient_domains: the domain takes no mail
    "protocol",  # MAIL, RCPT, DATA or BDAT refused by the SMTP rules (syntax, order)
    "error",  # the message could not be stored (a 451)
)
AUTH_RESULTS: Final = ("ok", "failed", "throttled")
DELIVERY_RESULTS: Final = ("delivered", "deferred", "bounced")
TLS_VERSIONS: Final = ("TLSv1.2", "TLSv1.3")

# Seconds. Submission: from MAIL FROM to the 250 after DATA (a client's
# pipelined transaction and our durable commit); delivery: one attempt.
SUBMISSION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DELIVERY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def enable(data_dir: Path) -> Path:
    """Multiprocess mode in ``data_dir/metrics``, emptied first: call before any
    metric exists and before forking. Returns the directory."""
    directory = data_dir / DIRECTORY
    shutil.rmtree(directory, ignore_errors=True)  # a previous run's pids are gone
    directory.mkdir(mode=0o700, exist_ok=True)
    os.environ[ENV] = str(directory)
    # The client chose its value class when it was imported (before the
    # environment said where); choose again, as it would have with it.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return directory


def directory() -> str | None:
    """The multiprocess directory, if ``enable`` (or the environment) set one."""
    return os.environ.get(ENV)


def process_gone(pid: int) -> None:
    """The supervisor reaped ``pid``: its live gauges (open connections) stop counting."""
    path = directory()
    if path is None:
        return
    try:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    except OSError:
        pass  # the directory went away: nothing left to count


class Metrics:
    """The metric objects of one process. ``registry`` is where they are listed
    in single-process use (tests); in multiprocess mode the files are read."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "relaygate_smtp_connections",
            "SMTP connections accepted, by listener (host:port as configured)",
            ["listener"],
            registry=r,
        )
        self.connections_active = Gauge(
            "relaygate_smtp_connections_active",
            "SMTP connections open now, over all workers",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.auth = Counter(
            "relaygate_auth_attempts",
            "SMTP AUTH attempts by mechanism and result (ok, failed, throttled)",
            ["mechanism", "result"],
            registry=r,
        )
        self.accepted = Counter(
            "relaygate_messages_accepted", "Messages accepted (250 after DATA)", registry=r
        )
        self.refused = Counter(
            "relaygate_messages_refused",
            "Mail transactions refused, by reason (docs/metrics.md)",
            ["reason"],
            registry=r,
        )
        self.deliveries = Counter(
            "relaygate_deliveries",
            "Delivery outcomes per recipient: delivered, deferred, bounced",
            ["result"],
            registry=r,
        )
        self.submission_seconds = Histogram(
            "relaygate_submission_duration_seconds",
            "From MAIL FROM to the 250 after DATA",
            buckets=SUBMISSION_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "relaygate_delivery_duration_seconds",
            "One delivery attempt (one message to one destination)",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.tls = Counter(
            "relaygate_tls_handshakes",
            "Completed TLS handshakes (STARTTLS and implicit TLS) by protocol version",
            ["version"],
            registry=r,
        )
        # Children bound once: the hot path does no label look-up.
        self._listeners: dict[str, Counter] = {}
        self._refused = {reason: self.refused.labels(reason) for reason in REFUSAL_REASONS}
        self._deliveries = {result: self.deliveries.labels(result) for result in DELIVERY_RESULTS}
        self._tls = {version: self.tls.labels(version) for version in TLS_VERSIONS}
        self._auth: dict[tuple[str, str], Counter] = {}

    # ------------------------------------------------------------ SMTP workers

    def connection_opened(self, listener: str) -> None:
        """A TCP connection came in (counted even if then refused: busy, per-IP limit)."""
        child = self._listeners.get(listener)
        if child is None:
            child = self._listeners[listener] = self.connections.labels(listener)
        child.inc()

    def connection_greeted(self) -> None:
        """The connection was greeted: it counts as open until ``connection_closed``."""
        self.connections_active.inc()

    def connection_closed(self) -> None:
        self.connections_active.dec()

    def tls_handshake(self, version: str | None) -> None:
        child = self._tls.get(version or "")
        if child is None:
            if not version:
                return
            child = self._tls[version] = self.tls.labels(version)
        child.inc()

    def auth_attempt(self, mechanism: str, result: str) -> None:
        key = (mechanism, result)
        child = self._auth.get(key)
        if child is None:
            child = self._auth[key] = self.auth.labels(mechanism, result)
        child.inc()
        if result != "ok":
            stats.TALLY.add("login_failures")

    def message_accepted(self, seconds: float | None) -> None:
        self.accepted.inc()
        if seconds is not None:
            self.submission_seconds.observe(seconds)
        stats.TALLY.add("accepted")

    def message_refused(self, reason: str) -> None:
        self._refused[reason].inc()
        stats.TALLY.add("refused", reason)

    # ------------------------------------------------------------ delivery

    def delivered(self, result: str, recipients: int) -> None:
        if recipients:
            self._deliveries[result].inc(recipients)
            stats.TALLY.add(result, "", recipients)

    def delivery_attempt(self, seconds: float) -> None:
        self.delivery_seconds.observe(seconds)


_current: Metrics | None = None


def current() -> Metrics:
    """This process's metrics, made on first use (after fork, after ``enable``)."""
    global _current
    if _current is None:
        _current = Metrics()
    return _current
