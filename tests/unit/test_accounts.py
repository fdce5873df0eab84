"""Accounts: the SQLite store, address rules, sender binding, password hashing."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relaygate.accounts.passwords import PasswordHasher
from relaygate.accounts.store import (
    AccountError,
    AccountStore,
    normalize_address,
    normalize_sender_pattern,
)
from relaygate.config import PasswordHashConfig
from relaygate.policy import sender_allowed
from relaygate.storage.sqlite import connect

FAST_HASH = PasswordHashConfig(memory_kib=8192, time_cost=1)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(tmp_path / "relaygate.db")
    yield connection
    connection.close()


@pytest.fixture
def store(db: sqlite3.Connection) -> AccountStore:
    return AccountStore(db)


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(FAST_HASH)


# ----------------------------------------------------------------- the store


def test_add_then_get(store: AccountStore) -> None:
    before = time.time()
    added = store.add("Alice@Example.COM", "hash-1")
    assert added.address == "Alice@example.com"  # domain lower-cased, local part kept
    assert added.senders == ("Alice@example.com",)
    assert not added.disabled
    assert before <= added.created_at == added.updated_at <= time.time()
    assert store.get("Alice@example.com") == added
    assert store.count() == 1


@pytest.mark.parametrize(
    "spelling", ["alice@example.com", "ALICE@EXAMPLE.COM", "aLiCe@eXample.com"]
)
def test_lookup_ignores_case(store: AccountStore, spelling: str) -> None:
    store.add("Alice@example.com", "hash")
    account = store.get(spelling)
    assert account is not None
    assert account.address == "Alice@example.com"


@pytest.mark.parametrize("address", ["bob@example.com", "", "not an address", "<a@b>", "a@b\n"])
def test_get_unknown_or_malformed_is_none(store: AccountStore, address: str) -> None:
    store.add("alice@example.com", "hash")
    assert store.get(address) is None


def test_add_with_senders(store: AccountStore) -> None:
    account = store.add("alice@example.com", "h", ["@Example.ORG", "Alias@Example.com"])
    assert account.senders == ("@example.org", "Alias@example.com")
    assert store.get("alice@example.com") == account


def test_duplicate_senders_collapse(store: AccountStore) -> None:
    account = store.add("alice@example.com", "h", ["a@example.com", "A@EXAMPLE.com"])
    assert account.senders == ("a@example.com",)


def test_add_twice_in_any_case_fails(store: AccountStore) -> None:
    store.add("alice@example.com", "h")
    with pytest.raises(AccountError, match=r"^account already exists: ALICE@example\.com$"):
        store.add("ALICE@example.com", "h")
    assert store.count() == 1


def test_add_rejects_bad_input(store: AccountStore) -> None:
    with pytest.raises(AccountError, match="invalid address"):
        store.add("alice", "h")
    with pytest.raises(AccountError, match="invalid sender pattern"):
        store.add("alice@example.com", "h", ["example.com"])
    with pytest.raises(AccountError, match="at least one sender pattern"):
        store.add("alice@example.com", "h", [])
    assert store.count() == 0  # nothing half-written


def test_set_password_hash(store: AccountStore) -> None:
    added = store.add("alice@example.com", "old")
    store.set_password_hash("ALICE@example.com", "new")
    account = store.get("alice@example.com")
    assert account is not None
    assert account.password_hash == "new"
    assert account.updated_at >= added.updated_at
    assert account.created_at == added.created_at


def test_updated_at_moves_on_every_change(store: AccountStore) -> None:
    stamps = [store.add("alice@example.com", "h").updated_at]
    changes: list[Callable[[], None]] = [
        lambda: store.set_password_hash("alice@example.com", "h2"),
        lambda: store.set_disabled("alice@example.com", True),
        lambda: store.set_senders("alice@example.com", ["@example.com"]),
    ]
    for change in changes:
        time.sleep(0.002)
        change()
        account = store.get("alice@example.com")
        assert account is not None
        stamps.append(account.updated_at)
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)


def test_disable_and_enable(store: AccountStore) -> None:
    store.add("alice@example.com", "h")
    store.set_disabled("alice@example.com", True)
    account = store.get("alice@example.com")
    assert account is not None and account.disabled
    store.set_disabled("alice@example.com", False)
    account = store.get("alice@example.com")
    assert account is not None and not account.disabled


def test_set_senders_replaces(store: AccountStore, db: sqlite3.Connection) -> None:
    store.add("alice@example.com", "h", ["alice@example.com", "@example.org"])
    store.set_senders("alice@example.com", ["@Example.NET"])
    account = store.get("alice@example.com")
    assert account is not None
    assert account.senders == ("@example.net",)
    assert db.execute("SELECT count(*) FROM account_senders").fetchone() == (1,)


def test_set_senders_rejects_empty_and_keeps_old(store: AccountStore) -> None:
    store.add("alice@example.com", "h")
    with pytest.raises(AccountError, match="at least one"):
        store.set_senders("alice@example.com", [])
    with pytest.raises(AccountError, match="invalid sender pattern"):
        store.set_senders("alice@example.com", ["@example.com", "bad pattern"])
    account = store.get("alice@example.com")
    assert account is not None
    assert account.senders == ("alice@example.com",)


def test_remove_takes_senders_along(store: AccountStore, db: sqlite3.Connection) -> None:
    store.add("alice@example.com", "h", ["@example.com"])
    store.add("bob@example.com", "h")
    store.remove("ALICE@EXAMPLE.COM")
    assert store.get("alice@example.com") is None
    assert store.count() == 1
    assert db.execute("SELECT pattern FROM account_senders").fetchall() == [("bob@example.com",)]


@pytest.mark.parametrize("address", ["nobody@example.com", "not an address"])
def test_changes_to_unknown_accounts_fail(store: AccountStore, address: str) -> None:
    message = f"^no such account: {address}$"
    with pytest.raises(AccountError, match=message):
        store.set_password_hash(address, "h")
    with pytest.raises(AccountError, match=message):
        store.set_disabled(address, True)
    with pytest.raises(AccountError, match=message):
        store.set_senders(address, ["@example.com"])
    with pytest.raises(AccountError, match=message):
        store.remove(address)


def test_failed_write_leaves_no_transaction_open(
    store: AccountStore, db: sqlite3.Connection
) -> None:
    with pytest.raises(AccountError):
        store.set_disabled("nobody@example.com", True)
    assert not db.in_transaction
    store.add("alice@example.com", "h")  # the connection is still usable


def test_list_is_sorted_and_complete(store: AccountStore) -> None:
    assert store.list() == []
    store.add("carol@example.com", "h")
    store.add("alice@example.com", "h", ["@example.com", "alice@example.org"])
    store.add("bob@example.com", "h")
    accounts = store.list()
    assert [a.address for a in accounts] == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
    ]
    assert accounts[0].senders == ("@example.com", "alice@example.org")
    assert accounts == [store.get(a.address) for a in accounts]


def test_changes_visible_to_another_connection(tmp_path: Path, store: AccountStore) -> None:
    # The server reads accounts through its own connection while the CLI writes.
    store.add("alice@example.com", "h")
    other = connect(tmp_path / "relaygate.db")
    try:
        account = AccountStore(other).get("alice@example.com")
        assert account is not None and account.password_hash == "h"
    finally:
        other.close()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice.Smith+tag@Mail.Example.COM", "Alice.Smith+tag@mail.example.com"),
        ("o'brien@example.com", "o'brien@example.com"),
        ("admin@localhost", "admin@localhost"),
        ("jürgen@Bücher.Example", "jürgen@bücher.example"),
    ],
)
def test_normalize_address_accepts(text: str, expected: str) -> None:
    assert normalize_address(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "local@domain"),
        ("alice", "local@domain"),
        ("@example.com", "before @ is empty"),
        ("alice@", "domain is empty"),
        ("a@b@example.com", "more than one @"),
        ("alice smith@example.com", "space"),
        (" alice@example.com", "space"),
        ("alice@example.com\r", "space"),
        ("alice\x00@example.com", "control character"),
        ("<alice@example.com>", "without < >"),
        ("alice@example..com", "empty label"),
        ("alice@example.com.", "empty label"),
        ("alice@-example.com", "hyphen"),
        ("alice@exa_mple.com", "only letters, digits and hyphens"),
        (".alice@example.com", "dot"),
        ("al..ice@example.com", "dot"),
        ('"alice"@example.com', "may not contain"),
        ("a(b)@example.com", "may not contain"),
        ("x" * 65 + "@example.com", "longer than 64"),
        ("x" * 64 + "@" + ".".join(["d" * 63] * 3), "longer than 254"),
        ("x@" + ".".join(["d" * 63] * 5), "domain is longer than 253"),
    ],
)
def test_normalize_address_rejects(text: str, reason: str) -> None:
    with pytest.raises(AccountError) as caught:
        normalize_address(text)
    message = str(caught.value)
    assert message.startswith(f"invalid address: {text!r}: ")
    assert reason in message
    assert "\n" not in message


def test_normalize_sender_pattern() -> None:
    assert normalize_sender_pattern("@Example.COM") == "@example.com"
    assert normalize_sender_pattern("Bob@Example.COM") == "Bob@example.com"
    for bad in ("@", "@@example.com", "example.com", "@exa mple.com", "bob"):
        with pytest.raises(AccountError, match=r"^invalid sender pattern: "):
            normalize_sender_pattern(bad)


# ------------------------------------------------------------ sender binding


@pytest.mark.parametrize(
    ("patterns", "address", "allowed"),
    [
        (["alice@example.com"], "alice@example.com", True),
        (["alice@example.com"], "ALICE@Example.Com", True),  # local part ignores case too
        (["Alice@example.com"], "alice@EXAMPLE.com", True),
        (["alice@example.com"], "bob@example.com", False),
        (["alice@example.com"], "alice@example.org", False),
        (["alice@example.com"], "alice+tag@example.com", False),  # no sub-addressing magic
        (["@example.com"], "anyone@example.com", True),
        (["@example.com"], "Anyone@EXAMPLE.COM", True),
        (["@example.com"], "x@mail.example.com", False),  # subdomains need their own pattern
        (["@example.com"], "x@notexample.com", False),
        (["@example.com"], "x@example.com.evil", False),
        (["alice@example.com", "@example.org"], "bob@example.org", True),
        (["alice@example.com", "@example.com"], "", False),  # null sender never matches
        (["@example.com"], "@example.com", False),
        (["@example.com"], "example.com", False),
        ([], "alice@example.com", False),
    ],
)
def test_sender_allowed(patterns: list[str], address: str, allowed: bool) -> None:
    assert sender_allowed(patterns, address) is allowed


def test_account_may_send_as(store: AccountStore) -> None:
    account = store.add("alice@example.com", "h", ["alice@example.com", "@example.org"])
    assert account.may_send_as("ALICE@example.com")
    assert account.may_send_as("anyone@example.org")
    assert not account.may_send_as("bob@example.com")


# ---------------------------------------------------------------- passwords


def test_hash_and_verify(hasher: PasswordHasher) -> None:
    stored = hasher.hash("correct horse")
    assert stored.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    assert hasher.verify(stored, "correct horse")
    assert not hasher.verify(stored, "correct horse ")
    assert not hasher.verify(stored, "")


def test_hashes_are_salted(hasher: PasswordHasher) -> None:
    assert hasher.hash("same") != hasher.hash("same")


def test_unicode_password(hasher: PasswordHasher) -> None:
    stored = hasher.hash("pässwörd\u2603")
    assert hasher.verify(stored, "pässwörd\u2603")
    assert not hasher.verify(stored, "passwörd\u2603")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not a hash",
        "$argon2id$v=19$m=8192,t=1,p=1$broken",
        "$argon2id$v=19$m=8192,t=1,p=1$c2FsdHNhbHQ$!!!!",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",  # bcrypt
    ],
)
def test_verify_garbage_hash_is_false(hasher: PasswordHasher, garbage: str) -> None:
    assert hasher.verify(garbage, "anything") is False


def test_verify_dummy_returns_nothing_and_costs_like_verify(hasher: PasswordHasher) -> None:
    stored = hasher.hash("secret")
    hasher.verify_dummy("secret")  # warm up
    real = min(_timed(lambda: hasher.verify(stored, "wrong")) for _ in range(3))
    dummy = min(_timed(lambda: hasher.verify_dummy("wrong")) for _ in range(3))
    # Same parameters, so the same work; a generous bound keeps CI noise out.
    assert dummy > real / 3


def test_configured_cost_is_used() -> None:
    stored = PasswordHasher(PasswordHashConfig(memory_kib=9000, time_cost=2, parallelism=2)).hash(
        "x"
    )
    assert "$m=9000,t=2,p=2$" in stored


def test_needs_rehash(hasher: PasswordHasher) -> None:
    assert not hasher.needs_rehash(hasher.hash("x"))
    stronger = PasswordHasher(PasswordHashConfig(memory_kib=8192, time_cost=2))
    assert stronger.needs_rehash(hasher.hash("x"))
    assert hasher.needs_rehash("garbage")


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start
