"""The delivery queue's summary (storage.api.QueueSummary) for a metrics
scrape: the same query on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relaygate.storage.api import QueueSummary

# Both backends: rows still to deliver by state, and the oldest (deliveries_due
# index on status; the waiting rows are few next to the delivered ones). Held
# rows (the compromised-account defence) are counted apart.
SUMMARY_SQL = (
    "SELECT CASE WHEN status = 'held' THEN 'held' WHEN status = 'sending' THEN 'sending'"
    " WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END, count(*), min(created_at)"
    " FROM deliveries WHERE status IN ('queued', 'sending', 'held') GROUP BY 1"
)


def summary_of(rows: Sequence[Sequence[Any]]) -> QueueSummary:
    counts = {"queued": 0, "deferred": 0, "sending": 0, "held": 0}
    oldest: float | None = None
    for state, count, first in rows:
        counts[str(state)] = int(count)
        if state == "held":
            continue  # waiting on a person, not stuck: the "oldest" alert stays quiet
        if first is not None and (oldest is None or float(first) < oldest):
            oldest = float(first)
    return QueueSummary(counts, oldest)
