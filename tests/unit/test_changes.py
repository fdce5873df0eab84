"""The account-change signal (accounts/changes.py) on real files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from relaygate.accounts.changes import ChangeSignal, announce, announce_for, signal_path
from relaygate.accounts.store import AccountStore
from relaygate.storage.sqlite import connect


def test_announce_changes_the_mapped_value(tmp_path: Path) -> None:
    signal = ChangeSignal(tmp_path)
    before = signal.value()
    announce(signal_path(tmp_path))
    assert signal.value() != before
    assert stat.S_IMODE(os.stat(signal_path(tmp_path)).st_mode) == 0o600
    signal.close()


def test_every_account_write_announces(tmp_path: Path) -> None:
    db = connect(tmp_path / "relaygate.db")
    signal = ChangeSignal(tmp_path)
    seen = {signal.value()}
    store = AccountStore(db)
    store.add("a@example.com", "hash")
    seen.add(signal.value())
    store.set_disabled("a@example.com", True)
    seen.add(signal.value())
    store.set_senders("a@example.com", ["@example.com"])
    seen.add(signal.value())
    assert len(seen) == 4
    db.close()
    signal.close()


def test_announce_for_an_in_memory_database_is_harmless() -> None:
    import sqlite3

    announce_for(sqlite3.connect(":memory:"))


def test_an_unopenable_signal_file_leaves_the_worker_serving(tmp_path: Path) -> None:
    signal_path(tmp_path).mkdir()  # not a file: cannot be opened or mapped
    signal = ChangeSignal(tmp_path)
    assert signal.problem is not None
    assert signal.value() == 0
    signal.close()
