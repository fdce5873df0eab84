"""What the services need from storage, one typed interface per concern.

Services and edges (CLI, the HTTP API to come) depend on these, never on a
database module: each backend (today SQLite in data_dir; PostgreSQL and Redis
with the scale-out work) implements them, and one contract test suite
(tests/unit/test_storage_contract.py) runs every interface against every
backend. Methods are async: no backend call may block an event loop. The
interfaces do not open or close anything: a backend's resources (a thread and
connection, a pool) belong to whoever made them (storage/sqlite_backend.py).

Interfaces land here as their callers move off raw connections; see
docs/architecture.md for the list still to come.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.sasl import StoredKeys


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One accepted (or bounce) message in the message log."""

    id: str
    created_at: float
    account: str
    credential: str | None  # the app credential's name; None: the password
    client_ip: str
    mail_from: str  # "" for a bounce
    rcpt_to: tuple[str, ...]
    subject: str
    size: int
    status: str  # captured | queued | delivered | failed | ...


# The column order every backend selects a MessageRecord in (record_from_row).
MESSAGE_COLUMNS = (
    "id, created_at, account, credential, client_ip, mail_from, rcpt_to, subject, size, status"
)


def record_from_row(row: Sequence[Any], recipients: Sequence[str]) -> MessageRecord:
    """A MessageRecord from MESSAGE_COLUMNS; ``recipients`` decoded by the backend."""
    id_, created_at, account, credential, client_ip, mail_from, _, subject, size, status = row
    return MessageRecord(
        id=str(id_),
        created_at=float(created_at),
        account=str(account),
        credential=credential,
        client_ip=str(client_ip),
        mail_from=str(mail_from),
        rcpt_to=tuple(str(r) for r in recipients),
        subject=str(subject),
        size=int(size),
        status=str(status),
    )


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One try to hand a message (or one recipient of it) to the next hop."""

    ts: float
    domain: str
    recipient: str | None  # None: the whole transaction
    host: str | None
    reply: str | None
    tls: str | None  # "TLSv1.3 <cipher> verified"; None: clear text
    outcome: str  # delivered | deferred | failed


class MessageLog(Protocol):
    """The read side of accepted mail: what the CLI, API and UI show."""

    async def recent(self, limit: int) -> list[MessageRecord]:
        """The newest ``limit`` messages, newest first."""
        ...

    async def get(self, message_id: str) -> MessageRecord | None: ...

    async def body(self, message_id: str) -> bytes | None:
        """The stored message as delivered onward; None if none is stored.

        Raises storage.bodies.BodyMissing when the record says it exists but it
        cannot be found (a file removed by hand).
        """
        ...

    async def history(self, message_id: str) -> list[DeliveryAttempt]:
        """Delivery attempts, oldest first."""
        ...


class Accounts(Protocol):
    """Accounts and their sender patterns. Writes raise accounts.store.AccountError
    with a message a user can act on (no such account, already exists, bad pattern)
    and tell running servers (the change signal) before they return."""

    async def get(self, address: str) -> Account | None: ...

    async def list(self) -> list[Account]:
        """Every account, ordered by address."""
        ...

    async def count(self) -> int: ...

    async def add(
        self,
        address: str,
        password_hash: str,
        senders: Sequence[str] | None,
        scram: StoredKeys | None,
    ) -> Account: ...

    async def set_password_hash(
        self, address: str, password_hash: str, scram: StoredKeys | None
    ) -> None: ...

    async def set_disabled(self, address: str, disabled: bool) -> None: ...

    async def set_senders(self, address: str, senders: Sequence[str]) -> None: ...

    async def remove(self, address: str) -> None: ...


class Credentials(Protocol):
    """App credentials of accounts, and sending-limit overrides (of accounts and
    of credentials). Errors are accounts.credentials.CredentialError or
    accounts.store.AccountError, worded for users; writes tell running servers."""

    async def add(
        self,
        address: str,
        name: str,
        *,
        expires_at: float | None,
        senders: Sequence[str] | None,
        networks: Sequence[str] | None,
    ) -> tuple[Credential, str]:
        """The new credential and its secret (stored only as a keyed hash)."""
        ...

    async def list(self, address: str) -> list[Credential]: ...

    async def get(self, address: str, name: str) -> Credential: ...

    async def revoke(self, address: str, name: str) -> Credential: ...

    async def update_limits(
        self, address: str, name: str, changes: Mapping[str, int], *, clear: bool
    ) -> Credential: ...

    async def account_limits(self, address: str) -> dict[str, int] | None: ...

    async def all_account_limits(self) -> dict[str, dict[str, int] | None]:
        """Every account's overrides, keyed by lower-cased address."""
        ...

    async def update_account_limits(
        self, address: str, changes: Mapping[str, int], *, clear: bool
    ) -> dict[str, int] | None: ...
