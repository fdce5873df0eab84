"""The WHERE clause both backends build from a MessageQuery (storage/message_query.py).
The contract tests run it against SQLite and PostgreSQL; these pin its shape."""

from __future__ import annotations

import sqlite3

from relaygate.storage.message_query import MAX_TEXT, MessageQuery, where


def test_no_filters_no_clause() -> None:
    assert where(MessageQuery(), "?", "LIKE", "rcpt_to") == ("", [])


def test_sender_recipient_and_subject_are_escaped_substrings() -> None:
    clause, values = where(
        MessageQuery(mail_from="a_b", rcpt_to="50%", subject="back\\slash"),
        "%s",
        "ILIKE",
        "rcpt_to::text",
    )
    assert clause == (
        " WHERE mail_from ILIKE %s ESCAPE '\\' AND rcpt_to::text ILIKE %s ESCAPE '\\'"
        " AND subject ILIKE %s ESCAPE '\\'"
    )
    assert values == ["%a\\_b%", "%50\\%%", "%back\\\\slash%"]


def test_filters_combine_in_order_with_the_cursor_last() -> None:
    clause, values = where(
        MessageQuery(
            account="A@x", status="captured", subject="hi", since=1.0, until=2.0, before=(3.0, "Q")
        ),
        "?",
        "LIKE",
        "rcpt_to",
    )
    assert clause == (
        " WHERE lower(account) = lower(?) AND status = ? AND subject LIKE ? ESCAPE '\\'"
        " AND created_at >= ? AND created_at < ?"
        " AND (created_at < ? OR (created_at = ? AND id < ?))"
    )
    assert values == ["A@x", "captured", "%hi%", 1.0, 2.0, 3.0, 3.0, "Q"]


def test_long_text_is_cut_and_empty_text_ignored() -> None:
    _, values = where(MessageQuery(subject="x" * 1000), "?", "LIKE", "rcpt_to")
    assert values == ["%" + "x" * MAX_TEXT + "%"]
    assert where(MessageQuery(mail_from="", subject=""), "?", "LIKE", "rcpt_to") == ("", [])


def test_the_clause_matches_what_it_should_in_sqlite() -> None:
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE messages (id TEXT, account TEXT, status TEXT, subject TEXT,"
        " mail_from TEXT, rcpt_to TEXT, created_at REAL)"
    )
    rows = [
        ("1", "a", "captured", "Sale 50% off", "shop@example.com", '["Bob@x.test"]', 1.0),
        ("2", "a", "captured", "Sale 50 off", "SHOP@example.com", '["carol@x.test"]', 2.0),
        ("3", "a", "captured", "other", "news@example.com", '["bob@x.test"]', 3.0),
    ]
    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def ids(query: MessageQuery) -> list[str]:
        clause, values = where(query, "?", "LIKE", "rcpt_to")
        sql = f"SELECT id FROM messages{clause} ORDER BY id"
        return [r[0] for r in db.execute(sql, values)]

    assert ids(MessageQuery(subject="50%")) == ["1"]
    assert ids(MessageQuery(mail_from="shop@")) == ["1", "2"]
    assert ids(MessageQuery(rcpt_to="BOB@")) == ["1", "3"]
    assert ids(MessageQuery(rcpt_to="bob", subject="sale")) == ["1"]
