"""Admin use cases, the same for every edge (CLI today, the HTTP API and UI next).

Each takes its storage as typed interfaces (storage/api.py) and returns plain
data; printing and serialising stay in the edges. Messages, accounts, app
credentials and limits, DKIM keys, the delivery queue, HTTP API tokens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from relaygate import mail_parts, stats
from relaygate.accounts.credentials import Credential, looks_like_credential
from relaygate.accounts.passwords import PasswordHasher
from relaygate.accounts.store import (
    Account,
    AccountError,
    normalize_address,
    normalize_sender_pattern,
    normalize_senders,
)
from relaygate.config import Config, PasswordHashConfig, WebhookConfig
from relaygate.delivery.dkim import DKIMKey, KeyType, normalize_domain, txt_record
from relaygate.sasl import StoredKeys, stored_keys_for_password
from relaygate.services import retention
from relaygate.services.held import HeldAdmin
from relaygate.services.webhooks import WebhooksAdmin
from relaygate.stats import HourStats
from relaygate.storage.api import (
    Accounts,
    AdminStorage,
    ApiToken,
    ApiTokens,
    Credentials,
    Deleted,
    DeliveryAttempt,
    DeliveryQueue,
    DKIMKeys,
    HourlyStats,
    MessageLog,
    MessageRecord,
    NodeRecord,
    Nodes,
    QueueEntry,
    QueueSummary,
    Secrets,
    TokenExists,
)
from relaygate.storage.message_query import MessageQuery
from relaygate.storage.node import open_admin_storage
from relaygate.times import rfc3339

T = TypeVar("T")


class NotFound(LookupError):
    """What was asked for does not exist; the text says what."""


@dataclass(frozen=True, slots=True)
class MessageView:
    record: MessageRecord
    body: bytes | None  # None: no body stored
    history: list[DeliveryAttempt]


def encode_cursor(record: MessageRecord) -> str:
    raw = json.dumps([record.created_at, record.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """ValueError for anything that is not a cursor we made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, message_id = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a cursor: {cursor[:40]!r}") from exc
    if not isinstance(created, int | float) or not isinstance(message_id, str):
        raise ValueError(f"not a cursor: {cursor[:40]!r}")
    return float(created), message_id


class MessagesAdmin:
    def __init__(self, log: MessageLog) -> None:
        self._log = log

    async def recent(self, limit: int) -> list[MessageRecord]:
        return await self._log.recent(limit)

    async def search(self, query: MessageQuery) -> tuple[list[MessageRecord], str | None]:
        """A page of the log, newest first, and the cursor of the next page (None:
        this was the last). Paging is by (received time, id), so messages that
        arrive meanwhile neither shift a page nor appear twice."""
        found = await self._log.search(replace(query, limit=query.limit + 1))
        if len(found) <= query.limit:
            return found, None
        page = found[: query.limit]
        return page, encode_cursor(page[-1])

    async def show(self, message_id: str, *, body: bool = True) -> MessageView:
        """The record, body (unless ``body`` is False) and delivery history;
        NotFound if there is no such message.

        Raises storage.bodies.BodyMissing if the body is recorded but gone.
        """
        message_id = normalize_message_id(message_id)
        record = await self._log.get(message_id)
        if record is None:
            raise NotFound(f"no such message: {message_id}")
        stored = await self._log.body(message_id) if body else None
        return MessageView(record, stored, await self._log.history(message_id))

    async def content(
        self, message_id: str, *, need_body: bool = True
    ) -> tuple[MessageView, mail_parts.MessageParts]:
        """The message taken apart (mail_parts). Without a stored body: NotFound
        saying why, or (``need_body`` False) no header fields and no parts."""
        view = await self.show(message_id)
        if view.body is None:
            if need_body:
                raise NotFound(no_body_text(view.record))
            return view, mail_parts.MessageParts()
        return view, await asyncio.to_thread(mail_parts.parts, view.body)

    async def text(self, message_id: str) -> str:
        """The text/plain body decoded, else a plain-text rendering of the HTML
        body, else ""."""
        _, found = await self.content(message_id)
        if found.text is not None:
            return found.text
        return mail_parts.html_text(found.html) if found.html is not None else ""

    async def html(self, message_id: str) -> str:
        """The text/html body decoded; NotFound if the message has none."""
        view, found = await self.content(message_id)
        if found.html is None:
            raise NotFound(f"message {view.record.id} has no HTML part")
        return found.html

    async def part(self, message_id: str, index: int) -> tuple[mail_parts.Attachment, bytes]:
        """Part ``index`` as numbered by mail_parts (the API's /parts/N), decoded."""
        view = await self.show(message_id)
        if view.body is None:
            raise NotFound(no_body_text(view.record))
        found, contents = await asyncio.to_thread(mail_parts.scan, view.body)  # one parse
        for attachment in found.attachments:
            if attachment.index == index:
                return attachment, contents[index]
        numbers = ", ".join(str(a.index) for a in found.attachments) or "none"
        raise NotFound(f"message {view.record.id} has no part {index} (its parts: {numbers})")

    async def delete(self, message_ids: Sequence[str]) -> Deleted:
        """Remove messages with their bodies, queue rows and history; ids that
        are unknown, or being sent right now, are reported back, not removed."""
        return await self._log.delete([normalize_message_id(i) for i in message_ids])

    async def prune(self, older_than: float, now: float) -> int:
        """Remove every message received more than ``older_than`` seconds ago
        that nothing still waits to deliver, a batch at a time; how many."""
        before = now - older_than
        return await retention.in_batches(
            lambda: self._log.prune(before, PRUNE_BATCH),
            PRUNE_BATCH,
            PRUNE_PAUSE,
            MAX_PRUNE_BATCHES,
        )


PRUNE_BATCH = 500  # rows per transaction
PRUNE_PAUSE = 0.05  # seconds between batches: a running server's writers get the lock
MAX_PRUNE_BATCHES = 100_000  # a bound on the loop (50 million messages)


def normalize_message_id(message_id: str) -> str:
    """Queue ids are upper-case Crockford base32; people type them in any case."""
    return message_id.strip().upper()


def no_body_text(record: MessageRecord) -> str:
    """Why a message has no body to show, in words."""
    if record.body_removed_at is not None:
        when = rfc3339(record.body_removed_at)
        return f"message {record.id}: its body was removed by retention at {when}"
    return f"message {record.id} has no stored body"


class AccountsAdmin:
    """Accounts: the rules every edge shares (address and pattern syntax, a
    password is stored as argon2id plus SCRAM keys, never in the shape of an
    app credential). Errors are accounts.store.AccountError, worded for users."""

    def __init__(self, accounts: Accounts, hashing: PasswordHashConfig) -> None:
        self._accounts = accounts
        self._hasher = PasswordHasher(hashing)

    async def check_new(self, address: str, senders: Sequence[str] | None) -> str:
        """The normalised address if ``add`` would take it (cheap: no hashing), so
        an edge can ask before it reads a password."""
        address = _valid_new(address, senders)
        if await self._accounts.get(address) is not None:
            raise AccountError(f"account already exists: {address}")
        return address

    async def add(self, address: str, password: str, senders: Sequence[str] | None) -> Account:
        # Syntax before the slow hash; a duplicate is refused by the store itself.
        address = _valid_new(address, senders)
        password_hash, scram = await self._secrets(password)
        return await self._accounts.add(address, password_hash, senders, scram)

    async def change(
        self,
        address: str,
        *,
        senders: Sequence[str] | None = None,
        disabled: bool | None = None,
        admin: bool | None = None,
        password: str | None = None,
    ) -> tuple[Account, list[str]]:
        """Several changes at once (the API's PATCH): every value is checked, and the
        password hashed, before the first is stored, so a refused value leaves the
        account as it was instead of half changed. The account and what changed."""
        account = await self.get(address)
        if senders is not None:
            normalize_senders(senders)  # raises AccountError, worded for users
        secrets_ = None if password is None else await self._secrets(password)
        changed: list[str] = []
        if senders is not None:
            await self._accounts.set_senders(account.address, senders)
            changed.append("senders")
        if disabled is not None:
            await self._accounts.set_disabled(account.address, disabled)
            changed.append("disabled")
        if admin is not None:
            await self._accounts.set_admin(account.address, admin)
            changed.append("admin")
        if secrets_ is not None:
            await self._accounts.set_password_hash(account.address, *secrets_)
            changed.append("password")
        return await self.get(account.address), changed

    async def set_password(self, address: str, password: str) -> Account:
        account = await self.get(address)
        password_hash, scram = await self._secrets(password)
        await self._accounts.set_password_hash(account.address, password_hash, scram)
        return account

    async def get(self, address: str) -> Account:
        account = await self._accounts.get(address)
        if account is None:
            raise AccountError(f"no such account: {address}")
        return account

    async def list(self) -> list[Account]:
        return await self._accounts.list()

    async def count(self) -> int:
        return await self._accounts.count()

    async def set_disabled(self, address: str, disabled: bool) -> None:
        await self._accounts.set_disabled(address, disabled)

    async def set_admin(self, address: str, admin: bool) -> Account:
        await self._accounts.set_admin(address, admin)
        return await self.get(address)

    async def set_senders(self, address: str, senders: Sequence[str]) -> Account:
        await self._accounts.set_senders(address, senders)
        return await self.get(address)

    async def remove(self, address: str) -> None:
        await self._accounts.remove(address)

    async def _secrets(self, password: str) -> tuple[str, StoredKeys]:
        if not password:
            raise AccountError("the password is empty")
        if looks_like_credential(password):
            # The server tells credentials from passwords by their shape alone.
            raise AccountError(
                "that password has the shape of an app credential (rgc_ and 43 characters);"
                " choose another"
            )

        def derive() -> tuple[str, StoredKeys]:  # argon2id and PBKDF2: off the event loop
            return self._hasher.hash(password), stored_keys_for_password(password)

        return await asyncio.to_thread(derive)


def _valid_new(address: str, senders: Sequence[str] | None) -> str:
    for pattern in senders or ():
        normalize_sender_pattern(pattern)
    return normalize_address(address)


class CredentialsAdmin:
    """App credentials and sending-limit overrides, for every edge."""

    def __init__(self, accounts: Accounts, credentials: Credentials) -> None:
        self._accounts = accounts
        self._credentials = credentials

    async def add(
        self,
        address: str,
        name: str,
        *,
        expires_at: float | None = None,
        senders: Sequence[str] | None = None,
        networks: Sequence[str] | None = None,
    ) -> tuple[Credential, str]:
        """The credential and its secret: show the secret once, it is not kept."""
        return await self._credentials.add(
            address, name, expires_at=expires_at, senders=senders, networks=networks
        )

    async def list(self, address: str) -> list[Credential]:
        return await self._credentials.list(address)

    async def revoke(self, address: str, name: str) -> Credential:
        return await self._credentials.revoke(address, name)

    async def limits(
        self, address: str, name: str, changes: Mapping[str, int], *, clear: bool = False
    ) -> Credential:
        """The credential after setting ``changes`` (none: just read it)."""
        if changes or clear:
            return await self._credentials.update_limits(address, name, changes, clear=clear)
        return await self._credentials.get(address, name)

    async def account_limits(
        self, address: str, changes: Mapping[str, int], *, clear: bool = False
    ) -> tuple[Account, dict[str, int] | None]:
        """The account and its overrides after setting ``changes`` (none: just read)."""
        account = await self._accounts.get(address)
        if account is None:
            raise AccountError(f"no such account: {address}")
        if changes or clear:
            limits = await self._credentials.update_account_limits(
                account.address, changes, clear=clear
            )
        else:
            limits = await self._credentials.account_limits(account.address)
        return account, limits

    async def all_account_limits(self) -> dict[str, dict[str, int] | None]:
        return await self._credentials.all_account_limits()


@dataclass(frozen=True, slots=True)
class StoredKey:
    key: DKIMKey
    where: str  # a file's path, or where in the database
    record: str  # the DNS TXT record to publish


class DKIMAdmin:
    """DKIM signing keys: made once, listed, their DNS records shown again.
    Errors are delivery.dkim.DKIMError (bad domain or selector, a selector taken)."""

    def __init__(self, keys: DKIMKeys) -> None:
        self._keys = keys

    def _stored(self, key: DKIMKey) -> StoredKey:
        return StoredKey(key, self._keys.where(key), txt_record(key))

    async def generate(self, domain: str, selector: str | None, algorithm: KeyType) -> StoredKey:
        return self._stored(await self._keys.generate(domain, selector, algorithm))

    async def all(self) -> list[StoredKey]:
        """Every key, by domain."""
        return [self._stored(k) for found in (await self._keys.load()).values() for k in found]

    async def show(self, domain: str) -> list[StoredKey]:
        """The domain's keys; NotFound if it has none."""
        domain = normalize_domain(domain)
        found = (await self._keys.load()).get(domain)
        if not found:
            raise NotFound(
                f"no DKIM key for {domain}; create one with: relaygate dkim generate {domain}"
            )
        return [self._stored(k) for k in found]


class QueueAdmin:
    """Messages waiting for onward delivery: list, retry now, stop (no bounce)."""

    def __init__(self, queue: DeliveryQueue) -> None:
        self._queue = queue

    async def entries(self) -> list[QueueEntry]:
        return await self._queue.entries()

    async def summary(self) -> QueueSummary:
        """Counts by state and the oldest row's arrival (for /metrics)."""
        return await self._queue.summary()

    async def pending(self, message_id: str) -> list[QueueEntry]:
        message_id = normalize_message_id(message_id)
        return [e for e in await self._queue.entries() if e.id == message_id]

    async def retry(self, message_id: str | None) -> int:
        """Make queued rows (of one message, or all) due now; NotFound for a
        message with nothing queued."""
        if message_id is not None:
            message_id = normalize_message_id(message_id)
        count = await self._queue.retry_now(message_id, time.time())
        if count == 0 and message_id is not None:
            if any(e.status == "held" for e in await self.pending(message_id)):
                raise NotFound(f"{message_id} is held: relaygate held release ACCOUNT sends it")
            raise NotFound(f"nothing queued for {message_id}")
        return count

    async def delete(self, message_id: str) -> int:
        message_id = normalize_message_id(message_id)
        count = await self._queue.delete(message_id, time.time())
        if count == 0:
            raise NotFound(f"nothing queued for {message_id}")
        return count


TOKEN_PREFIX = "rgt_"  # tells a token apart in a config file or a leaked log
TOKEN_KEY = "api_token_key"  # the server secret tokens are keyed-hashed with
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TokenError(ValueError):
    """A token name or request the user can fix (one line)."""


class TokensAdmin:
    """Bearer tokens for the HTTP API: the secret is shown once and kept only as
    an HMAC keyed with a server secret, so a copy of the table opens nothing."""

    def __init__(self, tokens: ApiTokens, secrets_store: Secrets) -> None:
        self._tokens = tokens
        self._secrets = secrets_store

    async def _digest(self, token: str) -> bytes:
        key = await self._secrets.get_or_create(TOKEN_KEY)
        return hmac.new(key, token.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    async def add(self, name: str, *, read_only: bool) -> tuple[ApiToken, str]:
        if not _TOKEN_NAME.fullmatch(name):
            raise TokenError(
                f"invalid token name: {name!r}: use 1-64 letters, digits, dots, hyphens"
                " or underscores"
            )
        raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
        token = TOKEN_PREFIX + raw
        try:
            stored = await self._tokens.add(name, await self._digest(token), read_only, time.time())
        except TokenExists:
            raise TokenError(f"a token named {name!r} exists already") from None
        return stored, token

    async def list(self) -> list[ApiToken]:
        return await self._tokens.list()

    async def revoke(self, name: str) -> None:
        if not await self._tokens.revoke(name):
            raise NotFound(f"no token named {name!r}")

    async def verify(self, token: str) -> ApiToken | None:
        """The token this secret is, or None. The look-up is by keyed hash (an
        index probe): nothing is compared byte by byte against a stored secret."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        return await self._tokens.find(await self._digest(token), time.time())


class StatsAdmin:
    """The hourly stats (stats.py) for the API, the dashboard and ``relaygate stats``."""

    def __init__(self, store: HourlyStats) -> None:
        self._store = store

    async def hourly(self, hours: int) -> list[HourStats]:
        """The last ``hours`` hours, oldest first; ValueError outside 1..MAX_HOURS."""
        return await stats.report(self._store, hours, time.time())


class NodesAdmin:
    """The nodes sharing a PostgreSQL database (``relaygate nodes``); none on SQLite."""

    def __init__(self, nodes: Nodes | None) -> None:
        self._nodes = nodes

    @property
    def shared(self) -> bool:
        return self._nodes is not None

    async def list(self) -> list[NodeRecord]:
        return [] if self._nodes is None else await self._nodes.list(time.time())


@dataclass
class AdminServices:
    """Every admin use case on one storage: what the CLI, the HTTP API and the
    web UI each hold, so they cannot disagree."""

    messages: MessagesAdmin
    accounts: AccountsAdmin
    credentials: CredentialsAdmin
    dkim: DKIMAdmin
    queue: QueueAdmin
    tokens: TokensAdmin
    stats: StatsAdmin
    nodes: NodesAdmin
    webhooks: WebhooksAdmin
    held: HeldAdmin


def admin_services(
    store: AdminStorage,
    hashing: PasswordHashConfig,
    webhooks: Sequence[WebhookConfig] = (),
    allow_private_targets: bool = False,
) -> AdminServices:
    webhooks_admin = WebhooksAdmin(store.webhooks, webhooks, allow_private_targets)
    return AdminServices(
        MessagesAdmin(store.messages),
        AccountsAdmin(store.accounts, hashing),
        CredentialsAdmin(store.accounts, store.credentials),
        DKIMAdmin(store.dkim_keys),
        QueueAdmin(store.queue),
        TokensAdmin(store.tokens, store.secrets),
        StatsAdmin(store.stats),
        NodesAdmin(getattr(store, "nodes", None)),
        webhooks_admin,
        HeldAdmin(store.defence, store.accounts, webhooks_admin.announce),
    )


def run_admin(config: Config, work: Callable[[AdminServices], Awaitable[T]]) -> T:
    """Run one admin use case from a command line: open the storage ``config``
    names, hand ``work`` the services, close what was opened."""

    async def run() -> T:
        store = await open_admin_storage(config)
        try:
            # The config's [[webhooks]] too: `held release` announces account.released.
            return await work(admin_services(store, config.password_hash, config.webhooks))
        finally:
            await store.close()

    return asyncio.run(run())
