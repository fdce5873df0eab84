"""The spool's writer thread on a real SQLite file: failures fail a batch, never the thread."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relaygate import quotas
from relaygate.spool import Spool, SpooledMessage, SpoolError, new_queue_id
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
