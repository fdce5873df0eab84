"""AuthThrottle on a real throttle.db: windows, boundaries, networks, reservations, exemptions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from relaygate.config import AuthThrottleConfig
from relaygate.storage.sqlite import connect_state
from relaygate.throttle import (
    PENDING_TTL,
    WAIT,
    AuthThrottle,
    Reservation,
    Verdict,
    network_of,
)

T0 = 1_800_000_000.0  # an arbitrary fixed "now"
DAY = 86400.0

# Only the rule under test is on, so each test sees one rule at work.
OFF = AuthThrottleConfig(
    ip_per_minute=0,
    ip_per_day=0,
    network_per_minute=0,
    network_per_day=0,
    account_per_hour=0,
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect_state(tmp_path / "throttle.db")
    yield connection
    connection.close()


def throttle(db: sqlite3.Connection, **rules: int) -> AuthThrottle:
    return AuthThrottle(db, replace(OFF, **rules))


def fail(t: AuthThrottle, ip: str, user: str, *times: float) -> None:
    for now in times:
        t.record_failure(ip, user, now)


# ------------------------------------------------------------------ networks


@pytest.mark.parametrize(
    ("ip", "network"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("192.0.2.0", "192.0.2.0/24"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.9", "192.0.2.0/24"),  # IPv4-mapped, from a dual-stack socket
        ("?", "?"),  # no IP at all: its own network
    ],
)
def test_network_of(ip: str, network: str) -> None:
    assert network_of(ip) == network


# ------------------------------------------------------------------ ip rules


def test_ip_per_minute_boundary_and_sliding(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_minute=3)
    fail(t, "192.0.2.1", "alice@example.com", T0, T0 + 10)
    assert t.check("192.0.2.1", "alice@example.com", T0 + 20) is None  # 2 of 3
    fail(t, "192.0.2.1", "alice@example.com", T0 + 20)
    # The third failure reaches the limit: refused until the oldest (T0) leaves.
    assert t.check("192.0.2.1", "alice@example.com", T0 + 30) == Verdict("ip", 30.0)
    assert t.check("192.0.2.1", "bob@example.com", T0 + 59.5) == Verdict("ip", 0.5)
    # Exactly a minute after the oldest it is out of the window.
    assert t.check("192.0.2.1", "alice@example.com", T0 + 60) is None
    # Another address on the same /24 is not this IP.
    assert t.check("192.0.2.2", "alice@example.com", T0 + 30) is None


def test_ip_per_day(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_day=3)
    fail(t, "198.51.100.5", "x", T0, T0 + 3600, T0 + 7200)
    verdict = t.check("198.51.100.5", "y", T0 + 7300)
    assert verdict == Verdict("ip", T0 + DAY - (T0 + 7300))
    assert t.check("198.51.100.5", "y", T0 + DAY - 1) == Verdict("ip", 1.0)
    assert t.check("198.51.100.5", "y", T0 + DAY) is None  # two left: under the limit


def test_retry_after_is_the_latest_rule_that_is_over(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_minute=2, ip_per_day=3)
    fail(t, "192.0.2.1", "x", T0, T0 + 100, T0 + 110)
    # Minute rule: the oldest in the minute (T0+100) leaves at T0+160.
    # Day rule: T0 leaves at T0+DAY. Both must lift, so the day rule decides.
    assert t.check("192.0.2.1", "x", T0 + 120) == Verdict("ip", DAY - 120)


def test_ipv4_mapped_counts_as_ipv4(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_minute=2)
    fail(t, "::ffff:192.0.2.1", "x", T0)
    fail(t, "192.0.2.1", "x", T0 + 1)
    assert t.check("192.0.2.1", "x", T0 + 2) == Verdict("ip", 58.0)
    assert t.check("::ffff:192.0.2.1", "x", T0 + 2) == Verdict("ip", 58.0)


# ------------------------------------------------------------------ network rules


def test_network_per_minute_groups_the_ipv4_24(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_minute=10, network_per_minute=3)
    fail(t, "203.0.113.1", "x", T0)
    fail(t, "203.0.113.2", "x", T0 + 1)
    assert t.check("203.0.113.3", "x", T0 + 2) is None
    fail(t, "203.0.113.250", "x", T0 + 2)
    assert t.check("203.0.113.99", "x", T0 + 3) == Verdict("network", 57.0)
    assert t.check("203.0.114.1", "x", T0 + 3) is None  # the next /24 is another network


def test_network_per_day(db: sqlite3.Connection) -> None:
    t = throttle(db, network_per_day=2)
    fail(t, "203.0.113.1", "x", T0)
    fail(t, "203.0.113.2", "x", T0 + 600)
    assert t.check("203.0.113.3", "x", T0 + 700) == Verdict("network", DAY - 700)
    assert t.check("203.0.113.3", "x", T0 + DAY) is None


def test_ipv6_slash64_grouping(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_minute=5, network_per_minute=3)
    # A host rotating through its /64: each address is fresh, the /64 is not.
    for i in range(3):
        fail(t, f"2001:db8:1:2::{i + 1:x}", "x", T0 + i)
    assert t.check("2001:db8:1:2:ffff::9", "x", T0 + 5) == Verdict("network", 55.0)
    assert t.check("2001:db8:1:3::1", "x", T0 + 5) is None  # neighbouring /64


def test_ip_is_named_before_network(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_minute=2, network_per_minute=2)
    fail(t, "192.0.2.1", "x", T0, T0 + 1)
    assert t.check("192.0.2.1", "x", T0 + 2) == Verdict("ip", 58.0)
    assert t.check("192.0.2.2", "x", T0 + 2) == Verdict("network", 58.0)


# ------------------------------------------------------------------ account rule


def test_account_rule_spares_the_owners_known_network(db: sqlite3.Connection) -> None:
    t = throttle(db, account_per_hour=3)
    t.record_success("192.0.2.10", "alice@example.com", T0 - 5 * DAY)
    # Guessing from three different networks, with the name in any case.
    fail(t, "203.0.113.1", "ALICE@example.com", T0)
    fail(t, "198.51.100.1", "alice@EXAMPLE.com", T0 + 10)
    fail(t, "2001:db8::1", "alice@example.com", T0 + 20)
    stranger = t.check("203.0.113.77", "Alice@Example.Com", T0 + 30)
    assert stranger == Verdict("account", 3600.0 - 30)
    # The owner, from another address on their usual /24, is not locked out.
    assert t.check("192.0.2.11", "alice@example.com", T0 + 30) is None
    # Other accounts are unaffected.
    assert t.check("203.0.113.77", "bob@example.com", T0 + 30) is None
    # The window slides: an hour after the first failure, two remain.
    assert t.check("203.0.113.77", "alice@example.com", T0 + 3600) is None


def test_known_network_expires(db: sqlite3.Connection) -> None:
    t = throttle(db, account_per_hour=1, known_network_days=30)
    t.record_success("192.0.2.10", "alice@example.com", T0 - 30 * DAY)
    fail(t, "203.0.113.1", "alice@example.com", T0)
    # 30 days since the last login from there: no longer known.
    assert t.check("192.0.2.10", "alice@example.com", T0 + 1) == Verdict("account", 3599.0)
    t.record_success("192.0.2.10", "alice@example.com", T0 + 2)
    assert t.check("192.0.2.10", "alice@example.com", T0 + 3) is None


def test_known_network_is_per_account(db: sqlite3.Connection) -> None:
    t = throttle(db, account_per_hour=1)
    t.record_success("192.0.2.10", "bob@example.com", T0 - DAY)
    fail(t, "203.0.113.1", "alice@example.com", T0)
    assert t.check("192.0.2.10", "alice@example.com", T0 + 1) == Verdict("account", 3599.0)


def test_ip_rules_still_apply_on_a_known_network(db: sqlite3.Connection) -> None:
    t = throttle(db, ip_per_minute=2, account_per_hour=100)
    t.record_success("192.0.2.10", "alice@example.com", T0 - DAY)
    fail(t, "192.0.2.10", "alice@example.com", T0, T0 + 1)
    assert t.check("192.0.2.10", "alice@example.com", T0 + 2) == Verdict("ip", 58.0)


def test_rules_set_to_zero_are_off(db: sqlite3.Connection) -> None:
    t = throttle(db)
    fail(t, "192.0.2.1", "alice@example.com", *(T0 + i for i in range(50)))
    assert t.check("192.0.2.1", "alice@example.com", T0 + 51) is None


def test_defaults(db: sqlite3.Connection) -> None:
    t = AuthThrottle(db, AuthThrottleConfig())
    fail(t, "192.0.2.1", "alice@example.com", *(T0 + i for i in range(9)))
    assert t.check("192.0.2.1", "alice@example.com", T0 + 10) is None
    fail(t, "192.0.2.1", "alice@example.com", T0 + 10)
    assert t.check("192.0.2.1", "alice@example.com", T0 + 11) == Verdict("ip", 49.0)


def test_long_user_names_are_truncated(db: sqlite3.Connection) -> None:
    t = throttle(db, account_per_hour=1)
    fail(t, "192.0.2.1", "a" * 5000, T0)
    (length,) = db.execute("SELECT length(account) FROM auth_failures").fetchone()
    assert length == 320
    assert t.check("203.0.113.1", "A" * 5000, T0 + 1) == Verdict("account", 3599.0)


# ------------------------------------------------------------------ successes and pruning


def test_record_success_writes_once_an_hour(db: sqlite3.Connection) -> None:
    t = throttle(db)
    t.record_success("192.0.2.10", "Alice@example.com", T0)
    t.record_success("192.0.2.99", "alice@example.com", T0 + 3599)  # same account and /24
    rows = db.execute("SELECT account, network, ts FROM auth_successes").fetchall()
    assert rows == [("alice@example.com", "192.0.2.0/24", T0)]
    t.record_success("192.0.2.10", "alice@example.com", T0 + 3600)
    assert db.execute("SELECT ts FROM auth_successes").fetchall() == [(T0 + 3600,)]
    t.record_success("198.51.100.1", "alice@example.com", T0 + 3601)  # another network
    assert db.execute("SELECT COUNT(*) FROM auth_successes").fetchone() == (2,)


def test_record_success_never_moves_backwards(db: sqlite3.Connection) -> None:
    # Another worker (another AuthThrottle) may have written a later time.
    AuthThrottle(db, OFF).record_success("192.0.2.10", "alice@example.com", T0 + 100)
    AuthThrottle(db, OFF).record_success("192.0.2.10", "alice@example.com", T0)
    assert db.execute("SELECT ts FROM auth_successes").fetchall() == [(T0 + 100,)]


def test_prune(db: sqlite3.Connection) -> None:
    t = throttle(db, known_network_days=30)
    for ts in (T0 - 2 * DAY, T0 - DAY - 1, T0 - DAY + 1, T0):
        t.record_failure("192.0.2.1", "x", ts)
    t.record_success("192.0.2.1", "old@example.com", T0 - 31 * DAY)
    t.record_success("192.0.2.1", "new@example.com", T0 - 29 * DAY)
    t.prune(T0)
    assert db.execute("SELECT ts FROM auth_failures ORDER BY ts").fetchall() == [
        (T0 - DAY + 1,),
        (T0,),
    ]
    assert db.execute("SELECT account FROM auth_successes").fetchall() == [("new@example.com",)]
    t.prune(T0 + 2 * DAY)  # everything is old now
    assert db.execute("SELECT COUNT(*) FROM auth_failures").fetchone() == (0,)


def test_prune_keeps_rows_written_out_of_order(db: sqlite3.Connection) -> None:
    t = throttle(db)
    # Two workers: a later rowid may carry an earlier time, and the reverse.
    for ts in (T0 - 2 * DAY, T0 - 10, T0 - 3 * DAY, T0):
        t.record_failure("192.0.2.1", "x", ts)
    t.prune(T0)
    left = [ts for (ts,) in db.execute("SELECT ts FROM auth_failures ORDER BY rowid")]
    # Nothing young is lost; a stray old row may wait for the next prune.
    assert T0 - 10 in left
    assert T0 in left
    assert T0 - 2 * DAY not in left


# ------------------------------------------------------------------ cost


def traced(db: sqlite3.Connection) -> list[str]:
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    return statements


def assert_indexed(db: sqlite3.Connection, statements: list[str]) -> None:
    db.set_trace_callback(None)
    for sql in statements:
        plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "SCAN" not in plan, (sql, plan)


def test_check_is_two_indexed_reads_and_no_write(db: sqlite3.Connection) -> None:
    t = AuthThrottle(db, AuthThrottleConfig())
    fail(t, "192.0.2.1", "alice@example.com", T0)
    t.record_success("192.0.2.1", "alice@example.com", T0)
    statements = traced(db)
    assert t.check("192.0.2.1", "alice@example.com", T0 + 1) is None
    assert len(statements) == 2
    assert all(sql.lstrip().upper().startswith("SELECT") for sql in statements)
    assert_indexed(db, statements)


def test_record_calls_are_one_statement(db: sqlite3.Connection) -> None:
    t = AuthThrottle(db, AuthThrottleConfig())
    statements = traced(db)
    t.record_failure("192.0.2.1", "alice@example.com", T0)
    t.record_success("192.0.2.1", "alice@example.com", T0)
    t.record_success("192.0.2.1", "alice@example.com", T0 + 1)  # remembered: no write
    db.set_trace_callback(None)
    assert len(statements) == 2


# ------------------------------------------------------------------ reservations


@pytest.fixture
def state(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect_state(tmp_path / "throttle.db")
    yield connection
    connection.close()


def test_reserve_counts_attempts_in_flight(state: sqlite3.Connection) -> None:
    t = AuthThrottle(state, replace(OFF, ip_per_minute=3))
    held = [t.reserve("192.0.2.1", "a@example.com", T0) for _ in range(3)]
    assert all(isinstance(r, Reservation) for r in held)
    # Three in flight: a fourth waits (they may still turn out right)...
    assert t.reserve("192.0.2.1", "a@example.com", T0) is WAIT
    # ...until they settle: two right, one wrong.
    for r in held[:2]:
        assert isinstance(r, Reservation)
        t.release(r)
    assert isinstance(held[2], Reservation)
    t.fail(held[2])
    again = t.reserve("192.0.2.1", "a@example.com", T0 + 1)
    assert isinstance(again, Reservation)
    assert again.recent == 2  # the failure before it and itself
    t.fail(again)
    third = t.reserve("192.0.2.1", "a@example.com", T0 + 2)
    assert isinstance(third, Reservation)
    t.fail(third)
    # Three failures now: refused outright, the secret never checked.
    verdict = t.reserve("192.0.2.1", "a@example.com", T0 + 3)
    assert isinstance(verdict, Verdict) and verdict.scope == "ip"


def test_a_pending_attempt_left_by_a_dead_worker_stops_counting(
    state: sqlite3.Connection,
) -> None:
    t = AuthThrottle(state, replace(OFF, ip_per_minute=1))
    assert isinstance(t.reserve("192.0.2.2", "a@example.com", T0), Reservation)
    assert t.reserve("192.0.2.2", "a@example.com", T0 + 1) is WAIT
    later = T0 + PENDING_TTL + 1
    assert isinstance(t.reserve("192.0.2.2", "a@example.com", later), Reservation)
    t.prune(later + PENDING_TTL + 1)
    assert state.execute("SELECT COUNT(*) FROM auth_pending").fetchone()[0] == 0


def test_pending_attempts_against_an_account_wait_except_on_its_known_network(
    state: sqlite3.Connection,
) -> None:
    t = AuthThrottle(state, replace(OFF, account_per_hour=1))
    t.record_success("198.51.100.7", "a@example.com", T0)
    assert isinstance(t.reserve("192.0.2.3", "a@example.com", T0), Reservation)
    assert t.reserve("203.0.113.3", "a@example.com", T0) is WAIT
    assert isinstance(t.reserve("198.51.100.8", "a@example.com", T0), Reservation)
