"""Sending limits against a real SQLite file: windows, boundaries, scopes, new recipients."""

from __future__ import annotations

import calendar
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from relaygate.config import SendingLimits
from relaygate.quotas import (
    UNLIMITED,
    Quotas,
    Scope,
    Usage,
    account_scope,
    credential_scope,
    limits_from_json,
    limits_from_overrides,
    record,
    record_many,
    reset_time,
    window_keys,
)
from relaygate.storage.sqlite import connect

# 2026-11-29 13:30:00 UTC
NOW = float(calendar.timegm((2026, 11, 29, 13, 30, 0, 0, 0, 0)))
HOUR = 3600.0
DAY = 86400.0
ALICE = "alice@example.com"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(tmp_path / "relaygate.db")
    yield connection
    connection.close()


def limits(**values: int) -> SendingLimits:
    return replace(UNLIMITED, **values)


def send(
    db: sqlite3.Connection,
    scopes: Sequence[Scope],
    now: float,
    recipients: Sequence[str] = ("someone@example.net",),
    new: Sequence[str] = (),
    account: str = ALICE,
) -> None:
    db.execute("BEGIN IMMEDIATE")
    record(db, scopes, account, recipients, new, now=now)
    db.execute("COMMIT")


def text(reply: bytes | None) -> str:
    assert reply is not None
    assert reply.startswith(b"451 4.7.1 ")
    assert reply.endswith(b"\r\n")
    assert reply.count(b"\r\n") == 1
    return reply[10:-2].decode()


# ------------------------------------------------------------------ windows


def test_window_keys_and_reset_times() -> None:
    assert window_keys(NOW) == ("h2026112913", "d20261129")
    assert reset_time("h2026112913") == NOW + 30 * 60
    assert reset_time("d20261129") == float(calendar.timegm((2026, 11, 30, 0, 0, 0, 0, 0, 0)))
    # The last second of a window is still in it; the next starts a new one.
    end_of_day = reset_time("d20261129")
    assert window_keys(end_of_day - 0.001) == ("h2026112923", "d20261129")
    assert window_keys(end_of_day) == ("h2026113000", "d20261130")
    # The memo must not return a stale hour when time goes back (other callers).
    assert window_keys(NOW) == ("h2026112913", "d20261129")
    assert reset_time("h2026123123") == float(calendar.timegm((2027, 1, 1, 0, 0, 0, 0, 0, 0)))


@pytest.mark.parametrize("key", ["", "h", "x2026112913", "h20261129", "d2026112913", "d2026-1-29"])
def test_reset_time_rejects_malformed_keys(key: str) -> None:
    with pytest.raises(ValueError, match="not a window key"):
        reset_time(key)


# ------------------------------------------------------------------ limits


def test_limits_from_json() -> None:
    base = SendingLimits()
    assert limits_from_json(None, base) is base
    assert limits_from_json("", base) is base
    assert limits_from_json('{"messages_per_hour": 5, "new_recipients_per_day": 0}', base) == (
        SendingLimits(messages_per_hour=5, new_recipients_per_day=0)
    )
    assert limits_from_json("{not json", base) is base
    assert limits_from_json("[1, 2]", base) is base
    # Bad values and unknown keys are ignored one by one.
    assert limits_from_json(
        '{"messages_per_day": -1, "recipients_per_day": true, "messages_per_hour": "9",'
        ' "colour": 3, "new_recipients_per_day": 7}',
        base,
    ) == SendingLimits(new_recipients_per_day=7)


def test_limits_from_overrides() -> None:
    base = SendingLimits()
    assert limits_from_overrides(None, base) is base
    assert limits_from_overrides({}, base) is base
    assert limits_from_overrides({"messages_per_day": 0, "x": 1}, base) == SendingLimits(
        messages_per_day=0
    )
    assert limits_from_overrides({"messages_per_day": -3}, base) is base


def test_scopes() -> None:
    scope = account_scope("Alice@Example.com", '{"messages_per_hour": 5}', SendingLimits())
    assert scope == Scope("account:alice@example.com", "Alice@Example.com", SendingLimits(5))
    assert credential_scope(17, "laptop", ALICE, None) is None
    assert credential_scope(17, "laptop", ALICE, "{}") is None
    cred = credential_scope(17, "laptop", ALICE, '{"messages_per_day": 10}')
    assert cred == Scope(
        "credential:17", f'credential "laptop" of {ALICE}', limits(messages_per_day=10)
    )
    # Decoded overrides (Credential.limits, account_limits()) work the same.
    assert credential_scope(17, "laptop", ALICE, {"messages_per_day": 10}) == cred
    assert credential_scope(17, "laptop", ALICE, {}) is None
    assert account_scope(ALICE, {"messages_per_hour": 5}, SendingLimits()).limits == (
        SendingLimits(5)
    )


# ------------------------------------------------------------------ messages


def test_hourly_limit_boundary_and_reset(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    scope = account_scope(ALICE, None, limits(messages_per_hour=3))
    for i in range(2):
        send(db, [scope], NOW + i)
    assert quotas.check_message([scope], NOW + 10) is None  # 2 of 3 sent
    send(db, [scope], NOW + 10)
    assert text(quotas.check_message([scope], NOW + 11)) == (
        f"Hourly message limit (3) reached for {ALICE}, resets at 14:00 UTC"
    )
    assert quotas.check_message([scope], NOW + 30 * 60 - 0.001) is not None
    assert quotas.check_message([scope], NOW + 30 * 60) is None  # 14:00: a new hour


def test_daily_limit_spans_hours(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    scope = account_scope(ALICE, None, limits(messages_per_hour=10, messages_per_day=4))
    for i in range(4):
        send(db, [scope], NOW - 4 * HOUR + i * HOUR)  # 09:30, 10:30, 11:30, 12:30
    assert text(quotas.check_message([scope], NOW)) == (
        f"Daily message limit (4) reached for {ALICE}, resets at 00:00 UTC"
    )
    assert quotas.check_message([scope], reset_time("d20261129")) is None


def test_daily_recipients_refuse_at_mail(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    scope = account_scope(ALICE, None, limits(recipients_per_day=3))
    send(db, [scope], NOW, recipients=["a@x.example", "b@x.example", "c@x.example"])
    assert text(quotas.check_message([scope], NOW)) == (
        f"Daily recipient limit (3) reached for {ALICE}, resets at 00:00 UTC"
    )


def test_account_and_credential_both_apply(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    account = account_scope(ALICE, None, limits(messages_per_hour=5))
    laptop = credential_scope(1, "laptop", ALICE, '{"messages_per_hour": 2}')
    phone = credential_scope(2, "phone", ALICE, '{"messages_per_hour": 100}')
    assert laptop is not None
    assert phone is not None
    send(db, [account, laptop], NOW)
    send(db, [account, laptop], NOW + 1)
    # The credential's own limit is the tighter one, and is named as such.
    assert text(quotas.check_message([account, laptop], NOW + 2)) == (
        f'Hourly message limit (2) reached for credential "laptop" of {ALICE}, resets at 14:00 UTC'
    )
    # The phone credential has room of its own, but the account counts both.
    for i in range(3):
        assert quotas.check_message([account, phone], NOW + 3 + i) is None
        send(db, [account, phone], NOW + 3 + i)
    assert text(quotas.check_message([account, phone], NOW + 10)) == (
        f"Hourly message limit (5) reached for {ALICE}, resets at 14:00 UTC"
    )
    # Other accounts have counters of their own.
    bob = account_scope("bob@example.com", None, limits(messages_per_hour=5))
    assert quotas.check_message([bob], NOW + 10) is None


def test_unlimited_scopes_cost_nothing(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    scope = account_scope(ALICE, None, UNLIMITED)
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    assert quotas.check_message([scope], NOW) is None
    db.set_trace_callback(None)
    assert statements == []


def test_label_is_kept_to_one_line(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    scope = Scope("credential:9", "evil\r\n250 ok", limits(messages_per_hour=1))
    send(db, [scope], NOW)
    assert "evil??250 ok" in text(quotas.check_message([scope], NOW))


# ------------------------------------------------------------------ recipients


def test_recipients_per_day_counts_this_transaction(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    scope = account_scope(ALICE, None, limits(recipients_per_day=5))
    send(db, [scope], NOW, recipients=["a@x.example", "b@x.example"])

    def check(accepted: int) -> bytes | None:
        refusal, _ = quotas.check_recipient(
            [scope], ALICE, "z@x.example", accepted_so_far=accepted, new_so_far=0, now=NOW
        )
        return refusal

    assert check(2) is None  # 2 stored + 2 in this transaction + this one = 5
    assert text(check(3)) == f"Daily recipient limit (5) reached for {ALICE}, resets at 00:00 UTC"


def test_new_recipients(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    scope = account_scope(ALICE, None, limits(new_recipients_per_day=2))

    def check(rcpt: str, new_so_far: int = 0) -> tuple[bytes | None, bool]:
        return quotas.check_recipient(
            [scope], ALICE, rcpt, accepted_so_far=0, new_so_far=new_so_far, now=NOW
        )

    assert check("Friend@x.example") == (None, True)
    send(db, [scope], NOW, recipients=["Friend@x.example"], new=["Friend@x.example"])
    # Known now, in any case, and only for this account.
    assert check("friend@X.example") == (None, False)
    bob_view = quotas.check_recipient(
        [], "bob@example.com", "friend@x.example", accepted_so_far=0, new_so_far=0, now=NOW
    )
    assert bob_view == (None, True)
    # One new recipient stored; one more new one fits, counting this transaction's.
    assert check("second@x.example") == (None, True)
    refusal, is_new = check("third@x.example", new_so_far=1)
    assert is_new
    assert text(refusal) == (
        f"Daily new-recipient limit (2) reached for {ALICE}, resets at 00:00 UTC"
    )
    # Known recipients are still accepted when the new-recipient limit is reached.
    assert check("friend@x.example", new_so_far=1) == (None, False)
    # The next UTC day starts afresh.
    tomorrow = quotas.check_recipient(
        [scope], ALICE, "third@x.example", accepted_so_far=0, new_so_far=1, now=NOW + DAY
    )
    assert tomorrow == (None, True)


def test_credential_new_recipient_limit(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    account = account_scope(ALICE, None, SendingLimits())
    script = credential_scope(3, "script", ALICE, '{"new_recipients_per_day": 1}')
    assert script is not None
    send(db, [account, script], NOW, recipients=["a@x.example"], new=["a@x.example"])
    refusal, is_new = quotas.check_recipient(
        [account, script], ALICE, "b@x.example", accepted_so_far=0, new_so_far=0, now=NOW
    )
    assert is_new
    assert 'credential "script"' in text(refusal)
    # Without that credential, the account's default (300) leaves room.
    refusal, _ = quotas.check_recipient(
        [account], ALICE, "b@x.example", accepted_so_far=0, new_so_far=0, now=NOW
    )
    assert refusal is None


def test_checks_are_few_indexed_reads(db: sqlite3.Connection) -> None:
    quotas = Quotas(db)
    account = account_scope(ALICE, None, SendingLimits())
    cred = credential_scope(3, "script", ALICE, '{"messages_per_hour": 9}')
    assert cred is not None
    send(db, [account, cred], NOW, recipients=["a@x.example"], new=["a@x.example"])
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    assert quotas.check_message([account, cred], NOW) is None
    assert len(statements) == 1  # both scopes, both windows
    quotas.check_recipient(
        [account, cred], ALICE, "b@x.example", accepted_so_far=0, new_so_far=0, now=NOW
    )
    assert len(statements) == 3  # known_recipients, then the day rows
    db.set_trace_callback(None)
    for sql in statements:
        assert sql.lstrip().startswith("SELECT")
        plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "SCAN" not in plan, plan


# ------------------------------------------------------------------ recording


def counters(db: sqlite3.Connection) -> dict[tuple[str, str], tuple[int, int, int]]:
    rows = db.execute(
        "SELECT scope, window, messages, recipients, new_recipients FROM send_counters"
    )
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def test_record_many_in_the_callers_transaction(db: sqlite3.Connection) -> None:
    account = account_scope(ALICE, None, SendingLimits())
    cred = credential_scope(3, "script", ALICE, '{"messages_per_hour": 9}')
    bob = account_scope("bob@example.com", None, SendingLimits())
    assert cred is not None
    items = [
        Usage([account, cred], ALICE, ["a@x.example", "b@x.example"], ["a@x.example"], NOW),
        # The same new recipient in a second message of the batch is new once.
        Usage([account], ALICE, ["A@x.example"], ["A@x.example"], NOW + 1),
        Usage([bob], "bob@example.com", ["a@x.example"], ["a@x.example"], NOW + 2),
        Usage([account], ALICE, ["c@x.example"], [], NOW + HOUR),  # the next hour
    ]
    db.execute("BEGIN IMMEDIATE")
    record_many(db, items)
    db.execute("ROLLBACK")  # the spool's commit failed: nothing counts
    assert counters(db) == {}
    assert db.execute("SELECT COUNT(*) FROM known_recipients").fetchone() == (0,)

    db.execute("BEGIN IMMEDIATE")
    record_many(db, items)
    assert db.in_transaction  # record_many neither commits nor ends it
    db.execute("COMMIT")
    assert counters(db) == {
        ("account:alice@example.com", "h2026112913"): (2, 3, 1),
        ("account:alice@example.com", "h2026112914"): (1, 1, 0),
        ("account:alice@example.com", "d20261129"): (3, 4, 1),
        ("credential:3", "h2026112913"): (1, 2, 1),
        ("credential:3", "d20261129"): (1, 2, 1),
        ("account:bob@example.com", "h2026112913"): (1, 1, 1),
        ("account:bob@example.com", "d20261129"): (1, 1, 1),
    }
    known = db.execute("SELECT account, recipient, first_seen FROM known_recipients ORDER BY 1")
    assert known.fetchall() == [
        (ALICE, "a@x.example", NOW),
        ("bob@example.com", "a@x.example", NOW + 2),
    ]
    # A later batch adds to the same rows; known recipients keep their first time,
    # and a candidate already known is not counted new again (the insert decides).
    db.execute("BEGIN IMMEDIATE")
    record_many(db, [Usage([account], ALICE, ["a@x.example"], ["a@x.example"], NOW + 5)])
    db.execute("COMMIT")
    assert counters(db)[("account:alice@example.com", "d20261129")] == (4, 5, 1)
    first_seen = db.execute("SELECT first_seen FROM known_recipients WHERE account = ?", (ALICE,))
    assert first_seen.fetchall() == [(NOW,)]


def test_record_refuses_to_run_outside_a_transaction(db: sqlite3.Connection) -> None:
    scope = account_scope(ALICE, None, SendingLimits())
    with pytest.raises(RuntimeError, match="inside the caller's transaction"):
        record(db, [scope], ALICE, ["a@x.example"], [], now=NOW)
    assert counters(db) == {}


def test_record_many_with_nothing_to_do(db: sqlite3.Connection) -> None:
    db.execute("BEGIN")
    record_many(db, [])
    db.execute("COMMIT")
    assert counters(db) == {}


def test_counters_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relaygate.db"
    scope = account_scope(ALICE, None, limits(messages_per_hour=1))
    first = connect(path)
    send(first, [scope], NOW)
    first.close()
    second = connect(path)
    try:
        assert Quotas(second).check_message([scope], NOW + 1) is not None
    finally:
        second.close()


def test_prune(db: sqlite3.Connection) -> None:
    scope = credential_scope(3, "script", ALICE, '{"messages_per_hour": 9}')
    assert scope is not None
    for when in (NOW - 3 * DAY, NOW - 2 * DAY - HOUR, NOW - 2 * DAY, NOW - DAY, NOW):
        send(db, [scope], when)
    Quotas(db).prune(NOW)
    # Windows that ended over two days ago go; the one holding NOW - 2 days stays.
    assert sorted(window for _, window in counters(db)) == [
        "d20261127",
        "d20261128",
        "d20261129",
        "h2026112713",
        "h2026112813",
        "h2026112913",
    ]


def test_prune_keeps_an_accounts_hours_for_the_defence_baseline(db: sqlite3.Connection) -> None:
    scope = account_scope(ALICE, None, SendingLimits())
    for when in (NOW - 16 * DAY, NOW - 14 * DAY, NOW - 3 * DAY, NOW):
        send(db, [scope], when)
    Quotas(db).prune(NOW)
    # Its days go after two days like any scope's; its hours stay 15 days (defence.py).
    assert sorted(window for _, window in counters(db)) == [
        "d20261129",
        "h2026111513",
        "h2026112613",
        "h2026112913",
    ]
