"""Accounts in SQLite: address, password hash, disabled flag, sender patterns.

Synchronous on purpose: the CLI uses it directly and the server calls it from
a worker thread. Reads are single queries (``get`` is on the AUTH hot path);
every write runs in its own ``BEGIN IMMEDIATE`` transaction so two admins
editing at once cannot interleave half-done changes.
"""

from __future__ import annotations

import base64
import sqlite3
import string
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relaygate.accounts.changes import announce_for
from relaygate.policy import sender_allowed
from relaygate.sasl.steps import StoredKeys

__all__ = [
    "Account",
    "AccountError",
    "AccountStore",
    "normalize_address",
    "normalize_sender_pattern",
    "sender_allowed",
]


class AccountError(Exception):
    """A problem with an account request, worded for the admin who made it."""


@dataclass(frozen=True)
class Account:
    id: int
    address: str
    password_hash: str
    disabled: bool
    senders: tuple[str, ...]  # patterns: full addresses or "@domain", sorted
    created_at: float  # unix time
    updated_at: float
    scram: StoredKeys | None = None  # SCRAM-SHA-256 keys, set with the password
    limits: str | None = None  # JSON sending-limit overrides (see relaygate.quotas)
    admin: bool = False  # sees and manages everything in the web UI

    def may_send_as(self, address: str) -> bool:
        """Sender binding: may this account use ``address`` as MAIL FROM?"""
        return sender_allowed(self.senders, address)


# ------------------------------------------------------------------ validation

# RFC 5321 dot-string characters; anything else in a local part needs quoting,
# and quoted local parts are too rare (and too easy to get wrong) to accept.
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_MAX_LOCAL = 64  # octets, RFC 5321 4.5.3.1.1
_MAX_ADDRESS = 254  # octets, so that "<address>" fits the 256-octet path limit
_MAX_DOMAIN = 253


def _is_international(char: str) -> bool:
    # SMTPUTF8 (RFC 6531) allows UTF-8 in addresses, but not invisible controls.
    return ord(char) > 127 and char.isprintable()


def _is_domain_char(char: str) -> bool:
    return (char.isascii() and char.isalnum()) or char == "-" or _is_international(char)


def _domain_problem(domain: str) -> str | None:
    """Why ``domain`` is not a usable domain name, or None when it is."""
    if not domain:
        return "the domain is empty"
    if len(domain.encode()) > _MAX_DOMAIN:
        return f"the domain is longer than {_MAX_DOMAIN} bytes"
    for label in domain.split("."):
        if not label:
            return "the domain has an empty label (leading, trailing or double dot)"
        if label.startswith("-") or label.endswith("-"):
            return f"domain label {label!r} starts or ends with a hyphen"
        if not all(_is_domain_char(c) for c in label):
            return f"domain label {label!r} may hold only letters, digits and hyphens"
    return None


def _local_problem(local: str) -> str | None:
    if not local:
        return "the part before @ is empty"
    if len(local.encode()) > _MAX_LOCAL:
        return f"the part before @ is longer than {_MAX_LOCAL} bytes"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "the part before @ has a leading, trailing or double dot"
    for char in local:
        if char != "." and char not in _ATEXT and not _is_international(char):
            return f"the part before @ may not contain {char!r}"
    return None


def _common_problem(text: str) -> str | None:
    if any(c.isspace() for c in text):
        return "it contains a space"
    if any(not c.isprintable() for c in text):
        return "it contains a control character"
    if "<" in text or ">" in text:
        return "give the bare address, without < >"
    return None


def normalize_address(text: str) -> str:
    """Check that ``text`` is a plain ``local@domain`` and lower-case its domain.

    The local part keeps its case for display; look-ups ignore case anyway.
    Raises AccountError saying what is wrong.
    """
    problem = _common_problem(text)
    if problem is None:
        local, at, domain = text.partition("@")
        if not at:
            problem = "it must look like local@domain"
        elif "@" in domain:
            problem = "it contains more than one @"
        else:
            problem = _local_problem(local) or _domain_problem(domain)
            if problem is None and len(text.encode()) > _MAX_ADDRESS:
                problem = f"it is longer than {_MAX_ADDRESS} bytes"
    if problem is not None:
        raise AccountError(f"invalid address: {text!r}: {problem}")
    return f"{local}@{domain.lower()}"


def normalize_sender_pattern(text: str) -> str:
    """Check a sender pattern: a full address, or ``@domain`` for a whole domain."""
    if text.startswith("@"):
        domain = text[1:]
        problem = _common_problem(domain) or _domain_problem(domain)
        if problem is not None:
            raise AccountError(f"invalid sender pattern: {text!r}: {problem}")
        return "@" + domain.lower()
    try:
        return normalize_address(text)
    except AccountError as exc:
        reason = str(exc).split(": ", 2)[-1]
        raise AccountError(
            f"invalid sender pattern: {text!r}: {reason} (use an address or @domain)"
        ) from None


def normalize_senders(senders: Sequence[str]) -> list[str]:
    if isinstance(senders, str):
        # A lone string is a Sequence too; iterating it would store letters.
        raise TypeError("senders must be a sequence of patterns, not one string")
    unique: dict[str, str] = {}
    for text in senders:
        pattern = normalize_sender_pattern(text)
        # The column compares without case, so "A@x" and "a@x" are one pattern.
        unique.setdefault(pattern.lower(), pattern)
    if not unique:
        raise AccountError(
            "at least one sender pattern is required (to block sending, disable the account)"
        )
    return list(unique.values())


# ----------------------------------------------------------------------- store

# One row per account with its patterns folded in; a newline cannot occur in
# a valid pattern, so it is a safe separator.
_SELECT_ACCOUNT = """
    SELECT a.id, a.address, a.password_hash, a.disabled, a.created_at, a.updated_at,
           group_concat(s.pattern, char(10)), a.scram_sha256, a.limits, a.admin
    FROM accounts AS a LEFT JOIN account_senders AS s ON s.account_id = a.id
"""


def account_from_row(row: Sequence[Any]) -> Account:
    """An Account from the _SELECT_ACCOUNT columns (this SQLite store and the
    PostgreSQL backend select the same ones)."""
    (
        id_,
        address,
        password_hash,
        disabled,
        created_at,
        updated_at,
        patterns,
        scram,
        limits,
        admin,
    ) = row
    return Account(
        id=int(id_),
        address=str(address),
        password_hash=str(password_hash),
        disabled=bool(disabled),
        senders=tuple(sorted(str(patterns).split("\n"))) if patterns else (),
        created_at=float(created_at),
        updated_at=float(updated_at),
        scram=decode_scram(scram),
        limits=limits,
        admin=bool(admin),
    )


def encode_scram(keys: StoredKeys) -> str:
    """``iterations:salt:stored_key:server_key``, the binary parts in base64."""
    parts = (keys.salt, keys.stored_key, keys.server_key)
    return ":".join([str(keys.iterations), *(base64.b64encode(p).decode() for p in parts)])


def decode_scram(text: str | None) -> StoredKeys | None:
    if not text:
        return None
    try:
        iterations, salt, stored, server = text.split(":")
        return StoredKeys(
            base64.b64decode(salt),
            base64.b64decode(stored),
            base64.b64decode(server),
            int(iterations),
        )
    except ValueError:
        return None  # unreadable keys: SCRAM fails, PLAIN and LOGIN still work


class AccountStore:
    """Account records in the relaygate database (see storage.sqlite)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, address: str) -> Account | None:
        """The account for ``address`` (any case), or None; never raises for bad input."""
        try:
            address = normalize_address(address)
        except AccountError:
            return None  # cannot be stored, so there is no such account
        row = self._db.execute(
            _SELECT_ACCOUNT + " WHERE a.address = ? GROUP BY a.id", (address,)
        ).fetchone()
        return account_from_row(row) if row is not None else None

    def add(
        self,
        address: str,
        password_hash: str,
        senders: Sequence[str] | None = None,
        scram: StoredKeys | None = None,
    ) -> Account:
        """Create an account; by default it may send only as its own address."""
        address = normalize_address(address)
        patterns = normalize_senders([address] if senders is None else senders)
        now = time.time()
        with self._transaction():
            try:
                cursor = self._db.execute(
                    "INSERT INTO accounts (address, password_hash, disabled, created_at,"
                    " updated_at, scram_sha256) VALUES (?, ?, 0, ?, ?, ?)",
                    (address, password_hash, now, now, encode_scram(scram) if scram else None),
                )
            except sqlite3.IntegrityError:
                raise AccountError(f"account already exists: {address}") from None
            account_id = cursor.lastrowid
            assert account_id is not None  # always set after an INSERT
            self._insert_senders(account_id, patterns)
        return Account(
            id=account_id,
            address=address,
            password_hash=password_hash,
            disabled=False,
            senders=tuple(sorted(patterns)),
            created_at=now,
            updated_at=now,
            scram=scram,
        )

    def set_password_hash(
        self, address: str, password_hash: str, scram: StoredKeys | None = None
    ) -> None:
        """A new password: its argon2 hash and SCRAM keys (None: SCRAM off until set)."""
        self._update(
            address,
            "password_hash = ?, scram_sha256 = ?",
            (password_hash, encode_scram(scram) if scram else None),
        )

    def set_disabled(self, address: str, disabled: bool) -> None:
        self._update(address, "disabled = ?", (int(disabled),))

    def set_admin(self, address: str, admin: bool) -> None:
        self._update(address, "admin = ?", (int(admin),))

    def set_senders(self, address: str, senders: Sequence[str]) -> None:
        """Replace the account's sender patterns."""
        patterns = normalize_senders(senders)
        with self._transaction():
            account_id = self._touch(address)
            self._db.execute("DELETE FROM account_senders WHERE account_id = ?", (account_id,))
            self._insert_senders(account_id, patterns)

    def remove(self, address: str) -> None:
        """Delete the account; its sender patterns go with it (ON DELETE CASCADE)."""
        with self._transaction():
            cursor = self._db.execute(
                "DELETE FROM accounts WHERE address = ?", (self._existing(address),)
            )
            if cursor.rowcount == 0:
                raise AccountError(f"no such account: {address}")

    def list(self) -> list[Account]:
        """Every account, ordered by address."""
        rows = self._db.execute(_SELECT_ACCOUNT + " GROUP BY a.id ORDER BY a.address").fetchall()
        return [account_from_row(row) for row in rows]

    def count(self) -> int:
        (total,) = self._db.execute("SELECT count(*) FROM accounts").fetchone()
        return int(total)

    # ------------------------------------------------------------- internals

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so a read-then-write inside
        # cannot fail half-way with "database is locked".
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        # Sessions logged in before this change re-check their login (changes.py).
        announce_for(self._db)

    @staticmethod
    def _existing(address: str) -> str:
        """Normalize an address that names an existing account."""
        try:
            return normalize_address(address)
        except AccountError:
            # Cannot have been stored, so say what the admin needs to know.
            raise AccountError(f"no such account: {address}") from None

    def _touch(self, address: str, assignment: str = "", values: tuple[object, ...] = ()) -> int:
        """Apply ``assignment`` and bump updated_at; return the account id."""
        columns = f"{assignment}, updated_at = ?" if assignment else "updated_at = ?"
        row = self._db.execute(
            f"UPDATE accounts SET {columns} WHERE address = ? RETURNING id",  # noqa: S608
            (*values, time.time(), self._existing(address)),
        ).fetchone()
        if row is None:
            raise AccountError(f"no such account: {address}")
        return int(row[0])

    def _update(self, address: str, assignment: str, values: tuple[object, ...]) -> None:
        with self._transaction():
            self._touch(address, assignment, values)

    def _insert_senders(self, account_id: int, patterns: Sequence[str]) -> None:
        self._db.executemany(
            "INSERT INTO account_senders (account_id, pattern) VALUES (?, ?)",
            [(account_id, pattern) for pattern in patterns],
        )
