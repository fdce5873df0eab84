"""App credentials and the secrets table, against a real SQLite file."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.accounts.credentials import (
    Credential,
    CredentialError,
    CredentialStore,
    account_limits,
    all_account_limits,
    decode_limits,
    looks_like_credential,
    normalize_limits,
    sender_pattern_covered,
    update_account_limits,
)
from relaygate.accounts.store import AccountStore
from relaygate.storage.secrets import CREDENTIAL_KEY, get_or_create_secret
from relaygate.storage.sqlite import connect

ALICE = "alice@example.com"  # may send as herself only
SHOP = "shop@example.org"  # may send as anyone @example.org, and as news@example.net


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "relaygate.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(db_path)
    accounts = AccountStore(connection)
    accounts.add(ALICE, "not-a-real-hash")
    accounts.add(SHOP, "not-a-real-hash", ["@example.org", "news@example.net"])
    yield connection
    connection.close()


@pytest.fixture
def store(db: sqlite3.Connection) -> CredentialStore:
    return CredentialStore(db)


def add(
    store: CredentialStore,
    address: str = ALICE,
    name: str = "web",
    *,
    expires_at: float | None = None,
    senders: list[str] | None = None,
    networks: list[str] | None = None,
) -> tuple[Credential, str]:
    return store.add(address, name, expires_at=expires_at, senders=senders, networks=networks)


# ------------------------------------------------------------------- secrets


def test_secret_is_created_once_and_shared(db_path: Path, db: sqlite3.Connection) -> None:
    first = get_or_create_secret(db, CREDENTIAL_KEY)
    assert len(first) == 32
    assert get_or_create_secret(db, CREDENTIAL_KEY) == first
    other = connect(db_path)
    try:
        assert get_or_create_secret(other, CREDENTIAL_KEY, size=64) == first  # stored value wins
        assert get_or_create_secret(other, "another", size=16) != first
    finally:
        other.close()
    assert not db.in_transaction


def test_secret_joins_an_open_transaction(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    get_or_create_secret(db, "rolled_back")
    assert db.in_transaction
    db.execute("ROLLBACK")
    assert db.execute("SELECT count(*) FROM secrets WHERE name = 'rolled_back'").fetchone() == (0,)


def test_secret_size_must_be_useful(db: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        get_or_create_secret(db, "tiny", size=8)


def test_key_is_shared_between_stores_on_one_file(db_path: Path, db: sqlite3.Connection) -> None:
    credential, secret = add(CredentialStore(db))
    other = connect(db_path)
    try:
        assert CredentialStore(other).find(secret) == credential
    finally:
        other.close()


# ------------------------------------------------------------ secret format


def test_secret_format(store: CredentialStore) -> None:
    secrets = {add(store, name=f"n{i}")[1] for i in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert secret.startswith("rgc_")
        assert len(secret) == 47
        assert looks_like_credential(secret)


@pytest.mark.parametrize(
    "password",
    [
        "",
        "rgc_",
        "rgc_" + "A" * 42,
        "rgc_" + "A" * 44,
        "RGC_" + "A" * 43,
        "rgd_" + "A" * 43,
        "rgc_" + "A" * 42 + "=",
        "rgc_" + "A" * 42 + "é",
        "rgc_" + "A" * 42 + "\n",
        " rgc_" + "A" * 43,
        "correct horse battery staple",
    ],
)
def test_not_a_credential(password: str) -> None:
    assert not looks_like_credential(password)


def test_shape_accepts_the_whole_alphabet() -> None:
    assert looks_like_credential("rgc_" + "azAZ09-_" * 5 + "abc")


# --------------------------------------------------------- create and find


def test_add_find_list(store: CredentialStore, db: sqlite3.Connection) -> None:
    before = time.time()
    credential, secret = add(store)
    assert credential.account_address == ALICE
    assert credential.name == "web"
    assert credential.senders is None and credential.networks is None
    assert credential.limits is None and credential.expires_at is None
    assert credential.last_used_at is None and credential.revoked_at is None
    assert before <= credential.created_at <= time.time()
    assert credential.is_active(time.time())
    assert credential.status(time.time()) == "active"

    assert store.find(secret) == credential
    assert store.list(ALICE) == [credential]
    assert store.list("ALICE@Example.COM") == [credential]
    assert store.get(ALICE, "WEB") == credential
    assert store.list(SHOP) == []


def test_only_a_keyed_hash_is_stored(store: CredentialStore, db: sqlite3.Connection) -> None:
    _, secret = add(store)
    (stored,) = db.execute("SELECT secret_hash FROM credentials").fetchone()
    key = get_or_create_secret(db, CREDENTIAL_KEY)
    assert bytes(stored) == hmac.new(key, secret.encode(), hashlib.sha256).digest()
    dump = "\n".join(db.iterdump())
    assert secret not in dump and secret[4:] not in dump


def test_find_wrong_secret(store: CredentialStore) -> None:
    _, secret = add(store)
    other = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert store.find(other) is None
    assert store.find("rgc_" + "A" * 43) is None
    assert store.find("a password") is None
    assert store.find("") is None


def test_several_credentials_each_found(store: CredentialStore) -> None:
    made = [add(store, name=name) for name in ("b", "a", "C")]
    made.append(add(store, SHOP, "a"))
    for credential, secret in made:
        assert store.find(secret) == credential
    assert [c.name for c in store.list(ALICE)] == ["a", "b", "C"]
    assert [c.name for c in store.list(SHOP)] == ["a"]


def test_unknown_account(store: CredentialStore) -> None:
    for address in ("nobody@example.com", "not an address"):
        with pytest.raises(CredentialError, match=r"^no such account: "):
            add(store, address)
        with pytest.raises(CredentialError, match=r"^no such account: "):
            store.list(address)
        with pytest.raises(CredentialError, match=r"^no such account: "):
            store.revoke(address, "web")


def test_removing_the_account_removes_its_credentials(
    store: CredentialStore, db: sqlite3.Connection
) -> None:
    _, secret = add(store)
    AccountStore(db).remove(ALICE)
    assert store.find(secret) is None
    assert db.execute("SELECT count(*) FROM credentials").fetchone() == (0,)


# --------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "web-shop_2.prod", "x" * 64, "A.B"])
def test_good_names(store: CredentialStore, name: str) -> None:
    assert add(store, name=name)[0].name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "with space", "café", "a/b", "a\nb", "a@b"])
def test_bad_names(store: CredentialStore, name: str) -> None:
    with pytest.raises(CredentialError, match=r"^invalid credential name: .*1-64 letters"):
        add(store, name=name)


def test_duplicate_names(store: CredentialStore) -> None:
    add(store, name="Web")
    with pytest.raises(CredentialError, match=f"^credential 'Web' already exists for {ALICE}$"):
        add(store, name="web")
    add(store, SHOP, "web")  # another account may use the name
    store.revoke(ALICE, "web")
    with pytest.raises(CredentialError, match="revoked credentials keep their name"):
        add(store, name="WEB")


# ------------------------------------------------------ revocation and expiry


def test_revoke(store: CredentialStore) -> None:
    credential, secret = add(store)
    revoked = store.revoke(ALICE, "WEB")
    assert revoked.revoked_at is not None
    assert revoked.id == credential.id
    found = store.find(secret)
    assert found == revoked  # still found: the caller decides
    assert not found.is_active(time.time())
    assert found.status(time.time()) == "revoked"
    with pytest.raises(CredentialError, match=f"^credential 'web' of {ALICE} is already revoked$"):
        store.revoke(ALICE, "web")
    with pytest.raises(CredentialError, match=f"^no such credential: 'nope' of {ALICE}$"):
        store.revoke(ALICE, "nope")


def test_expiry(store: CredentialStore) -> None:
    now = time.time()
    _, secret = add(store, expires_at=now + 60)
    found = store.find(secret)
    assert found is not None and found.expires_at == now + 60
    assert found.is_active(now + 59.9)
    assert not found.is_active(now + 60)
    assert found.status(now + 61) == "expired"
    store.revoke(ALICE, "web")
    revoked = store.find(secret)
    assert revoked is not None and revoked.status(now + 61) == "revoked"
    with pytest.raises(CredentialError, match="in the past"):
        add(store, name="old", expires_at=now - 1)
    with pytest.raises(CredentialError, match="finite"):
        add(store, name="nan", expires_at=float("nan"))


def test_touch(store: CredentialStore) -> None:
    credential, secret = add(store)
    store.touch(credential.id, 2_000_000_000.0)
    found = store.find(secret)
    assert found is not None and found.last_used_at == 2_000_000_000.0
    store.touch(credential.id, 1_900_000_000.0)  # a late writer must not move it back
    found = store.find(secret)
    assert found is not None and found.last_used_at == 2_000_000_000.0


# ------------------------------------------------------------------ networks


def test_networks_are_normalised(store: CredentialStore) -> None:
    credential, secret = add(
        store,
        networks=[
            "192.0.2.7/24",
            "198.51.100.9",
            "2001:DB8::1/32",
            "192.0.2.0/24",
            "::ffff:203.0.113.0/120",
        ],
    )
    expected = ("192.0.2.0/24", "198.51.100.9/32", "2001:db8::/32", "203.0.113.0/24")
    assert credential.networks == expected
    found = store.find(secret)
    assert found is not None and found.networks == expected


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("192.0.2.1", True),
        ("192.0.2.255", True),
        ("192.0.3.1", False),
        ("198.51.100.9", True),
        ("198.51.100.10", False),
        ("::ffff:192.0.2.44", True),  # what a dual-stack socket reports for IPv4
        ("::ffff:192.0.3.1", False),
        ("2001:db8:1::5", True),
        ("2001:db9::5", False),
        ("::1", False),
        ("127.0.0.1", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_allows_network(store: CredentialStore, client: str, allowed: bool) -> None:
    credential, _ = add(store, networks=["192.0.2.0/24", "198.51.100.9", "2001:db8::/32"])
    assert credential.allows_network(client) is allowed


def test_ipv6_scope_and_link_local(store: CredentialStore) -> None:
    credential, _ = add(store, networks=["fe80::/10"])
    assert credential.allows_network("fe80::1%eth0")
    assert not credential.allows_network("192.0.2.1")


def test_no_networks_means_any(store: CredentialStore) -> None:
    credential, _ = add(store)
    assert credential.allows_network("203.0.113.5")
    assert credential.allows_network("2001:db8::1")


@pytest.mark.parametrize("network", ["10.0.0.0/33", "example.com", "10.0.0", "", " 10.0.0.1"])
def test_bad_networks(store: CredentialStore, network: str) -> None:
    with pytest.raises(CredentialError, match=r"^invalid network: .*192\.0\.2\.0/24"):
        add(store, networks=[network])


def test_empty_lists_are_refused(store: CredentialStore) -> None:
    with pytest.raises(CredentialError, match="none at all to allow any"):
        add(store, networks=[])
    with pytest.raises(CredentialError, match="none at all to use the account's"):
        add(store, senders=[])
    with pytest.raises(TypeError):
        add(store, senders="alice@example.com")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        add(store, networks="192.0.2.0/24")  # type: ignore[arg-type]
    assert store.list(ALICE) == []


# ------------------------------------------------------------------- senders


def test_sender_coverage_rules() -> None:
    assert sender_pattern_covered("x@d.example", ["x@d.example"])
    assert sender_pattern_covered("X@D.example", ["x@d.example"])
    assert sender_pattern_covered("x@d.example", ["@d.example"])
    assert sender_pattern_covered("@d.example", ["@D.example"])
    assert not sender_pattern_covered("@d.example", ["x@d.example"])
    assert not sender_pattern_covered("y@d.example", ["x@d.example"])
    assert not sender_pattern_covered("x@sub.d.example", ["@d.example"])
    assert not sender_pattern_covered("@sub.d.example", ["@d.example"])


def test_senders_narrow_the_account(store: CredentialStore) -> None:
    credential, secret = add(
        store, SHOP, "orders", senders=["Orders@Example.ORG", "@example.org", "news@example.net"]
    )
    assert credential.senders == ("@example.org", "Orders@example.org", "news@example.net")
    assert store.find(secret) == credential

    own, _ = add(store, name="own", senders=[ALICE.upper()])
    assert own.senders == ("ALICE@example.com",)


@pytest.mark.parametrize(
    ("address", "pattern"),
    [
        (ALICE, "@example.com"),  # a domain needs the domain pattern
        (ALICE, "bob@example.com"),
        (SHOP, "@example.net"),  # only news@ there
        (SHOP, "x@sub.example.org"),
    ],
)
def test_senders_beyond_the_account_are_refused(
    store: CredentialStore, address: str, pattern: str
) -> None:
    with pytest.raises(
        CredentialError,
        match=rf"^sender pattern '{pattern}' is not allowed for {address} \(it may send as: .*\);"
        " a credential can only narrow its account's senders$",
    ):
        add(store, address, senders=[pattern])


def test_bad_sender_pattern(store: CredentialStore) -> None:
    with pytest.raises(CredentialError, match=r"^invalid sender pattern: 'example.com': "):
        add(store, senders=["example.com"])


def test_effective_senders(store: CredentialStore, db: sqlite3.Connection) -> None:
    narrow, _ = add(store, SHOP, "orders", senders=["orders@example.org", "news@example.net"])
    wide, _ = add(store, SHOP, "all")
    account = AccountStore(db).get(SHOP)
    assert account is not None
    assert narrow.effective_senders(account.senders) == ("news@example.net", "orders@example.org")
    assert wide.effective_senders(account.senders) == account.senders
    # The account is narrowed later: the credential narrows with it.
    assert narrow.effective_senders(["news@example.net"]) == ("news@example.net",)
    assert narrow.effective_senders(["other@example.com"]) == ()


def test_damaged_columns_allow_nothing(store: CredentialStore, db: sqlite3.Connection) -> None:
    _, secret = add(store, senders=[ALICE], networks=["192.0.2.0/24"])
    db.execute("UPDATE credentials SET senders = 'oops', networks = '{\"a\": 1}'")
    found = store.find(secret)
    assert found is not None
    assert found.senders == () and found.networks == ()
    assert found.effective_senders([ALICE]) == ()
    assert not found.allows_network("192.0.2.1")
    db.execute('UPDATE credentials SET networks = \'["garbage", "192.0.2.0/24"]\'')
    found = store.find(secret)
    assert found is not None and found.allows_network("192.0.2.1")


# -------------------------------------------------------------------- limits


def test_credential_limits(store: CredentialStore, db: sqlite3.Connection) -> None:
    _, secret = add(store)
    updated = store.update_limits(ALICE, "web", {"messages_per_day": 100, "messages_per_hour": 0})
    assert updated.limits == {"messages_per_hour": 0, "messages_per_day": 100}
    (stored,) = db.execute("SELECT limits FROM credentials").fetchone()
    assert stored == '{"messages_per_hour":0,"messages_per_day":100}'
    updated = store.update_limits(ALICE, "web", {"messages_per_day": 50})
    assert updated.limits == {"messages_per_hour": 0, "messages_per_day": 50}
    found = store.find(secret)
    assert found is not None and found.limits == updated.limits
    updated = store.update_limits(ALICE, "web", {"recipients_per_day": 7}, clear=True)
    assert updated.limits == {"recipients_per_day": 7}
    assert store.update_limits(ALICE, "web", {}, clear=True).limits is None
    assert db.execute("SELECT limits FROM credentials").fetchone() == (None,)
    with pytest.raises(CredentialError, match=r"^no such credential"):
        store.update_limits(ALICE, "nope", {"messages_per_day": 1})


def test_account_limits(db: sqlite3.Connection) -> None:
    assert account_limits(db, ALICE) is None
    assert update_account_limits(db, "ALICE@example.com", {"new_recipients_per_day": 20}) == {
        "new_recipients_per_day": 20
    }
    assert update_account_limits(db, ALICE, {"messages_per_hour": 10}) == {
        "messages_per_hour": 10,
        "new_recipients_per_day": 20,
    }
    assert account_limits(db, ALICE) == {"messages_per_hour": 10, "new_recipients_per_day": 20}
    assert all_account_limits(db) == {
        ALICE: {"messages_per_hour": 10, "new_recipients_per_day": 20},
        SHOP: None,
    }
    assert update_account_limits(db, ALICE, {}, clear=True) is None
    assert db.execute("SELECT limits FROM accounts WHERE address = ?", (ALICE,)).fetchone() == (
        None,
    )
    for address in ("nobody@example.com", "bad address"):
        with pytest.raises(CredentialError, match=r"^no such account: "):
            account_limits(db, address)
        with pytest.raises(CredentialError, match=r"^no such account: "):
            update_account_limits(db, address, {"messages_per_day": 1})


def test_limit_validation() -> None:
    assert normalize_limits({"messages_per_day": 5, "messages_per_hour": 1}) == {
        "messages_per_hour": 1,
        "messages_per_day": 5,
    }
    with pytest.raises(CredentialError, match=r"^unknown limit: 'per_minute'"):
        normalize_limits({"per_minute": 1})
    for value in (-1, 1_000_000_001, True, 1.5):
        with pytest.raises(CredentialError, match="whole number from 0"):
            normalize_limits({"messages_per_day": value})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        (None, None),
        ("", None),
        ("[1]", None),
        ("{}", None),
        ('{"messages_per_day": 3}', {"messages_per_day": 3}),
        ('{"messages_per_day": -3, "x": 1, "messages_per_hour": true}', None),
        ('{"messages_per_day": "3", "recipients_per_day": 9}', {"recipients_per_day": 9}),
    ],
)
def test_decode_limits(text: str | None, decoded: dict[str, int] | None) -> None:
    assert decode_limits(text) == decoded
