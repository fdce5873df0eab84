"""The spool's writer thread on a real SQLite file: failures fail a batch, never the thread."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from relaygate import quotas
from relaygate.spool import Spool, SpooledMessage, SpoolError, new_queue_id
from relaygate.storage import bodies
from relaygate.storage.sqlite import connect


def _message(subject: str, *, header: bytes = b"") -> SpooledMessage:
    return SpooledMessage(
        id=new_queue_id(),
        account="a@example.com",
        client_ip="127.0.0.1",
        mail_from="a@example.com",
        recipients=["r@example.net"],
        subject=subject,
        body=b"Subject: " + subject.encode() + b"\r\n\r\nhello\r\n",
        created_at=time.time(),
        header=header,
    )


def test_a_non_sqlite_failure_fails_the_batch_and_the_next_message_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "relaygate.db"
    connect(database).close()
    loop = asyncio.new_event_loop()
    spool = Spool(database, loop)
    try:
        calls = {"n": 0}
        real = quotas.record_many

        def flaky(db: object, items: object) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError("not an sqlite3.Error")
            real(db, items)  # type: ignore[arg-type]

        monkeypatch.setattr(quotas, "record_many", flaky)
        with pytest.raises(SpoolError, match="ValueError"):
            loop.run_until_complete(asyncio.wait_for(spool.store(_message("first")), 10))
        second = _message("second", header=b"Received: by test\r\n")
        loop.run_until_complete(asyncio.wait_for(spool.store(second), 10))
    finally:
        spool.close()
        loop.close()
    db = connect(database)
    rows = db.execute("SELECT subject, size FROM messages").fetchall()
    (body,) = db.execute("SELECT body FROM message_bodies").fetchone()
    db.close()
    assert rows == [("second", second.size)]
    assert bytes(body) == second.header + second.body  # written in place, in order


def _store_all(database: Path, messages: list[SpooledMessage]) -> list[BaseException | None]:
    loop = asyncio.new_event_loop()
    spool = Spool(database, loop)
    try:
        futures = [spool.store(m) for m in messages]
        done = loop.run_until_complete(
            asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
        )
    finally:
        spool.close()
        loop.close()
    return [d if isinstance(d, BaseException) else None for d in done]


def test_a_large_body_goes_to_a_private_file_and_reads_back_whole(tmp_path: Path) -> None:
    database = tmp_path / "relaygate.db"
    connect(database).close()
    large = _message("large", header=b"Received: by test\r\n")
    large.body = bytearray(b"Subject: large\r\n\r\n" + b"x" * 78 + b"\r\n") * 5000
    small = _message("small", header=b"Received: by test\r\n")
    assert large.size >= bodies.SPILL_BYTES > small.size
    assert _store_all(database, [large, small]) == [None, None]
    directory = bodies.directory_for(database)
    assert sorted(os.listdir(directory)) == [large.id]  # the small one stays in its row
    assert stat.S_IMODE((directory / large.id).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    db = connect(database)
    try:
        assert bodies.read(db, directory, large.id) == large.header + bytes(large.body)
        assert bodies.read(db, directory, small.id) == small.header + small.body
        assert bodies.read(db, directory, "NOSUCHID") is None
        (size,) = db.execute("SELECT size FROM messages WHERE id = ?", (large.id,)).fetchone()
        assert size == large.size
        (directory / large.id).unlink()
        with pytest.raises(bodies.BodyMissing):
            bodies.read(db, directory, large.id)
    finally:
        db.close()


def test_a_failed_batch_leaves_no_body_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "relaygate.db"
    connect(database).close()

    def broken(db: object, items: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(quotas, "record_many", broken)
    large = _message("large")
    large.body = b"x" * bodies.SPILL_BYTES
    [error] = _store_all(database, [large])
    assert isinstance(error, SpoolError)
    assert os.listdir(bodies.directory_for(database)) == []
    db = connect(database)
    try:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    finally:
        db.close()


def test_orphan_body_files_are_removed_and_committed_ones_kept(tmp_path: Path) -> None:
    database = tmp_path / "relaygate.db"
    connect(database).close()
    kept = _message("kept")
    kept.body = b"y" * bodies.SPILL_BYTES
    assert _store_all(database, [kept]) == [None]
    directory = bodies.directory_for(database)
    # A file written before a crash, its row never committed.
    bodies.write_file(directory, "01ORPHAN0000000000", [b"half a message"])
    db = connect(database)
    try:
        assert bodies.remove_orphans(db, directory) == 1
        assert os.listdir(directory) == [kept.id]
        assert bodies.read(db, directory, kept.id) == kept.body
    finally:
        db.close()


def test_reading_only_the_head_of_a_body_in_a_row_or_a_file(tmp_path: Path) -> None:
    database = tmp_path / "relaygate.db"
    connect(database).close()
    small, large = _message("small"), _message("large")
    large.body = b"Subject: large\r\n\r\n" + b"z" * bodies.SPILL_BYTES
    assert _store_all(database, [small, large]) == [None, None]
    directory = bodies.directory_for(database)
    db = connect(database)
    try:
        for m in (small, large):
            whole = bodies.read(db, directory, m.id)
            assert whole == m.header + bytes(m.body)
            assert bodies.read(db, directory, m.id, limit=10) == whole[:10]
    finally:
        db.close()
