"""The account-change signal: how running sessions learn that an admin changed something.

A session checks its login (account enabled, password unchanged, credential
still valid, sender patterns, limits) when it logs in. If an admin disables
the account, revokes the credential or narrows the senders afterwards, the
session must notice at its next MAIL, but a database round trip per MAIL
would cost every message for an event that happens a few times a year.

So every write to accounts or credentials ends by putting 8 fresh random
bytes into ``data_dir/changes``. Workers map that file into memory: reading
the value is a memory read. A session whose value differs from the one it
logged in with re-reads its account off the event loop before going on.
Random bytes rather than a counter: concurrent writers need no lock, and a
torn read can only look like a change, which costs one re-read.

On one machine this is all it takes; a shared signal for several machines
belongs with the shared storage (the scale-out issue).
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import struct
from pathlib import Path

FILE_NAME = "changes"
_SIZE = 8
_VALUE = struct.Struct("<Q")


def signal_path(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def _ensure(path: Path) -> int:
    """An open descriptor of the signal file, created (8 bytes, 0600) if missing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if os.fstat(fd).st_size < _SIZE:
        os.pwrite(fd, os.urandom(_SIZE), 0)
    return fd


def announce(path: Path) -> None:
    """Tell every running worker that accounts or credentials changed."""
    fd = _ensure(path)
    try:
        os.pwrite(fd, os.urandom(_SIZE), 0)
    finally:
        os.close(fd)


def announce_for(db: sqlite3.Connection) -> None:
    """``announce`` beside the database ``db`` is open on (in its data_dir)."""
    for _, name, file in db.execute("PRAGMA database_list"):
        if name == "main" and file:
            try:
                announce(signal_path(Path(file).parent))
            except OSError:
                pass  # read-only data_dir: sessions then see the change at their next login
            return


class ChangeSignal:
    """The worker's read-only view of the signal file.

    If the file cannot be opened (made by another user, say root running the
    CLI), the worker still serves: ``problem`` says why, and sessions then see
    admin changes only when they log in again.
    """

    def __init__(self, data_dir: Path) -> None:
        self._map: mmap.mmap | None = None
        self.problem: str | None = None
        path = signal_path(data_dir)
        try:
            fd = _ensure(path)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                self.problem = f"{path}: {exc.strerror or exc}"
                return
        try:
            self._map = mmap.mmap(fd, _SIZE, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            self.problem = f"{path}: {exc}"
        finally:
            os.close(fd)

    def value(self) -> int:
        return int(_VALUE.unpack_from(self._map)[0]) if self._map is not None else 0

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
