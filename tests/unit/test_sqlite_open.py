"""Opening the SQLite files from many processes at once (workers start together)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from relaygate.storage.sqlite import connect, connect_state


@pytest.mark.parametrize("opener", [connect_state, connect], ids=["throttle", "main"])
def test_new_file_opened_by_several_at_once(
    opener: Callable[[Path], sqlite3.Connection], tmp_path: Path
) -> None:
    """The losers of the race to switch a new file to WAL used to get
    "database is locked" (a worker failing to start): about 1 in 20 openings."""
    errors: list[str] = []
    for n in range(40):
        path = tmp_path / f"{n}.db"
        start = threading.Barrier(4)

        def open_it(path: Path = path, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                opener(path).close()
            except Exception as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    db = connect_state(tmp_path / "0.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
