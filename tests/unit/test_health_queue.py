"""health.check_storage's queue line: held mail is named apart and never makes the
queue look stuck (it waits on a person: `relaygate held list`)."""

from __future__ import annotations

import asyncio
import time

from relaygate.config import quickstart_config
from relaygate.health import Check, check_storage
from relaygate.storage.api import QueueSummary


def _queue_line(counts: dict[str, int], oldest: float | None) -> Check:
    async def summary() -> QueueSummary:
        return QueueSummary({"queued": 0, "deferred": 0, "sending": 0, "held": 0, **counts}, oldest)

    storage, queue = asyncio.run(check_storage(quickstart_config(), summary))
    assert storage.status == "ok"
    return queue


def test_only_held_mail_is_an_empty_queue_that_says_so() -> None:
    line = _queue_line({"held": 7}, None)
    assert (line.status, line.detail) == ("ok", "empty, 7 held (relaygate held list)")


def test_held_mail_is_not_counted_as_waiting() -> None:
    line = _queue_line({"queued": 2, "deferred": 1, "held": 5}, time.time() - 60)
    assert line.status == "ok"
    assert line.detail.startswith("3 waiting, oldest ")
    assert line.detail.endswith(" old, 5 held (relaygate held list)")


def test_an_old_waiting_row_still_warns() -> None:
    line = _queue_line({"deferred": 1}, time.time() - 5 * 86400)
    assert line.status == "warn" and line.detail.startswith("1 waiting, oldest ")
    assert "held" not in line.detail
