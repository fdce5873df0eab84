"""Failed-login throttling: stop password guessing, never lock out the owner.

Three layers, all counted from ``auth_failures`` over sliding windows:

- one client IP (per minute, per day),
- its network, an IPv4 /24 or IPv6 /64 (one host there owns many addresses),
- one user name from anywhere (per hour), which catches guessing spread over
  many networks. This rule spares networks the account logged in from within
  ``known_network_days``: otherwise anyone could lock the owner out just by
  failing against their name (the Mailu #2880 trap).

Rules: a limit of N allows N failures in the window; with N counted, logins
are refused (without checking the password) until the oldest of them leaves
the window. A limit of 0 turns that rule off.

Reserve before verifying. A login that needs a secret checked calls
``reserve``: one write transaction that checks every rule and, when none is
over, records the attempt as *pending* (``auth_pending``). Pending attempts
count against the limits like failures, so the verdict holds under any
concurrency, across connections and worker processes: 50 parallel guesses
against a limit of 10 get 10 verified and 40 refused, not 50 verified. When
failures alone are under a limit but failures and pending attempts together
are not, ``reserve`` answers WAIT: the caller asks again shortly (a web app
logging in on 20 connections at once is made to queue, not refused). The
outcome settles the row: ``release`` (right: it goes) or ``fail`` (wrong: it
becomes a failure). A pending row older than ``PENDING_TTL`` (a worker that
died mid-check) no longer counts.

Hot path cost: ``check`` is one indexed query for ip+network and one for the
account (its known-network exemption is a primary-key subquery of it).
``record_failure`` is one insert; ``record_success`` one upsert per account
and network per hour at most. No clocks in here: callers pass ``now``.

The connection-level rules of AuthThrottleConfig (delay after 3 failures on
one connection, close after 5) need no storage; the connection driver applies
them from its own count.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from relaygate.config import AuthThrottleConfig

__all__ = ["AuthThrottle", "AuthThrottleConfig", "ThrottleScope", "Verdict", "network_of"]

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
_MAX_USERNAME = 320  # longer names are junk; keep the table and its index small
_RECENT_LIMIT = 10_000  # record_success memo entries before it is emptied

ThrottleScope = Literal["ip", "network", "account"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Refuse this login: ``scope`` says which rule, ``retry_after`` when it lifts (seconds)."""

    scope: ThrottleScope
    retry_after: float


PENDING_TTL = 60.0  # seconds a pending attempt counts; checks take milliseconds


@dataclass(frozen=True, slots=True)
class Reservation:
    """An attempt counted as pending until ``release`` or ``fail``; ``recent`` for delays."""

    rowid: int
    recent: int  # failures from this client IP in the last minute, this one included
    # Where a shared backend (storage/redis/) keeps it: (ip, network, account, ts).
    shared: tuple[str, str, str, float] | None = None


class Wait:
    """``reserve``: only attempts still being checked stand in the way; ask again soon."""


WAIT = Wait()


@lru_cache(maxsize=8192)
def _normalize(ip: str) -> tuple[str, str]:
    """(address, network) for a client IP; cached since clients come back."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip, ip  # not an IP (unix socket, "?"): its own network
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped  # ::ffff:192.0.2.1 from a dual-stack socket
        if mapped is None:
            network = ipaddress.IPv6Network((int(address) >> 64 << 64, 64))
            return str(address), str(network)
        address = mapped
    return str(address), str(ipaddress.IPv4Network((int(address) >> 8 << 8, 24)))


def address_and_network(ip: str) -> tuple[str, str]:
    """(address, network) as the rules count them (IPv4-mapped IPv6 as IPv4)."""
    return _normalize(ip)


def username_key(name: str) -> str:
    """A login name as the account rule counts it (bounded, case-folded)."""
    return _username(name)


def network_of(ip: str) -> str:
    """The throttling network of ``ip``: "192.0.2.0/24" or "2001:db8:1:2::/64"."""
    return _normalize(ip)[1]


def _username(name: str) -> str:
    # The column is COLLATE NOCASE, which folds ASCII only; lower() folds the rest.
    return name[:_MAX_USERNAME].lower()


class AuthThrottle:
    """Failure counts in SQLite, so they hold across workers and restarts."""

    def __init__(self, db: sqlite3.Connection, config: AuthThrottleConfig) -> None:
        self.db = db
        self.config = config
        # (account, network) -> when this object last wrote that success row.
        self._recent: dict[tuple[str, str], float] = {}
        self._network_rules = any(
            (
                config.ip_per_minute,
                config.ip_per_day,
                config.network_per_minute,
                config.network_per_day,
            )
        )
        # Scan back only as far as the longest rule that is on.
        self._network_span = DAY if config.ip_per_day or config.network_per_day else MINUTE
        # Per-rule counts of the last _check: ip minute, ip day, network minute,
        # network day, account hour, account exempt (its known network).
        self._counts: tuple[int, int, int, int, int, bool] = (0, 0, 0, 0, 0, True)

    def check(self, client_ip: str, username: str, now: float) -> Verdict | None:
        """None: go ahead and verify the password. Else refuse without verifying.

        Reads only: use it where the secret is already known to be right (a
        cached login); anything that still has a secret to check must ``reserve``.
        """
        return self._check(client_ip, username, now)[0]

    def _check(self, client_ip: str, username: str, now: float) -> tuple[Verdict | None, int]:
        """(verdict, failures from this IP in the last minute); leaves the counts
        of each rule in ``self._counts`` for ``_over_with_pending``."""
        config = self.config
        ip, network = _normalize(client_ip)
        recent = 0
        self._counts = (0, 0, 0, 0, 0, True)
        if self._network_rules:
            verdict, recent = self._check_network(ip, network, now)
            if verdict is not None:
                return verdict, recent
        if config.account_per_hour:
            return self._check_account(_username(username), network, now), recent
        return None, recent

    def reserve(self, client_ip: str, username: str, now: float) -> Verdict | Reservation | Wait:
        """Check and count this attempt in one transaction (see the module's doc)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            verdict, recent = self._check(client_ip, username, now)
            result: Verdict | Reservation | Wait
            if verdict is not None:
                result = verdict
            elif self._over_with_pending(client_ip, username, now):
                result = WAIT
            else:
                ip, network = _normalize(client_ip)
                cursor = db.execute(
                    "INSERT INTO auth_pending (ts, ip, network, account) VALUES (?, ?, ?, ?)",
                    (now, ip, network, _username(username)),
                )
                result = Reservation(cursor.lastrowid or 0, recent + 1)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def _over_with_pending(self, client_ip: str, username: str, now: float) -> bool:
        config = self.config
        ip_minute, ip_day, net_minute, net_day, account, account_exempt = self._counts
        ip, network = _normalize(client_ip)
        fresh = now - PENDING_TTL
        if self._network_rules:
            pending_ip, pending_net = self.db.execute(
                "SELECT COALESCE(SUM(ip = ?), 0), COUNT(*) FROM auth_pending"
                " WHERE network = ? AND ts > ?",
                (ip, network, fresh),
            ).fetchone()
            if pending_net and any(
                limit and count + pending >= limit
                for limit, count, pending in (
                    (config.ip_per_minute, ip_minute, pending_ip),
                    (config.ip_per_day, ip_day, pending_ip),
                    (config.network_per_minute, net_minute, pending_net),
                    (config.network_per_day, net_day, pending_net),
                )
            ):
                return True
        if config.account_per_hour and not account_exempt:
            (pending_account,) = self.db.execute(
                "SELECT COUNT(*) FROM auth_pending WHERE account = ? AND ts > ?",
                (_username(username), fresh),
            ).fetchone()
            return bool(account + pending_account >= config.account_per_hour)
        return False

    def release(self, reservation: Reservation) -> None:
        """The secret was right: the attempt is not a failure."""
        self.db.execute("DELETE FROM auth_pending WHERE rowid = ?", (reservation.rowid,))

    def fail(self, reservation: Reservation) -> None:
        """The secret was wrong (or the exchange was abandoned): now a failure."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO auth_failures (ts, ip, network, account)"
                " SELECT ts, ip, network, account FROM auth_pending WHERE rowid = ?",
                (reservation.rowid,),
            )
            db.execute("DELETE FROM auth_pending WHERE rowid = ?", (reservation.rowid,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _check_network(self, ip: str, network: str, now: float) -> tuple[Verdict | None, int]:
        config = self.config
        minute_ago = now - MINUTE
        # One range scan of (network, ts) over the last day yields all four counts
        # and the oldest failure of each, for retry_after. Refused logins are not
        # recorded, so the scan is bounded by the limits (a few hundred rows).
        row = self.db.execute(
            "SELECT SUM(ip = :ip AND ts > :minute), MIN(CASE WHEN ip = :ip AND ts > :minute"
            " THEN ts END), SUM(ip = :ip), MIN(CASE WHEN ip = :ip THEN ts END),"
            " SUM(ts > :minute), MIN(CASE WHEN ts > :minute THEN ts END), COUNT(*), MIN(ts)"
            " FROM auth_failures WHERE network = :network AND ts > :day",
            {"ip": ip, "network": network, "minute": minute_ago, "day": now - self._network_span},
        ).fetchone()
        ip_minute, ip_minute_oldest, ip_day, ip_day_oldest = row[:4]
        net_minute, net_minute_oldest, net_day, net_day_oldest = row[4:]
        self._counts = (ip_minute or 0, ip_day or 0, net_minute or 0, net_day or 0, 0, True)
        if not net_day:
            return None, 0
        # Every rule that is over must lift before a login may go ahead, so the
        # answer is the latest of them; the scope names the narrowest.
        rules: tuple[tuple[int, int, float | None, float, ThrottleScope], ...] = (
            (config.ip_per_minute, ip_minute, ip_minute_oldest, MINUTE, "ip"),
            (config.ip_per_day, ip_day, ip_day_oldest, DAY, "ip"),
            (config.network_per_minute, net_minute, net_minute_oldest, MINUTE, "network"),
            (config.network_per_day, net_day, net_day_oldest, DAY, "network"),
        )
        scope: ThrottleScope | None = None
        retry = 0.0
        for limit, count, oldest, window, rule in rules:
            if limit and count >= limit and oldest is not None:
                scope = scope or rule
                retry = max(retry, oldest + window - now)
        return (None if scope is None else Verdict(scope, retry)), ip_minute or 0

    def _check_account(self, account: str, network: str, now: float) -> Verdict | None:
        config = self.config
        count, oldest, known_since = self.db.execute(
            "SELECT COUNT(*), MIN(ts), (SELECT ts FROM auth_successes"
            " WHERE account = :account AND network = :network)"
            " FROM auth_failures WHERE account = :account AND ts > :hour",
            {"account": account, "network": network, "hour": now - HOUR},
        ).fetchone()
        exempt = known_since is not None and known_since > now - config.known_network_days * DAY
        self._counts = (*self._counts[:4], count, exempt)
        if count < config.account_per_hour or exempt:
            return None  # exempt: the owner's usual network must not be locked out
        return Verdict("account", oldest + HOUR - now)

    def record_failure(self, client_ip: str, username: str, now: float) -> None:
        """A wrong password (or unknown user): one row, counted by every rule."""
        ip, network = _normalize(client_ip)
        self.db.execute(
            "INSERT INTO auth_failures (ts, ip, network, account) VALUES (?, ?, ?, ?)",
            (now, ip, network, _username(username)),
        )

    def record_success(self, client_ip: str, account_address: str, now: float) -> None:
        """Remember that the account logs in from this network (its exemption).

        Written at most once an hour per account and network by this object: an
        hour is nothing against ``known_network_days``, and logins are frequent.
        """
        network = _normalize(client_ip)[1]
        key = (_username(account_address), network)
        last = self._recent.get(key)
        if last is not None and now - last < HOUR:
            return
        self.db.execute(
            "INSERT INTO auth_successes (account, network, ts) VALUES (?, ?, ?)"
            " ON CONFLICT (account, network) DO UPDATE SET ts = MAX(ts, excluded.ts)",
            (key[0], network, now),
        )
        if len(self._recent) >= _RECENT_LIMIT:
            self._recent.clear()  # cheap bound; the cost is one extra upsert each
        self._recent[key] = now

    def prune(self, now: float) -> None:
        """Drop failures older than a day and successes older than known_network_days.

        Call periodically (say every few minutes), not on the hot path.
        """
        # Pending rows left by a worker that died mid-check no longer count anyway.
        self.db.execute("DELETE FROM auth_pending WHERE ts < ?", (now - PENDING_TTL,))
        # No index on ts alone, but rows arrive in ts order, so rowid order is
        # time order: find the first row young enough to keep (a scan that stops
        # there), then delete everything before it by rowid range. Rows written a
        # little out of order by another worker are only ever kept too long.
        cutoff = now - DAY
        first_kept = self.db.execute(
            "SELECT rowid FROM auth_failures WHERE ts >= ? ORDER BY rowid LIMIT 1", (cutoff,)
        ).fetchone()
        if first_kept is None:
            self.db.execute("DELETE FROM auth_failures WHERE ts < ?", (cutoff,))
        else:
            self.db.execute(
                "DELETE FROM auth_failures WHERE rowid < ? AND ts < ?", (first_kept[0], cutoff)
            )
        # One row per account and network: small enough to scan now and then.
        self.db.execute(
            "DELETE FROM auth_successes WHERE ts < ?",
            (now - self.config.known_network_days * DAY,),
        )
        self._recent = {k: t for k, t in self._recent.items() if now - t < HOUR}
