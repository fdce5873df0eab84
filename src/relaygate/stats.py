"""Hourly stats: counts per hour of accepted, delivered, deferred, bounced,
refused (by reason) and failed logins, kept in the database for 90 days.

Each process adds to an in-memory tally (``TALLY``, fed by metrics.py: no
write per event) and a flusher task moves it to storage every
``FLUSH_INTERVAL`` seconds and at shutdown, as upserts adding to the hour's
rows (storage.api.HourlyStats). On PostgreSQL every node adds to the same
rows, so the numbers are the cluster's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from relaygate import logs
from relaygate.storage.api import HourlyStats, StatRow
from relaygate.storage.errors import STORAGE_ERRORS
from relaygate.times import rfc3339

HOUR = 3600
FLUSH_INTERVAL = 10.0  # seconds
KEEP_HOURS = 90 * 24  # rows older than this are pruned
MAX_HOURS = KEEP_HOURS  # the most a report may ask for


def hour_of(ts: float) -> int:
    """The start of ``ts``'s hour, in seconds since the epoch (UTC)."""
    return int(ts // HOUR) * HOUR


class Tally:
    """Counts since the last flush, by (hour, name, label)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[int, str, str], int] = {}

    def add(self, name: str, label: str = "", count: int = 1) -> None:
        key = (int(time.time() // HOUR) * HOUR, name, label)
        counts = self._counts
        counts[key] = counts.get(key, 0) + count

    def take(self) -> list[StatRow]:
        """What was counted, emptied: the caller stores it or gives it back."""
        counts, self._counts = self._counts, {}
        return [StatRow(h, n, label, c) for (h, n, label), c in counts.items()]

    def give_back(self, rows: Iterable[StatRow]) -> None:
        for row in rows:
            self.add_at(row.hour, row.name, row.label, row.count)

    def add_at(self, hour: int, name: str, label: str, count: int) -> None:
        key = (hour, name, label)
        self._counts[key] = self._counts.get(key, 0) + count


TALLY = Tally()  # this process's


async def flush(store: HourlyStats, tally: Tally = TALLY) -> None:
    """Store what the tally holds; on a storage error keep it for the next try."""
    rows = tally.take()
    if not rows:
        return
    try:
        await store.add(rows)
    except asyncio.CancelledError:
        tally.give_back(rows)  # for the flush at shutdown
        raise
    except Exception as exc:  # STORAGE_ERRORS, or a closed pool at shutdown: never fatal
        tally.give_back(rows)
        reason = " ".join(str(exc).split()) if isinstance(exc, STORAGE_ERRORS) else repr(exc)
        logs.event("stats.error", logging.WARNING, reason=reason)


async def flush_forever(store: HourlyStats, interval: float = FLUSH_INTERVAL) -> None:
    """Run as a task; cancel it, then call ``flush`` once more at shutdown."""
    while True:
        await asyncio.sleep(interval)
        await flush(store)


async def prune(store: HourlyStats, now: float) -> None:
    await store.prune(hour_of(now) - KEEP_HOURS * HOUR)


@dataclass(frozen=True, slots=True)
class HourStats:
    hour: int
    accepted: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    login_failures: int = 0
    refused: tuple[tuple[str, int], ...] = ()  # (reason, count), by reason

    def as_json(self) -> dict[str, object]:
        return {
            "hour": rfc3339(self.hour),
            "accepted": self.accepted,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "bounced": self.bounced,
            "refused": dict(self.refused),
            "login_failures": self.login_failures,
        }


async def report(store: HourlyStats, hours: int, now: float) -> list[HourStats]:
    """The last ``hours`` hours (the current one included), oldest first, each
    present with zeros when nothing happened."""
    if not 1 <= hours <= MAX_HOURS:
        raise ValueError(f"hours must be 1 to {MAX_HOURS}")
    last = hour_of(now)
    first = last - (hours - 1) * HOUR
    table: dict[int, dict[str, int]] = {first + i * HOUR: {} for i in range(hours)}
    refused: dict[int, dict[str, int]] = {h: {} for h in table}
    for row in await store.read(first, last + HOUR):
        if row.hour not in table:
            continue
        if row.name == "refused":
            refused[row.hour][row.label] = refused[row.hour].get(row.label, 0) + row.count
        else:
            table[row.hour][row.name] = table[row.hour].get(row.name, 0) + row.count
    return [
        HourStats(
            hour=h,
            accepted=c.get("accepted", 0),
            delivered=c.get("delivered", 0),
            deferred=c.get("deferred", 0),
            bounced=c.get("bounced", 0),
            login_failures=c.get("login_failures", 0),
            refused=tuple(sorted(refused[h].items())),
        )
        for h, c in table.items()
    ]
