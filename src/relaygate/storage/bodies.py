"""Message bodies: small ones in their database row, large ones in a file each.

SQLite writes every byte of a blob twice (into the WAL, then into the database
file at the checkpoint) and in 4 KiB pages; for a 10 MB message that cost more
CPU than everything else on the path. A body of SPILL_BYTES or more is written
once to ``data_dir/bodies/<queue id>`` instead, like a Postfix queue file.

Durability order (the spool writer): write the file, fdatasync it, fsync the
directory, and only then commit the row that names it (``in_file = 1``). A
crash before the commit leaves a file without a row: ``remove_orphans`` deletes
those at start. A crash after it leaves both, durable. Nothing is acknowledged
before the commit, so a 250 always has its body on disk.

Everything that reads a body goes through ``read`` (the CLI, delivery, bounces).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from relaygate.storage.files import FILE_MODE, private_directory

SPILL_BYTES = 256 * 1024
DIRECTORY = "bodies"


class BodyMissing(Exception):
    """The row says the body is in a file that is not there (deleted by hand?)."""


def directory_for(database: Path) -> Path:
    """Where large bodies live: beside the database, in data_dir/bodies."""
    return database.with_name(DIRECTORY)


def prepare(directory: Path) -> None:
    """Make the directory (0700) and make its own entry durable."""
    if directory.is_dir():
        return
    private_directory(directory)
    sync_directory(directory.parent)


def write_file(directory: Path, message_id: str, parts: Sequence[bytes | bytearray]) -> None:
    """Write ``parts`` to the body file of ``message_id`` and fdatasync it.

    The name must be new (O_EXCL): a queue id is never reused, and a file left
    by a crash is removed at start before anything is written.
    """
    path = directory / message_id
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        views = [memoryview(part) for part in parts if part]
        while views:
            written = os.writev(fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        remove_file(directory, message_id)
        raise
    os.close(fd)


def remove_file(directory: Path, message_id: str) -> None:
    try:
        os.unlink(directory / message_id)
    except FileNotFoundError:
        pass


def sync_directory(directory: Path) -> None:
    """fsync a directory, so the names made in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(
    db: sqlite3.Connection, directory: Path, message_id: str, limit: int | None = None
) -> bytes | None:
    """The stored body of ``message_id`` (its first ``limit`` bytes if given);
    None if there is no body row.

    Raises BodyMissing when the row points at a file that is gone.
    """
    if limit is None:
        row = db.execute(
            "SELECT body, in_file FROM message_bodies WHERE id = ?", (message_id,)
        ).fetchone()
    else:
        row = db.execute(
            "SELECT substr(body, 1, ?), in_file FROM message_bodies WHERE id = ?",
            (limit, message_id),
        ).fetchone()
    if row is None:
        return None
    if not row[1]:
        return bytes(row[0])
    try:
        with open(directory / message_id, "rb") as file:
            return file.read() if limit is None else file.read(limit)
    except FileNotFoundError:
        raise BodyMissing(f"body file {directory / message_id} is missing") from None


def remove_orphans(db: sqlite3.Connection, directory: Path) -> int:
    """Delete body files no committed row names (a crash between file and commit).

    Run at start, before any spool writer: a file being written at that moment
    would have no row yet either. Returns how many were removed.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        row = db.execute(
            "SELECT 1 FROM message_bodies WHERE id = ? AND in_file = 1", (name,)
        ).fetchone()
        if row is None:
            remove_file(directory, name)
            removed += 1
    return removed
