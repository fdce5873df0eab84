"""App credentials: named, server-generated secrets an account logs in with.

Besides its password an account can hold several credentials, one per app or
site that sends as it (like SES or Postal SMTP credentials). Each has a name,
and may carry an expiry, narrower sender patterns, the client networks it may
log in from and its own sending limits. A client uses one with AUTH PLAIN or
LOGIN: user name = the ACCOUNT ADDRESS, password = the credential SECRET.

Secret format
    ``rgc_`` followed by 32 random bytes in base64url without padding, 47
    characters in all (``rgc_`` + 43 of ``A-Z a-z 0-9 - _``). The fixed prefix
    lets the server tell a credential from a password by looking at it alone
    (``looks_like_credential``), without touching the database, and lets
    secret scanners spot one pasted where it should not be. The CLI refuses
    passwords of this shape so the two never overlap.

Storage
    The secret is shown once, when created, and never stored. Having 256 bits
    of entropy it needs no slow hash: the row keeps HMAC-SHA256 of the secret
    under a server-wide key (``storage.secrets.CREDENTIAL_KEY``), so ``find``
    is one indexed look-up on that hash followed by a constant-time compare.
    A leaked table without the key is of no use for logging in.

Revoked and expired credentials stay in the table (messages name the
credential they were sent with), so their names cannot be reused; names are
compared without regard to case.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from relaygate.accounts.changes import announce_for
from relaygate.accounts.store import (
    Account,
    AccountError,
    AccountStore,
    normalize_address,
    normalize_sender_pattern,
    sender_allowed,
)
from relaygate.storage.secrets import CREDENTIAL_KEY, get_or_create_secret

__all__ = [
    "LIMIT_KEYS",
    "MAX_LIMIT",
    "SECRET_PREFIX",
    "Credential",
    "CredentialError",
    "CredentialStore",
    "account_limits",
    "all_account_limits",
    "decode_limits",
    "looks_like_credential",
    "normalize_limits",
    "sender_pattern_covered",
    "update_account_limits",
]

SECRET_PREFIX = "rgc_"
SECRET_BYTES = 32
_SECRET_RE = re.compile(r"rgc_[A-Za-z0-9_-]{43}")  # 43 = len(base64url(32 bytes)), unpadded
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Sending-limit overrides, stored as a JSON object in accounts.limits and
# credentials.limits: a key that is absent means "the server's default",
# 0 means unlimited. relaygate.quotas reads them.
LIMIT_KEYS = (
    "messages_per_hour",
    "messages_per_day",
    "recipients_per_day",
    "new_recipients_per_day",
)
MAX_LIMIT = 1_000_000_000


class CredentialError(Exception):
    """A problem with a credential request, worded for the admin who made it."""


def looks_like_credential(password: str) -> bool:
    """True when ``password`` has the shape of an app-credential secret."""
    return _SECRET_RE.fullmatch(password) is not None


def new_secret() -> str:
    raw = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=")
    return SECRET_PREFIX + raw.decode("ascii")


def sender_pattern_covered(pattern: str, account_patterns: Iterable[str]) -> bool:
    """May an account with ``account_patterns`` hand ``pattern`` to a credential?

    ``x@d`` is covered by the account pattern ``x@d`` or ``@d``; ``@d`` only
    by ``@d``. Case is ignored, as in sender binding.
    """
    if pattern.startswith("@"):
        return pattern.lower() in {p.lower() for p in account_patterns}
    return sender_allowed(account_patterns, pattern)


# ----------------------------------------------------------------- the record


@dataclass(frozen=True)
class Credential:
    id: int
    account_id: int
    account_address: str
    name: str
    senders: tuple[str, ...] | None  # None: the account's patterns
    networks: tuple[str, ...] | None  # normalised CIDRs; None: any network
    limits: dict[str, int] | None  # sending-limit overrides; None: none
    expires_at: float | None  # unix time; None: never
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    def is_active(self, now: float) -> bool:
        """Neither revoked nor expired at ``now`` (expiry is exclusive)."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def status(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired`` (revoked wins over expired)."""
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.is_active(now) else "expired"

    def allows_network(self, client_ip: str) -> bool:
        """May a client at ``client_ip`` log in with this credential?

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack
        socket reports for an IPv4 client) counts as the IPv4 address. An
        unparseable address is refused unless any network is allowed.
        """
        if self.networks is None:
            return True
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._parsed_networks)

    def effective_senders(self, account_senders: Iterable[str]) -> tuple[str, ...]:
        """The sender patterns a login with this credential may use.

        The credential's own patterns, but only those the account's current
        patterns still cover: if the account was narrowed after the credential
        was made, the credential narrows with it (possibly to nothing).
        """
        account = tuple(account_senders)
        if self.senders is None:
            return account
        return tuple(p for p in self.senders if sender_pattern_covered(p, account))

    @cached_property
    def _parsed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        parsed = []
        for text in self.networks or ():
            try:
                parsed.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                continue  # a damaged entry allows nothing
        return tuple(parsed)


# ------------------------------------------------------------------ validation


def normalize_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise CredentialError(
            f"invalid credential name: {name!r}: use 1-64 letters, digits, dots,"
            " hyphens or underscores"
        )
    return name


def credential_senders(senders: Sequence[str], account: Account) -> list[str]:
    if isinstance(senders, str):
        raise TypeError("senders must be a sequence of patterns, not one string")
    unique: dict[str, str] = {}
    for text in senders:
        try:
            pattern = normalize_sender_pattern(text)
        except AccountError as exc:
            raise CredentialError(str(exc)) from None
        if not sender_pattern_covered(pattern, account.senders):
            raise CredentialError(
                f"sender pattern {pattern!r} is not allowed for {account.address}"
                f" (it may send as: {', '.join(account.senders) or 'nothing'});"
                " a credential can only narrow its account's senders"
            )
        unique.setdefault(pattern.lower(), pattern)
    if not unique:
        raise CredentialError(
            "give at least one sender pattern, or none at all to use the account's"
        )
    return sorted(unique.values())


def _normalize_network(text: str) -> str:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise CredentialError(
            f"invalid network: {text!r}: use an address or CIDR such as 192.0.2.0/24"
            " or 2001:db8::/32"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            # Clients are matched as IPv4 (see allows_network), so store IPv4.
            return str(ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}"))
    return str(network)


def new_credential_input(
    name: str, expires_at: float | None, networks: Sequence[str] | None, now: float
) -> tuple[str, list[str] | None]:
    """A new credential's name and networks, normalised, once its expiry is checked
    (every backend's ``add``); CredentialError says what is wrong."""
    if expires_at is not None:
        if not math.isfinite(expires_at):
            raise CredentialError("the expiry time must be a finite unix time")
        if expires_at <= now:
            raise CredentialError("the expiry time is in the past")
    return normalize_name(name), None if networks is None else normalize_networks(networks)


def normalize_networks(networks: Sequence[str]) -> list[str]:
    if isinstance(networks, str):
        raise TypeError("networks must be a sequence of CIDRs, not one string")
    unique = list(dict.fromkeys(_normalize_network(text) for text in networks))
    if not unique:
        raise CredentialError("give at least one network, or none at all to allow any")
    return unique


def normalize_limits(limits: Mapping[str, int]) -> dict[str, int]:
    """Check sending-limit overrides: known keys, whole numbers 0..MAX_LIMIT."""
    checked: dict[str, int] = {}
    for key, value in limits.items():
        if key not in LIMIT_KEYS:
            raise CredentialError(f"unknown limit: {key!r} (known: {', '.join(LIMIT_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
            raise CredentialError(
                f"limit {key} must be a whole number from 0 (unlimited) to {MAX_LIMIT}"
                f" (got {value!r})"
            )
        checked[key] = value
    return {key: checked[key] for key in LIMIT_KEYS if key in checked}


def decode_limits(text: str | None) -> dict[str, int] | None:
    """Read a limits column; None when there are no (usable) overrides."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    limits = {
        key: value[key]
        for key in LIMIT_KEYS
        if isinstance(value.get(key), int)
        and not isinstance(value.get(key), bool)
        and value[key] >= 0
    }
    return limits or None


def merge_limits(
    current: dict[str, int] | None, changes: Mapping[str, int], clear: bool
) -> dict[str, int] | None:
    merged = {} if clear else dict(current or {})
    merged.update(normalize_limits(changes))
    return normalize_limits(merged) or None


def encode_limits(limits: dict[str, int] | None) -> str | None:
    return json.dumps(limits, separators=(",", ":")) if limits else None


def _decode_list(text: str | None) -> tuple[str, ...] | None:
    """A JSON list column; NULL means "not narrowed" (None).

    Anything unreadable becomes the empty tuple, which allows nothing: a
    damaged row must not widen what a credential may do.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return ()
    return tuple(value)


# ----------------------------------------------------------------------- store

_COLUMNS = """
    c.id, c.account_id, a.address, c.name, c.senders, c.networks, c.limits,
    c.expires_at, c.created_at, c.last_used_at, c.revoked_at
"""
_FROM = " FROM credentials AS c JOIN accounts AS a ON a.id = c.account_id"
_SELECT = "SELECT" + _COLUMNS + _FROM
# The AUTH path: one look-up on the UNIQUE (so indexed) secret_hash column.
_FIND = "SELECT c.secret_hash," + _COLUMNS + _FROM + " WHERE c.secret_hash = ?"


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so read-then-write cannot
    # interleave with another admin's change or fail half-way as "locked".
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    # Sessions logged in before this change re-check their login (changes.py).
    announce_for(db)


def credential_from_row(row: Sequence[Any]) -> Credential:
    (
        id_,
        account_id,
        address,
        name,
        senders,
        networks,
        limits,
        expires_at,
        created_at,
        last_used_at,
        revoked_at,
    ) = row[:11]
    return Credential(
        id=id_,
        account_id=account_id,
        account_address=address,
        name=name,
        senders=_decode_list(senders),
        networks=_decode_list(networks),
        limits=decode_limits(limits),
        expires_at=expires_at,
        created_at=created_at,
        last_used_at=last_used_at,
        revoked_at=revoked_at,
    )


class CredentialStore:
    """App credentials in the relaygate database (see storage.sqlite).

    Synchronous like AccountStore; each write is one ``BEGIN IMMEDIATE``
    transaction. The HMAC key is read (or created) once, when the store is
    made, and is the same for every process on the same database.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._key = get_or_create_secret(db, CREDENTIAL_KEY)

    def _hash(self, secret: str) -> bytes:
        return hmac.new(self._key, secret.encode(), hashlib.sha256).digest()

    def add(
        self,
        address: str,
        name: str,
        *,
        expires_at: float | None,
        senders: Sequence[str] | None,
        networks: Sequence[str] | None,
    ) -> tuple[Credential, str]:
        """Create a credential; returns it and its secret, which is never shown again."""
        name, network_list = new_credential_input(name, expires_at, networks, now := time.time())
        secret = new_secret()
        with self._transaction():
            account = self._account(address)
            sender_list = None if senders is None else credential_senders(senders, account)
            self._check_name_free(account, name)
            cursor = self._db.execute(
                "INSERT INTO credentials (account_id, name, secret_hash, senders, networks,"
                " expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    account.id,
                    name,
                    self._hash(secret),
                    None if sender_list is None else json.dumps(sender_list),
                    None if network_list is None else json.dumps(network_list),
                    expires_at,
                    now,
                ),
            )
            credential_id = cursor.lastrowid
            assert credential_id is not None  # always set after an INSERT
        credential = Credential(
            id=credential_id,
            account_id=account.id,
            account_address=account.address,
            name=name,
            senders=None if sender_list is None else tuple(sender_list),
            networks=None if network_list is None else tuple(network_list),
            limits=None,
            expires_at=expires_at,
            created_at=now,
            last_used_at=None,
            revoked_at=None,
        )
        return credential, secret

    def list(self, address: str) -> list[Credential]:
        """The account's credentials, revoked and expired ones too, by name."""
        account = self._account(address)
        rows = self._db.execute(
            _SELECT + " WHERE c.account_id = ? ORDER BY c.name COLLATE NOCASE, c.id",
            (account.id,),
        ).fetchall()
        return [credential_from_row(row) for row in rows]

    def get(self, address: str, name: str) -> Credential:
        """One credential by account and name (any case); raises when missing."""
        account = self._account(address)
        return self._named(account, name)

    def revoke(self, address: str, name: str) -> Credential:
        """Refuse further logins with the credential; the row stays for the record."""
        with self._transaction():
            credential = self._named(self._account(address), name)
            if credential.revoked_at is not None:
                raise CredentialError(
                    f"credential {credential.name!r} of {credential.account_address}"
                    " is already revoked"
                )
            row = self._db.execute(
                "UPDATE credentials SET revoked_at = ? WHERE id = ? RETURNING revoked_at",
                (time.time(), credential.id),
            ).fetchone()
        return replace(credential, revoked_at=float(row[0]))

    def update_limits(
        self, address: str, name: str, changes: Mapping[str, int], *, clear: bool = False
    ) -> Credential:
        """Set the given limit overrides (others kept, or all dropped with ``clear``)."""
        with self._transaction():
            credential = self._named(self._account(address), name)
            limits = merge_limits(credential.limits, changes, clear)
            self._db.execute(
                "UPDATE credentials SET limits = ? WHERE id = ?",
                (encode_limits(limits), credential.id),
            )
        return replace(credential, limits=limits)

    def find(self, secret: str) -> Credential | None:
        """The credential with this secret, revoked or expired ones included, or None."""
        if not looks_like_credential(secret):
            return None
        wanted = self._hash(secret)
        row = self._db.execute(_FIND, (wanted,)).fetchone()
        if row is None or not hmac.compare_digest(bytes(row[0]), wanted):
            return None
        return credential_from_row(row[1:])

    def by_id(self, credential_id: int) -> Credential | None:
        """The credential with this id (revoked or expired too), or None if deleted."""
        row = self._db.execute(_SELECT + " WHERE c.id = ?", (credential_id,)).fetchone()
        return credential_from_row(row) if row is not None else None

    def touch(self, credential_id: int, now: float) -> None:
        """Record a use; an older ``now`` than the stored one changes nothing."""
        self._db.execute(
            "UPDATE credentials SET last_used_at = ?"
            " WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
            (now, credential_id, now),
        )

    # ------------------------------------------------------------- internals

    def _transaction(self) -> AbstractContextManager[None]:
        return _transaction(self._db)

    def _account(self, address: str) -> Account:
        account = AccountStore(self._db).get(address)  # None for a malformed address too
        if account is None:
            raise CredentialError(f"no such account: {address}")
        return account

    def _named(self, account: Account, name: str) -> Credential:
        row = self._db.execute(
            _SELECT + " WHERE c.account_id = ? AND c.name = ? COLLATE NOCASE",
            (account.id, name),
        ).fetchone()
        if row is None:
            raise CredentialError(f"no such credential: {name!r} of {account.address}")
        return credential_from_row(row)

    def _check_name_free(self, account: Account, name: str) -> None:
        row = self._db.execute(
            "SELECT name, revoked_at FROM credentials WHERE account_id = ? AND name = ?"
            " COLLATE NOCASE",
            (account.id, name),
        ).fetchone()
        if row is not None:
            note = " (revoked credentials keep their name)" if row[1] is not None else ""
            raise CredentialError(
                f"credential {row[0]!r} already exists for {account.address}{note}"
            )


# ------------------------------------------------------- account limit overrides
# accounts.limits has the same JSON shape as credentials.limits. These belong
# with AccountStore; they live here until it grows the column.


def account_limits(db: sqlite3.Connection, address: str) -> dict[str, int] | None:
    """The account's sending-limit overrides, or None when it has none."""
    row = db.execute("SELECT limits FROM accounts WHERE address = ?", (_existing(address),))
    found = row.fetchone()
    if found is None:
        raise CredentialError(f"no such account: {address}")
    return decode_limits(found[0])


def all_account_limits(db: sqlite3.Connection) -> dict[str, dict[str, int] | None]:
    """Every account's overrides, keyed by lower-cased address."""
    rows = db.execute("SELECT address, limits FROM accounts").fetchall()
    return {str(address).lower(): decode_limits(limits) for address, limits in rows}


def update_account_limits(
    db: sqlite3.Connection, address: str, changes: Mapping[str, int], *, clear: bool = False
) -> dict[str, int] | None:
    """Set the given overrides (others kept, or all dropped with ``clear``)."""
    normalized = _existing(address)
    with _transaction(db):
        row = db.execute("SELECT limits FROM accounts WHERE address = ?", (normalized,)).fetchone()
        if row is None:
            raise CredentialError(f"no such account: {address}")
        limits = merge_limits(decode_limits(row[0]), changes, clear)
        db.execute(
            "UPDATE accounts SET limits = ?, updated_at = ? WHERE address = ?",
            (encode_limits(limits), time.time(), normalized),
        )
    return limits


def _existing(address: str) -> str:
    try:
        return normalize_address(address)
    except AccountError:
        raise CredentialError(f"no such account: {address}") from None
