"""One contract for every storage backend (storage/api.py).

Each test runs against every backend in BACKENDS on real files or servers:
the embedded SQLite, and PostgreSQL (a database made for each test on the
server RELAYGATE_TEST_POSTGRES names; the tests fail if it is not there).
Until acceptance moves behind an interface, each backend's test adapter puts
messages in its own way (SQLite: the real spool); the reads are the contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from postgres_helpers import scratch_database
from psycopg_pool import AsyncConnectionPool

from relaygate.accounts.credentials import CredentialError
from relaygate.accounts.store import AccountError
from relaygate.config import PasswordHashConfig, RetentionConfig
from relaygate.delivery.dkim import DKIMError
from relaygate.services.admin import (
    TOKEN_PREFIX,
    AccountsAdmin,
    CredentialsAdmin,
    DKIMAdmin,
    MessagesAdmin,
    NotFound,
    TokenError,
    TokensAdmin,
    decode_cursor,
)
from relaygate.services.login import LoginService
from relaygate.services.retention import Retention
from relaygate.services.web_login import IDLE_SECONDS, WebLogin
from relaygate.spool import Spool, SpooledMessage, new_queue_id
from relaygate.storage import bodies
from relaygate.storage.api import DeliveryAttempt, MessageLog, Webhooks
from relaygate.storage.message_query import MessageQuery
from relaygate.storage.postgres import pool as pool_module
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.postgres.messages import PostgresMessageLog
from relaygate.storage.postgres.schema import migrate
from relaygate.storage.postgres.webhooks import PostgresWebhooks
from relaygate.storage.sqlite import connect
from relaygate.storage.sqlite_backend import SQLiteStorage


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def _message(subject: str, created_at: float, *, size: int = 0) -> SpooledMessage:
    body = f"Subject: {subject}\r\n\r\n".encode() + b"x" * size + b"\r\n"
    return SpooledMessage(
        id=new_queue_id(created_at),
        account="a@example.com",
        client_ip="192.0.2.7",
        mail_from="a@example.com",
        recipients=["r@example.net", "s@example.org"],
        subject=subject,
        body=body,
        created_at=created_at,
        status="queued",
        credential="shop",
        header=b"Received: by test\r\n",
    )


class SQLiteBackend:
    """The embedded default: accepted through the real spool, read back through the log."""

    def __init__(self, directory: Path) -> None:
        self.database = directory / "relaygate.db"
        connect(self.database).close()

    def accept(self, messages: list[SpooledMessage]) -> None:
        loop = asyncio.new_event_loop()
        spool = Spool(self.database, loop, deliver=True)
        try:
            for m in messages:
                loop.run_until_complete(asyncio.wait_for(spool.store(m), 30))
        finally:
            spool.close()
            loop.close()

    def record_attempt(self, message_id: str, outcome: str, reply: str) -> None:
        db = connect(self.database)
        try:
            db.execute(
                "INSERT INTO delivery_attempts (message_id, domain, recipient, ts, host,"
                " reply, tls, outcome) VALUES (?, 'example.net', 'r@example.net', ?, 'mx.test',"
                " ?, NULL, ?)",
                (message_id, time.time(), reply, outcome),
            )
        finally:
            db.close()

    @asynccontextmanager
    async def message_log(self) -> AsyncIterator[MessageLog]:
        store = SQLiteStorage(self.database)
        try:
            yield store.messages
        finally:
            await store.close()

    @asynccontextmanager
    async def webhooks(self) -> AsyncIterator[Webhooks]:
        store = SQLiteStorage(self.database)
        try:
            yield store.webhooks
        finally:
            await store.close()

    def sql(self, statement: str, *values: Any) -> list[tuple[Any, ...]]:
        """Run one statement (? placeholders) and return its rows."""
        db = connect(self.database)
        try:
            return list(db.execute(statement, values).fetchall())
        finally:
            db.close()

    def body_file(self, message_id: str) -> Path:
        return bodies.directory_for(self.database) / message_id

    def lose_body(self, message_id: str) -> None:
        (bodies.directory_for(self.database) / message_id).unlink()


class PostgresBackend:
    def __init__(self, url: str) -> None:
        self.url = url

        async def schema() -> None:
            async with await psycopg.AsyncConnection.connect(url) as connection:
                await migrate(connection)

        run(schema())

    def accept(self, messages: list[SpooledMessage]) -> None:
        with psycopg.connect(self.url) as db:
            for m in messages:
                db.execute(
                    "INSERT INTO messages (id, account, credential, client_ip, mail_from, rcpt_to,"
                    " recipients, subject, size, status, created_at) VALUES"
                    " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        m.id,
                        m.account,
                        m.credential,
                        m.client_ip,
                        m.mail_from,
                        json.dumps(m.recipients),
                        len(m.recipients),
                        m.subject,
                        m.size,
                        m.status,
                        m.created_at,
                    ),
                )
                db.execute(
                    "INSERT INTO message_bodies (id, body) VALUES (%s, %s)",
                    (m.id, m.header + bytes(m.body)),
                )

    def record_attempt(self, message_id: str, outcome: str, reply: str) -> None:
        with psycopg.connect(self.url) as db:
            db.execute(
                "INSERT INTO delivery_attempts (message_id, domain, recipient, ts, host, reply,"
                " tls, outcome) VALUES (%s, 'example.net', 'r@example.net', %s, 'mx.test', %s,"
                " NULL, %s)",
                (message_id, time.time(), reply, outcome),
            )

    @asynccontextmanager
    async def message_log(self) -> AsyncIterator[MessageLog]:
        async with AsyncConnectionPool(self.url, min_size=1, max_size=2) as pool:
            yield PostgresMessageLog(pool)

    @asynccontextmanager
    async def webhooks(self) -> AsyncIterator[Webhooks]:
        async with AsyncConnectionPool(self.url, min_size=1, max_size=2) as pool:
            yield PostgresWebhooks(pool)

    def sql(self, statement: str, *values: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as db:
            cursor = db.execute(statement.replace("?", "%s"), values)
            return list(cursor.fetchall()) if cursor.description else []


Backend = SQLiteBackend | PostgresBackend
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SQLiteBackend(tmp_path)
        return
    with scratch_database() as url:
        yield PostgresBackend(url)


async def _admin(backend: Backend) -> AsyncIterator[MessagesAdmin]:
    async with backend.message_log() as log:
        yield MessagesAdmin(log)


def test_recent_messages_newest_first_with_their_records(backend: Backend) -> None:
    now = time.time()
    messages = [_message(f"m{i}", now - 100 + i) for i in range(5)]
    backend.accept(messages)

    async def check() -> None:
        async for admin in _admin(backend):
            recent = await admin.recent(3)
            assert [r.subject for r in recent] == ["m4", "m3", "m2"]
            first = recent[0]
            assert first.id == messages[4].id
            assert first.account == "a@example.com"
            assert first.credential == "shop"
            assert first.client_ip == "192.0.2.7"
            assert first.rcpt_to == ("r@example.net", "s@example.org")
            assert first.size == messages[4].size
            assert first.status == "queued"
            assert len(await admin.recent(100)) == 5

    run(check())


def test_search_filters_and_pages_without_gaps_or_repeats(backend: Backend) -> None:
    """Filters combine; a cursor pages through newest first, and messages
    accepted between two pages neither repeat nor push any out."""
    now = time.time()
    messages = []
    for i in range(23):
        m = _message(f"Order {i} 50%_off" if i % 3 == 0 else f"Note {i}", now - 1000 + i)
        if i % 4 == 0:
            m = dataclasses.replace(m, account="Other@Example.com", mail_from="other@example.com")
        if i == 7:
            m = dataclasses.replace(m, recipients=["needle@target.example"])
        messages.append(m)
    same_time = [
        dataclasses.replace(_message(f"Tie {n}", now - 500), id=f"ZZTIE{n}") for n in range(3)
    ]
    backend.accept(messages + same_time)

    async def pages(cursor: str | None, count: int) -> tuple[list[str], str | None, int]:
        seen: list[str] = []
        done = 0
        async for admin in _admin(backend):
            while done < count:
                query = MessageQuery(limit=7, before=decode_cursor(cursor) if cursor else None)
                page, cursor = await admin.search(query)
                seen += [r.id for r in page]
                done += 1
                if cursor is None:
                    break
        return seen, cursor, done

    seen, cursor, first = run(pages(None, 2))
    backend.accept([_message("late", now + 10)])  # newer than all: in no later page
    rest, cursor, later = run(pages(cursor, 10))
    expected = sorted(messages + same_time, key=lambda m: (m.created_at, m.id), reverse=True)
    assert seen + rest == [m.id for m in expected] and (first, later, cursor) == (2, 2, None)

    async def check() -> None:
        async for log in _admin(backend):
            other, _ = await log.search(MessageQuery(account="other@EXAMPLE.com", limit=100))
            assert {r.account for r in other} == {"Other@Example.com"} and len(other) == 6
            found, _ = await log.search(MessageQuery(text="50%_OFF", limit=100))
            assert sorted(r.subject for r in found) == sorted(
                f"Order {i} 50%_off" for i in range(0, 23, 3)
            )
            assert (await log.search(MessageQuery(text="50x_off", limit=100)))[0] == []
            needle, _ = await log.search(MessageQuery(text="NEEDLE@target", limit=100))
            assert [r.subject for r in needle] == ["Note 7"]
            window, _ = await log.search(
                MessageQuery(since=now - 1000 + 5, until=now - 1000 + 8, limit=100)
            )
            assert [r.subject for r in window] == ["Note 7", "Order 6 50%_off", "Note 5"]
            none, cursor = await log.search(MessageQuery(status="delivered", limit=5))
            assert none == [] and cursor is None

    run(check())


@pytest.mark.parametrize("size", [10, bodies.SPILL_BYTES])
def test_show_gives_the_stored_body_and_the_delivery_history(backend: Backend, size: int) -> None:
    message = _message("shown", time.time(), size=size)
    backend.accept([message])
    backend.record_attempt(message.id, "deferred", "451 4.3.0 try later")
    backend.record_attempt(message.id, "delivered", "250 2.0.0 ok")

    async def check() -> None:
        async for admin in _admin(backend):
            view = await admin.show(message.id)
            assert view.body == message.header + bytes(message.body)
            assert [(h.outcome, h.reply) for h in view.history] == [
                ("deferred", "451 4.3.0 try later"),
                ("delivered", "250 2.0.0 ok"),
            ]
            assert all(isinstance(h, DeliveryAttempt) for h in view.history)
            assert (await admin.show(message.id, body=False)).body is None

    run(check())


def test_an_unknown_message_is_not_found(backend: Backend) -> None:
    async def check() -> None:
        async for admin in _admin(backend):
            with pytest.raises(NotFound, match="no such message: NOPE"):
                await admin.show("NOPE")
            assert await admin.recent(10) == []

    run(check())


def test_sqlite_a_lost_body_file_is_an_error_a_user_can_read(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path)
    message = _message("lost", time.time(), size=bodies.SPILL_BYTES)
    backend.accept([message])
    backend.lose_body(message.id)

    async def check() -> None:
        async for admin in _admin(backend):
            with pytest.raises(bodies.BodyMissing, match="missing"):
                await admin.show(message.id)

    run(check())


# ------------------------------------------------------------------ accounts

ACCOUNT_BACKENDS = ("sqlite", "postgresql")
Store = SQLiteStorage | PostgresStorage


@pytest.fixture(params=ACCOUNT_BACKENDS)
def account_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """A SQLite file or a PostgreSQL URL, each with the current schema."""
    if request.param == "sqlite":
        database = tmp_path / "relaygate.db"
        connect(database).close()
        yield database
        return
    with scratch_database() as url:
        run(pool_module.migrate(url))
        yield url


async def _nothing() -> None:
    pass


async def _open(database: Path | str) -> Store:
    if isinstance(database, Path):
        return SQLiteStorage(database)
    return await PostgresStorage.open(database, 2, _nothing)


def _accounts(
    database: Path | str, work: Callable[[AccountsAdmin], Coroutine[Any, Any, Any]]
) -> Any:
    async def go() -> Any:
        store = await _open(database)
        try:
            return await work(AccountsAdmin(store.accounts, FAST_HASH))
        finally:
            await store.close()

    return run(go())


FAST_HASH = PasswordHashConfig(memory_kib=1024, time_cost=1, parallelism=1)


def test_accounts_add_list_and_the_rules_every_edge_shares(account_database: Path | str) -> None:
    async def work(admin: AccountsAdmin) -> None:
        added = await admin.add("Alice@Example.COM", "correct horse", ["@example.com"])
        assert added.address == "Alice@example.com"  # the local part keeps its case
        assert added.senders == ("@example.com",)
        assert added.scram is not None  # SCRAM keys made with the hash, every time
        with pytest.raises(AccountError, match="already exists: alice@example"):
            await admin.add("alice@example.com", "another", None)
        with pytest.raises(AccountError, match="shape of an app credential"):
            await admin.add("bob@example.com", "rgc_" + "a" * 43, None)
        with pytest.raises(AccountError):
            await admin.check_new("not an address", None)
        await admin.add("bob@example.com", "pw", None)
        assert [a.address for a in await admin.list()] == ["Alice@example.com", "bob@example.com"]
        assert await admin.count() == 2

    _accounts(account_database, work)


def test_accounts_changes_and_removal(account_database: Path | str) -> None:
    async def work(admin: AccountsAdmin) -> None:
        first = await admin.add("carol@example.com", "one", None)
        changed = await admin.set_password("CAROL@example.com", "two")
        assert changed.address == "carol@example.com"
        assert (await admin.get("carol@example.com")).password_hash != first.password_hash
        await admin.set_disabled("carol@example.com", True)
        assert (await admin.get("carol@example.com")).disabled
        narrowed = await admin.set_senders("carol@example.com", ["carol@example.com", "@x.test"])
        assert narrowed.senders == ("@x.test", "carol@example.com")
        await admin.remove("carol@example.com")
        with pytest.raises(AccountError, match="no such account"):
            await admin.get("carol@example.com")
        with pytest.raises(AccountError, match="no such account"):
            await admin.remove("carol@example.com")

    _accounts(account_database, work)


def _credentials(
    database: Path | str, work: Callable[[CredentialsAdmin], Coroutine[Any, Any, Any]]
) -> Any:
    async def go() -> Any:
        store = await _open(database)
        try:
            await AccountsAdmin(store.accounts, FAST_HASH).add("dave@example.com", "pw", None)
            return await work(CredentialsAdmin(store.accounts, store.credentials))
        finally:
            await store.close()

    return run(go())


def test_credentials_and_limits_through_the_admin_use_cases(account_database: Path | str) -> None:
    async def work(admin: CredentialsAdmin) -> None:
        credential, secret = await admin.add("dave@example.com", "shop", networks=["10.0.0.0/8"])
        assert secret.startswith("rgc_") and len(secret) == 47
        assert credential.networks == ("10.0.0.0/8",)
        assert [c.name for c in await admin.list("dave@example.com")] == ["shop"]
        limited = await admin.limits("dave@example.com", "shop", {"messages_per_hour": 5})
        assert limited.limits == {"messages_per_hour": 5}
        assert (await admin.limits("dave@example.com", "shop", {})).limits == limited.limits
        revoked = await admin.revoke("dave@example.com", "shop")
        assert revoked.revoked_at is not None
        account, limits = await admin.account_limits("dave@example.com", {"messages_per_day": 9})
        assert (account.address, limits) == ("dave@example.com", {"messages_per_day": 9})
        assert (await admin.all_account_limits()) == {"dave@example.com": {"messages_per_day": 9}}
        with pytest.raises(AccountError, match="no such account"):
            await admin.account_limits("nobody@example.com", {})

    _credentials(account_database, work)


def test_credentials_are_found_by_their_secret_on_the_login_path(
    account_database: Path | str,
) -> None:
    async def go() -> None:
        store = await _open(account_database)
        try:
            await AccountsAdmin(store.accounts, FAST_HASH).add("erin@example.com", "pw", None)
            credential, secret = await store.credentials.add(
                "ERIN@example.com", "App", expires_at=None, senders=None, networks=None
            )
            found = await store.credentials.find(secret)
            assert found is not None and found.id == credential.id
            assert found.account_address == "erin@example.com"
            assert (
                await store.credentials.find(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
                is None
            )
            assert await store.credentials.find("not a secret") is None
            await store.credentials.touch(credential.id, 1000.0)
            await store.credentials.touch(credential.id, 999.0)  # older: no change
            again = await store.credentials.by_id(credential.id)
            assert again is not None and again.last_used_at == 1000.0
            with pytest.raises(CredentialError, match="already exists"):
                await store.credentials.add(
                    "erin@example.com", "app", expires_at=None, senders=None, networks=None
                )
            assert await store.credentials.by_id(credential.id + 1000) is None
            assert (await store.accounts.get("Erin@EXAMPLE.com")) is not None
        finally:
            await store.close()

    run(go())


# ------------------------------------------------------------------ secrets, DKIM keys


def test_a_secret_is_made_once_and_kept(account_database: Path | str) -> None:
    async def go() -> tuple[bytes, bytes, bytes]:
        store = await _open(account_database)
        try:
            first = await store.secrets.get_or_create("decoy", 16)
            again = await store.secrets.get_or_create("decoy", 16)
            other = await store.secrets.get_or_create("other")
        finally:
            await store.close()
        store = await _open(account_database)
        try:
            assert await store.secrets.get_or_create("decoy", 16) == first  # kept
        finally:
            await store.close()
        return first, again, other

    first, again, other = run(go())
    assert len(first) == 16 and first == again
    assert len(other) == 32 and other != first


def test_dkim_keys_are_made_once_listed_and_never_replaced(account_database: Path | str) -> None:
    async def go() -> None:
        store = await _open(account_database)
        try:
            admin = DKIMAdmin(store.dkim_keys)
            assert await admin.all() == []
            rsa = await admin.generate("Example.COM", None, "rsa")
            ed = await admin.generate("example.com", "ed1", "ed25519")
            other = await admin.generate("example.org", "s1", "ed25519")
            assert (rsa.key.domain, rsa.key.key_type) == ("example.com", "rsa")
            assert rsa.record.startswith(f"{rsa.key.dns_name} IN TXT")
            with pytest.raises(DKIMError, match=r"selector .ed1. already"):
                await admin.generate("example.com", "ed1", "rsa")
            listed = await admin.all()
            assert [(k.key.domain, k.key.selector) for k in listed] == [
                ("example.com", rsa.key.selector),
                ("example.com", "ed1"),
                ("example.org", "s1"),
            ]
            assert [k.record for k in await admin.show("EXAMPLE.com")] == [rsa.record, ed.record]
            assert other.where != rsa.where
            with pytest.raises(NotFound, match=r"no DKIM key for example\.net"):
                await admin.show("example.net")
        finally:
            await store.close()

    run(go())


# ------------------------------------------------------------------ HTTP API tokens


def _tokens(database: Path | str, work: Callable[[TokensAdmin], Coroutine[Any, Any, Any]]) -> Any:
    async def go() -> Any:
        store = await _open(database)
        try:
            return await work(TokensAdmin(store.tokens, store.secrets))
        finally:
            await store.close()

    return run(go())


def test_tokens_are_shown_once_kept_hashed_and_revoked_at_once(
    account_database: Path | str,
) -> None:
    async def work(admin: TokensAdmin) -> tuple[str, str]:
        writer, secret = await admin.add("deploy-bot", read_only=False)
        reader, read_secret = await admin.add("grafana", read_only=True)
        assert secret.startswith(TOKEN_PREFIX) and len(secret) > 40 and secret != read_secret
        assert (writer.read_only, reader.read_only) == (False, True)
        with pytest.raises(TokenError, match="exists already"):
            await admin.add("grafana", read_only=False)
        for bad in ("", "-x", "a b", "x" * 65, "é"):
            with pytest.raises(TokenError, match="invalid token name"):
                await admin.add(bad, read_only=True)
        found = await admin.verify(secret)
        assert found is not None and found.name == "deploy-bot" and found.last_used is not None
        for wrong in (secret[:-1] + ("A" if secret[-1] != "A" else "B"), secret + "x", "", "rgt_"):
            assert await admin.verify(wrong) is None
        assert [t.name for t in await admin.list()] == ["deploy-bot", "grafana"]
        await admin.revoke("deploy-bot")
        assert await admin.verify(secret) is None
        with pytest.raises(NotFound, match="no token named 'deploy-bot'"):
            await admin.revoke("deploy-bot")
        assert (await admin.verify(read_secret)) is not None
        return secret, read_secret

    _, read_secret = _tokens(account_database, work)
    # Only a keyed hash is stored: the secret is nowhere in the database.
    if isinstance(account_database, Path):
        dump = b"".join(
            bytes(str(row), "utf-8")
            for row in connect(account_database).execute("SELECT * FROM api_tokens")
        )
    else:
        with psycopg.connect(account_database) as db:
            dump = b"".join(bytes(str(r), "utf-8") for r in db.execute("SELECT * FROM api_tokens"))
    assert read_secret.encode() not in dump and read_secret[4:].encode() not in dump


def test_web_sessions_end_on_logout_password_change_disable_and_idle(
    account_database: Path | str,
) -> None:
    """What a stolen or forgotten web UI session is worth: nothing once the owner
    logs out, changes the password or is disabled, or after IDLE_SECONDS unused;
    and the table holds only keyed hashes of the cookies."""

    async def go() -> None:
        store = await _open(database := account_database)
        try:
            accounts = AccountsAdmin(store.accounts, FAST_HASH)
            web = WebLogin(store.accounts, store.sessions, store.secrets, cast(LoginService, None))
            alice = await accounts.add("alice@example.com", "pw-one-long", None)
            assert not alice.admin
            assert (await accounts.set_admin("ALICE@example.com", True)).admin
            assert [a.admin for a in await accounts.list()] == [True]
            token = await web.open_session(alice)
            assert (await web.resolve(token)) is not None
            assert await web.resolve(token + "x") is None and await web.resolve("") is None
            assert await web.csrf_valid(token, await web.csrf_token(token))
            assert not await web.csrf_valid(token, await web.csrf_token(token + "x"))
            await web.logout(token)
            assert await web.resolve(token) is None

            token = await web.open_session(alice)
            await accounts.set_password("alice@example.com", "pw-two-long")
            assert await web.resolve(token) is None  # log in again with the new one
            alice = await accounts.get("alice@example.com")
            token = await web.open_session(alice)
            await accounts.set_disabled("alice@example.com", True)
            assert await web.resolve(token) is None
            await accounts.set_disabled("alice@example.com", False)
            assert await web.resolve(token) is not None

            old = await web.open_session(alice, now=time.time() - IDLE_SECONDS - 5)
            assert await web.resolve(old) is None
            with pytest.raises(AccountError, match="no such account"):
                await accounts.set_admin("nobody@example.com", True)
        finally:
            await store.close()
        assert database  # the rows hold no cookie value (checked on SQLite below)
        if isinstance(database, Path):
            db = connect(database)
            rows = db.execute("SELECT digest FROM ui_sessions").fetchall()
            assert rows and all(token.encode() not in bytes(r[0]) for r in rows)

    run(go())


# ------------------------------------------------------------ delete, retention


def _queue_row(backend: Backend, message_id: str, status: str | None) -> None:
    """Give the message one delivery row in ``status`` (None: no row at all)."""
    backend.sql("DELETE FROM deliveries WHERE message_id = ?", message_id)
    if status is not None:
        backend.sql(
            "INSERT INTO deliveries (message_id, domain, recipients, status, next_attempt,"
            " created_at, updated_at) VALUES (?, 'example.net', '[]', ?, 0, 0, 0)",
            message_id,
            status,
        )


def test_search_by_sender_recipient_and_subject(backend: Backend) -> None:
    now = time.time()
    plain = _message("Invoice 100% paid", now - 3)
    other = dataclasses.replace(
        _message("Welcome_aboard", now - 2),
        mail_from="Billing@Shop.example",
        recipients=["Carol@Example.org"],
    )
    third = dataclasses.replace(_message("invoice reminder", now - 1), recipients=["x@y.example"])
    backend.accept([plain, other, third])

    async def check() -> None:
        async with backend.message_log() as log:
            admin = MessagesAdmin(log)

            async def subjects(**filters: Any) -> list[str]:
                found, _ = await admin.search(MessageQuery(limit=50, **filters))
                return [r.subject for r in found]

            assert await subjects(mail_from="billing@SHOP") == ["Welcome_aboard"]
            assert await subjects(rcpt_to="carol@example.ORG") == ["Welcome_aboard"]
            assert await subjects(subject="INVOICE") == ["invoice reminder", "Invoice 100% paid"]
            # LIKE wildcards in the text are taken literally.
            assert await subjects(subject="100%") == ["Invoice 100% paid"]
            assert await subjects(subject="e_a") == ["Welcome_aboard"]
            assert await subjects(subject="%") == ["Invoice 100% paid"]
            assert await subjects(subject="invoice", rcpt_to="x@y") == ["invoice reminder"]
            assert await subjects(mail_from="nobody") == []

    run(check())


@pytest.mark.parametrize("size", [10, bodies.SPILL_BYTES])
def test_delete_removes_record_body_queue_rows_and_history(backend: Backend, size: int) -> None:
    now = time.time()
    gone, kept, busy = (_message(s, now - i, size=size) for i, s in enumerate("abc"))
    backend.accept([gone, kept, busy])
    _queue_row(backend, gone.id, "queued")  # an admin may delete a queued message
    _queue_row(backend, busy.id, "sending")  # but not one being sent right now
    backend.record_attempt(gone.id, "deferred", "451 later")

    async def check() -> None:
        async for admin in _admin(backend):
            result = await admin.delete([gone.id.lower(), "NOPE", busy.id, gone.id])
            assert (result.removed, result.unknown, result.sending) == (
                [gone.id],
                ["NOPE"],
                [busy.id],
            )
            with pytest.raises(NotFound):
                await admin.show(gone.id)
            assert (await admin.show(kept.id.lower())).body is not None  # any case
            assert (await admin.show(busy.id)).body is not None

    run(check())
    for table, column in (
        ("message_bodies", "id"),
        ("deliveries", "message_id"),
        ("delivery_attempts", "message_id"),
    ):
        assert backend.sql(f"SELECT 1 FROM {table} WHERE {column} = ?", gone.id) == []
    if isinstance(backend, SQLiteBackend) and size >= bodies.SPILL_BYTES:
        assert not backend.body_file(gone.id).exists()
        assert backend.body_file(kept.id).exists()


def test_prune_removes_old_settled_messages_a_batch_at_a_time(backend: Backend) -> None:
    now = time.time()
    old = [_message(f"old {i}", now - 1000 - i) for i in range(7)]
    waiting = _message("old but queued", now - 5000)
    sending = _message("old and being sent", now - 5000)
    new = _message("new", now - 10)
    backend.accept([*old, waiting, sending, new])
    for m in old:
        _queue_row(backend, m.id, "delivered" if m is old[0] else None)
    _queue_row(backend, waiting.id, "queued")
    _queue_row(backend, sending.id, "sending")
    _queue_row(backend, new.id, None)

    async def check() -> None:
        async with backend.message_log() as log:
            assert await log.prune(now - 100, 3) == 3  # the oldest first
            assert await log.prune(now - 100, 3) == 3
            assert await log.prune(now - 100, 3) == 1
            assert await log.prune(now - 100, 3) == 0
            left = {r.subject for r in await log.recent(50)}
            assert left == {"old but queued", "old and being sent", "new"}
            assert await log.count_cutoff(2) == pytest.approx(now - 5000)
            assert await log.count_cutoff(1) == pytest.approx(now - 10)
            assert await log.count_cutoff(4) is None

    run(check())


def test_prune_bodies_keeps_the_record_and_says_the_body_is_gone(backend: Backend) -> None:
    now = time.time()
    big = _message("big", now - 100, size=bodies.SPILL_BYTES)
    small = _message("small", now - 90)
    waiting = _message("queued", now - 80)
    fresh = _message("fresh", now - 1)
    backend.accept([big, small, waiting, fresh])
    for m in (big, small, fresh):
        _queue_row(backend, m.id, "delivered")
    _queue_row(backend, waiting.id, "queued")

    async def check() -> None:
        async with backend.message_log() as log:
            assert await log.prune_bodies(now - 50, 1, now) == 1
            assert await log.prune_bodies(now - 50, 10, now) == 1
            assert await log.prune_bodies(now - 50, 10, now) == 0
            admin = MessagesAdmin(log)
            for m in (big, small):
                view = await admin.show(m.id)
                assert view.body is None and view.record.body_removed_at == pytest.approx(now)
                with pytest.raises(NotFound, match="its body was removed by retention at"):
                    await admin.text(m.id)
            for m in (waiting, fresh):
                view = await admin.show(m.id)
                assert view.body is not None and view.record.body_removed_at is None

    run(check())
    if isinstance(backend, SQLiteBackend):
        assert not backend.body_file(big.id).exists()


def test_retention_round_applies_age_count_and_body_age(backend: Backend) -> None:
    now = time.time()
    messages = [_message(f"m{i}", now - 10_000 + i * 1000) for i in range(10)]  # m9: 1000 s old
    backend.accept(messages)
    for m in messages:
        _queue_row(backend, m.id, "delivered")
    _queue_row(backend, messages[0].id, "queued")  # the oldest still waits: kept

    async def check() -> None:
        async with backend.message_log() as log, backend.webhooks() as hooks:
            config = RetentionConfig(max_age=8500, max_messages=6, body_max_age=2500)
            pruned = await Retention(log, hooks, config, batch=2, pause=0).round(now)
            # m1 is past max_age; m2..m3 are past the 6 newest; m0 waits for delivery.
            assert (pruned.messages, pruned.bodies) == (3, 4)  # bodies: m4..m7 (m0 waits)
            left = {r.subject: r for r in await log.recent(50)}
            assert sorted(left) == ["m0", "m4", "m5", "m6", "m7", "m8", "m9"]
            assert [s for s, r in sorted(left.items()) if r.body_removed_at] == [
                "m4",
                "m5",
                "m6",
                "m7",
            ]
            again = await Retention(log, hooks, config).round(now)
            assert not again.any

    run(check())


def test_settled_webhook_rows_are_pruned_with_their_attempts(backend: Backend) -> None:
    now = time.time()
    rows = [("delivered", now - 90_000), ("failed", now - 90_000), ("queued", now - 90_000)]
    for n, (status, settled) in enumerate([*rows, ("delivered", now - 10)]):
        backend.sql(
            "INSERT INTO webhook_outbox (endpoint, event_id, type, body, status, attempts,"
            " next_attempt, created_at) VALUES ('wh_1', ?, 'message.accepted', '{}', ?, 1, ?, ?)",
            f"evt_{n}",
            status,
            settled,
            settled,
        )
        backend.sql(
            "INSERT INTO webhook_attempts (outbox_id, endpoint, ts, status_code, duration,"
            " outcome) SELECT id, 'wh_1', ?, 200, 0.1, 'delivered' FROM webhook_outbox"
            " WHERE event_id = ?",
            settled,
            f"evt_{n}",
        )

    async def check() -> None:
        async with backend.webhooks() as hooks:
            assert await hooks.prune(now - 3600, 1) == 1
            assert await hooks.prune(now - 3600, 10) == 1
            assert await hooks.prune(now - 3600, 10) == 0

    run(check())
    left = backend.sql("SELECT event_id FROM webhook_outbox ORDER BY event_id")
    assert [r[0] for r in left] == ["evt_2", "evt_3"]
    assert len(backend.sql("SELECT 1 FROM webhook_attempts")) == 2


def test_sqlite_deleting_the_newest_rows_pulls_the_webhook_cursors_back(tmp_path: Path) -> None:
    """SQLite gives a new row max(rowid) + 1: after the newest rows are deleted,
    the webhook collector must not have passed the ids new rows will get."""
    backend = SQLiteBackend(tmp_path)
    now = time.time()
    first, newest = _message("first", now - 2), _message("newest", now - 1)
    backend.accept([first, newest])
    backend.record_attempt(newest.id, "delivered", "250 ok")
    top = backend.sql("SELECT max(rowid) FROM messages")[0][0]
    backend.sql("INSERT INTO webhook_cursor (name, position) VALUES ('messages', ?)", top)
    backend.sql("INSERT INTO webhook_cursor (name, position) VALUES ('attempts', 1)")

    async def delete() -> None:
        async for admin in _admin(backend):
            assert (await admin.delete([newest.id])).removed == [newest.id]

    run(delete())
    cursors = dict(backend.sql("SELECT name, position FROM webhook_cursor"))
    assert cursors == {"messages": top - 1, "attempts": 0}
    backend.accept([_message("after", now)])
    (rowid,) = backend.sql("SELECT rowid FROM messages WHERE subject = 'after'")[0]
    assert rowid > cursors["messages"]  # the collector will read it
