"""Sending limits: damage control for a stolen password.

Counters live in ``send_counters``, one row per scope and fixed UTC window
("h2026112901" for an hour, "d20261129" for a day), so they hold across
workers and restarts. A scope is an account ("account:alice@example.com") or
an app credential with limits of its own ("credential:17"); a message sent
with such a credential counts against both, and both sets of limits apply.

Reading and writing are split on purpose. ``Quotas.check_message`` (at MAIL)
and ``Quotas.check_recipient`` (at each RCPT) only read: one or two
primary-key queries. The counts are written by ``record_many`` inside the
spool's own group-commit transaction, so a message counts exactly when it is
durably accepted, and a batch of messages costs a couple of statements.

Concurrency: a message counts only once committed, so messages in flight at
the same moment (in this or another worker, at most a spool batch or so) all
see the same counts and may overshoot a limit by that many. That is fine for
damage control; a hard cap would need a write on every check.
"""

from __future__ import annotations

import calendar
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache

from relaygate.config import SendingLimits
from relaygate.smtp.replies import reply

__all__ = [
    "UNLIMITED",
    "Overrides",
    "Quotas",
    "Scope",
    "SendingLimits",
    "Usage",
    "account_scope",
    "credential_scope",
    "limits_from_json",
    "limits_from_overrides",
    "record",
    "record_many",
    "reset_time",
    "window_keys",
]

HOUR = 3600
DAY = 86400
KEEP_SECONDS = 2 * DAY  # counter rows older than this go at prune() ...
# ... except an account's hours: the defence baseline looks back 14 days (defence.py).
BASELINE_KEEP_SECONDS = 15 * DAY

UNLIMITED = SendingLimits(0, 0, 0, 0)
# Limit overrides as stored: JSON text (the column) or decoded (accounts.credentials).
Overrides = str | Mapping[str, int] | None
_LIMIT_NAMES = tuple(f.name for f in fields(SendingLimits))


@dataclass(frozen=True, slots=True)
class Scope:
    """What is counted (``key``), how replies name it (``label``), its limits."""

    key: str  # "account:alice@example.com" or "credential:17"
    label: str  # "alice@example.com" or 'credential "laptop" of alice@example.com'
    limits: SendingLimits


@dataclass(frozen=True, slots=True)
class Usage:
    """One accepted message, as ``record_many`` counts it."""

    scopes: Sequence[Scope]
    account_address: str
    recipients: Sequence[str]
    new_recipients: Sequence[str]  # candidates: counted new if never sent to before
    now: float


# ------------------------------------------------------------------ limits


def limits_from_overrides(
    overrides: Mapping[str, object] | None, base: SendingLimits
) -> SendingLimits:
    """``base`` with the overrides applied: whole numbers >= 0 under known keys.

    Anything else is ignored, key by key: a typo in one account's limits must
    not stop its mail.
    """
    if not overrides:
        return base
    valid = {
        name: value
        for name in _LIMIT_NAMES
        if isinstance(value := overrides.get(name), int)
        and not isinstance(value, bool)
        and value >= 0
    }
    return replace(base, **valid) if valid else base


@lru_cache(maxsize=4096)
def limits_from_json(text: str | None, base: SendingLimits) -> SendingLimits:
    """``base`` with the overrides in a limits column (JSON); bad JSON means ``base``.

    Cached: the same few texts come back at every login.
    """
    if not text:
        return base
    try:
        data = json.loads(text)
    except ValueError:
        return base
    return limits_from_overrides(data, base) if isinstance(data, dict) else base


def _limits(overrides: Overrides, base: SendingLimits) -> SendingLimits:
    if isinstance(overrides, str):
        return limits_from_json(overrides, base)
    return limits_from_overrides(overrides, base)


def account_scope(address: str, overrides: Overrides, defaults: SendingLimits) -> Scope:
    """The account's scope: the ``[sending_limits]`` defaults with its own overrides."""
    return Scope(f"account:{address.lower()}", address, _limits(overrides, defaults))


def credential_scope(
    credential_id: int, name: str, account_address: str, overrides: Overrides
) -> Scope | None:
    """A credential's own scope, or None when it sets no limits (the account's apply)."""
    limits = _limits(overrides, UNLIMITED)
    if limits == UNLIMITED:
        return None
    return Scope(f"credential:{credential_id}", f'credential "{name}" of {account_address}', limits)


# ------------------------------------------------------------------ windows

_last_hour: tuple[int, tuple[str, str]] = (-1, ("", ""))


def window_keys(now: float) -> tuple[str, str]:
    """("h2026112914", "d20261129"): the UTC hour and day that ``now`` falls in."""
    global _last_hour  # memo of one hour: strftime on every call would be waste
    hour = int(now // HOUR)
    cached = _last_hour
    if cached[0] == hour:
        return cached[1]
    t = time.gmtime(hour * HOUR)
    keys = (time.strftime("h%Y%m%d%H", t), time.strftime("d%Y%m%d", t))
    _last_hour = (hour, keys)
    return keys


def reset_time(window_key: str) -> float:
    """When the window ``window_key`` ends (unix time); ValueError if malformed."""
    kind, digits = window_key[:1], window_key[1:]
    length = {"h": 10, "d": 8}.get(kind)
    if length is None or len(digits) != length or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"not a window key: {window_key!r}")
    year, month, day = int(digits[:4]), int(digits[4:6]), int(digits[6:8])
    hour = int(digits[8:]) if kind == "h" else 0
    start = calendar.timegm((year, month, day, hour, 0, 0, 0, 0, 0))
    return float(start + (HOUR if kind == "h" else DAY))


# ------------------------------------------------------------------ checks


def _refusal(what: str, limit: int, scope: Scope, window_key: str) -> bytes:
    resets = time.strftime("%H:%M", time.gmtime(reset_time(window_key)))
    # Labels come from admin data (credential names): keep the reply one line.
    label = scope.label
    if not label.isprintable():
        label = "".join(c if c.isprintable() else "?" for c in label)
    return reply(451, "4.7.1", f"{what} ({limit}) reached for {label}, resets at {resets} UTC")


@lru_cache(maxsize=16)
def _counters_sql(scopes: int, windows: int) -> str:
    return (  # only "?" placeholders are formatted in
        "SELECT scope, window, messages, recipients, new_recipients FROM send_counters"  # noqa: S608
        f" WHERE scope IN ({', '.join('?' * scopes)}) AND window IN ({', '.join('?' * windows)})"
    )


def message_limited(scopes: Sequence[Scope]) -> bool:
    """Does MAIL need ``check_message`` (a database read) for these scopes?"""
    return any(
        s.limits.messages_per_hour or s.limits.messages_per_day or s.limits.recipients_per_day
        for s in scopes
    )


def recipient_limited(scopes: Sequence[Scope]) -> bool:
    """Does RCPT need ``check_recipient`` (a database read) for these scopes?"""
    return any(s.limits.recipients_per_day or s.limits.new_recipients_per_day for s in scopes)


def check_message(db: sqlite3.Connection, scopes: Sequence[Scope], now: float) -> bytes | None:
    """``Quotas.check_message`` for a function-call API (storage threads)."""
    return Quotas(db).check_message(scopes, now)


def check_recipient(
    db: sqlite3.Connection,
    scopes: Sequence[Scope],
    account_address: str,
    recipient: str,
    *,
    accepted_so_far: int,
    new_so_far: int,
    now: float,
) -> tuple[bytes | None, bool]:
    """``Quotas.check_recipient`` for a function-call API (storage threads)."""
    return Quotas(db).check_recipient(
        scopes,
        account_address,
        recipient,
        accepted_so_far=accepted_so_far,
        new_so_far=new_so_far,
        now=now,
    )


# The rules, shared by every storage backend: each backend reads the counters
# (scope key, window) -> (messages, recipients, new_recipients) its own way.
Counts = Mapping[tuple[str, str], tuple[int, int, int]]


def message_scopes(scopes: Sequence[Scope]) -> list[Scope]:
    """The scopes whose limits MAIL must check."""
    return [
        s
        for s in scopes
        if s.limits.messages_per_hour or s.limits.messages_per_day or s.limits.recipients_per_day
    ]


def recipient_scopes(scopes: Sequence[Scope], is_new: bool) -> list[Scope]:
    """The scopes whose limits RCPT must check for a (new or known) recipient."""
    return [
        s
        for s in scopes
        if s.limits.recipients_per_day or (is_new and s.limits.new_recipients_per_day)
    ]


def decide_message(limited: Sequence[Scope], counts: Counts, now: float) -> bytes | None:
    """None, or a 451 naming the first limit these counts have reached."""
    hour_key, day_key = window_keys(now)
    for scope in limited:
        limits = scope.limits
        hour = counts.get((scope.key, hour_key), (0, 0, 0))
        day = counts.get((scope.key, day_key), (0, 0, 0))
        if limits.messages_per_hour and hour[0] >= limits.messages_per_hour:
            return _refusal("Hourly message limit", limits.messages_per_hour, scope, hour_key)
        if limits.messages_per_day and day[0] >= limits.messages_per_day:
            return _refusal("Daily message limit", limits.messages_per_day, scope, day_key)
        # No recipient could be accepted today, so say so now rather than at RCPT.
        if limits.recipients_per_day and day[1] >= limits.recipients_per_day:
            return _refusal("Daily recipient limit", limits.recipients_per_day, scope, day_key)
    return None


def decide_recipient(
    limited: Sequence[Scope],
    counts: Counts,
    is_new: bool,
    *,
    accepted_so_far: int,
    new_so_far: int,
    now: float,
) -> bytes | None:
    """None, or a 451 naming the first daily recipient limit one more would pass."""
    day_key = window_keys(now)[1]
    for scope in limited:
        limits = scope.limits
        _, recipients, new = counts.get((scope.key, day_key), (0, 0, 0))
        if limits.recipients_per_day and (
            recipients + accepted_so_far >= limits.recipients_per_day
        ):
            return _refusal("Daily recipient limit", limits.recipients_per_day, scope, day_key)
        if (
            is_new
            and limits.new_recipients_per_day
            and (new + new_so_far >= limits.new_recipients_per_day)
        ):
            return _refusal(
                "Daily new-recipient limit", limits.new_recipients_per_day, scope, day_key
            )
    return None


def fresh_recipients(items: Sequence[Usage]) -> list[tuple[str, str, float]]:
    """(account, recipient, first seen) candidates to insert, once each, in order."""
    seen: set[tuple[str, str]] = set()
    rows = []
    for item in items:
        account = item.account_address.lower()
        for rcpt in item.new_recipients:
            key = (account, rcpt.lower())
            if key not in seen:
                seen.add(key)
                rows.append((*key, item.now))
    return rows


def counter_totals(
    items: Sequence[Usage], inserted: set[tuple[str, str]]
) -> dict[tuple[str, str], list[int]]:
    """(scope, window) -> [messages, recipients, new recipients] to add.

    ``inserted`` are the (account, recipient) rows the insert found new: each
    counts as new for the first message of the batch that names it.
    """
    totals: dict[tuple[str, str], list[int]] = {}
    counted: set[tuple[str, str]] = set()
    for item in items:
        account = item.account_address.lower()
        fresh = 0
        for rcpt in item.new_recipients:
            key = (account, rcpt.lower())
            if key in inserted and key not in counted:
                counted.add(key)
                fresh += 1
        count = len(item.recipients)
        for window in window_keys(item.now):
            for scope in item.scopes:
                total = totals.setdefault((scope.key, window), [0, 0, 0])
                total[0] += 1
                total[1] += count
                total[2] += fresh
    return totals


class Quotas:
    """Read-side checks; writes go through ``record_many`` in the spool's transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def _counters(
        self, scopes: Sequence[Scope], windows: Sequence[str]
    ) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(scope key, window) -> (messages, recipients, new_recipients), in one query."""
        keys = [s.key for s in scopes]
        sql = _counters_sql(len(keys), len(windows))
        rows = self.db.execute(sql, (*keys, *windows)).fetchall()
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}

    def check_message(self, scopes: Sequence[Scope], now: float) -> bytes | None:
        """At MAIL: None, or a 451 naming the first limit already reached."""
        limited = message_scopes(scopes)
        if not limited:
            return None
        return decide_message(limited, self._counters(limited, window_keys(now)), now)

    def check_recipient(
        self,
        scopes: Sequence[Scope],
        account_address: str,
        recipient: str,
        *,
        accepted_so_far: int,
        new_so_far: int,
        now: float,
    ) -> tuple[bytes | None, bool]:
        """At RCPT: (None or a 451, whether ``recipient`` is new for the account).

        ``accepted_so_far`` and ``new_so_far`` count the recipients this
        transaction already accepted, which are not in the counters yet. Pass the
        bool on to ``record`` (as ``new_recipients``) when the message is accepted.
        """
        is_new = (
            self.db.execute(
                "SELECT 1 FROM known_recipients WHERE account = ? AND recipient = ?",
                (account_address.lower(), recipient.lower()),
            ).fetchone()
            is None
        )
        limited = recipient_scopes(scopes, is_new)
        if not limited:
            return None, is_new
        counts = self._counters(limited, (window_keys(now)[1],))
        refusal = decide_recipient(
            limited, counts, is_new, accepted_so_far=accepted_so_far, new_so_far=new_so_far, now=now
        )
        return refusal, is_new

    def prune(self, now: float) -> None:
        """Delete counter rows of windows that ended over two days ago (periodic, not hot)."""
        hour_cut, day_cut = window_keys(now - KEEP_SECONDS)
        baseline_cut = window_keys(now - BASELINE_KEEP_SECONDS)[0]
        # "d…" sorts before "h…", so the first test sees only day rows.
        self.db.execute(
            "DELETE FROM send_counters WHERE window < ? OR (window >= 'h' AND window < ?"
            " AND (scope NOT LIKE 'account:%' OR window < ?))",
            (day_cut, hour_cut, baseline_cut),
        )


# ------------------------------------------------------------------ recording


def record(
    db_in_transaction: sqlite3.Connection,
    scopes: Sequence[Scope],
    account_address: str,
    recipients: Sequence[str],
    new_recipients: Sequence[str],
    *,
    now: float,
) -> None:
    """Count one accepted message; see ``record_many``."""
    record_many(
        db_in_transaction, (Usage(scopes, account_address, recipients, new_recipients, now),)
    )


def record_many(db: sqlite3.Connection, items: Iterable[Usage]) -> None:
    """Count accepted messages, inside the caller's open transaction.

    Never BEGINs or COMMITs: the spool calls this in the transaction that
    stores the messages, so counts and messages commit (or roll back) together.
    Counts are summed per scope and window first, so a batch costs one upsert
    per distinct row plus one insert per candidate new recipient.
    """
    if not db.in_transaction:
        raise RuntimeError("record_many() must run inside the caller's transaction")
    items = list(items)
    # "New" is decided here, by the insert itself: the connection only looks
    # recipients up when a new-recipient limit needs it, and a recipient new
    # to two messages of one batch is new only once.
    inserted: set[tuple[str, str]] = set()
    for account, rcpt, first_seen in fresh_recipients(items):
        cursor = db.execute(
            "INSERT OR IGNORE INTO known_recipients (account, recipient, first_seen)"
            " VALUES (?, ?, ?)",
            (account, rcpt, first_seen),
        )
        if cursor.rowcount:
            inserted.add((account, rcpt))
    totals = counter_totals(items, inserted)
    if totals:
        db.executemany(
            "INSERT INTO send_counters (scope, window, messages, recipients, new_recipients)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, window) DO UPDATE SET"
            " messages = messages + excluded.messages,"
            " recipients = recipients + excluded.recipients,"
            " new_recipients = new_recipients + excluded.new_recipients",
            [(scope, window, *total) for (scope, window), total in totals.items()],
        )
