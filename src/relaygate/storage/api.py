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

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.defence import Activity, Trigger
from relaygate.delivery.dkim import DKIMKey, KeyType
from relaygate.delivery.queue import Delivery, Outcome
from relaygate.quotas import Scope
from relaygate.sasl import StoredKeys
from relaygate.storage.message_query import MessageQuery
from relaygate.throttle import Reservation, Verdict, Wait
from relaygate.webhooks.events import Endpoint, Event

if TYPE_CHECKING:
    from relaygate.accepted import SpooledMessage


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
    status: str  # captured | queued | held | purged | delivered | failed | ...
    body_removed_at: float | None = None  # when retention removed the stored body


# The column order every backend selects a MessageRecord in (record_from_row).
MESSAGE_COLUMNS = (
    "id, created_at, account, credential, client_ip, mail_from, rcpt_to, subject, size, status,"
    " body_removed_at"
)


def record_from_row(row: Sequence[Any], recipients: Sequence[str]) -> MessageRecord:
    """A MessageRecord from MESSAGE_COLUMNS; ``recipients`` decoded by the backend."""
    id_, created_at, account, credential, client_ip, mail_from, _, subject, size, status, gone = row
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
        body_removed_at=None if gone is None else float(gone),
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


@dataclass(frozen=True, slots=True)
class Deleted:
    """What ``MessageLog.delete`` did with the ids it was given."""

    removed: list[str]  # gone now, with body, queue rows and history
    unknown: list[str]  # no such message
    sending: list[str]  # a delivery attempt holds it right now: left alone


class MessageLog(Protocol):
    """Accepted mail: what the CLI, API and UI show, and its removal (by hand,
    and by retention in small batches, so no write lock is held for long)."""

    async def recent(self, limit: int) -> list[MessageRecord]:
        """The newest ``limit`` messages, newest first."""
        ...

    async def search(self, query: MessageQuery) -> list[MessageRecord]:
        """Newest first, filtered; ``query.before`` pages on from a cursor."""
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

    async def delete(self, message_ids: Sequence[str]) -> Deleted:
        """Remove messages with their bodies, queue rows and delivery history,
        also when still queued (that is what the admin asked); never one a
        delivery attempt is sending right now."""
        ...

    async def count_cutoff(self, keep: int) -> float | None:
        """The receive time of the ``keep``-th newest message: everything older
        is past a ``max_messages`` of ``keep``. None: there are not that many."""
        ...

    async def prune(self, before: float, limit: int) -> int:
        """Remove up to ``limit`` of the oldest messages received before
        ``before`` that nothing still waits to deliver (no queued or sending
        row); how many were removed."""
        ...

    async def prune_bodies(self, before: float, limit: int, now: float) -> int:
        """Remove the stored bodies of up to ``limit`` messages received before
        ``before`` that nothing still waits to deliver, and record ``now`` as
        their body_removed_at; how many."""
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

    async def set_admin(self, address: str, admin: bool) -> None:
        """Whether the account sees and manages everything in the web UI."""
        ...

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

    async def find(self, secret: str) -> Credential | None:
        """The credential with this secret (revoked or expired too), or None: the
        AUTH path, one indexed look-up of the secret's keyed hash."""
        ...

    async def by_id(self, credential_id: int) -> Credential | None: ...

    async def touch(self, credential_id: int, now: float) -> None:
        """Record a use (last_used_at); informational, best effort."""
        ...

    async def account_limits(self, address: str) -> dict[str, int] | None: ...

    async def all_account_limits(self) -> dict[str, dict[str, int] | None]:
        """Every account's overrides, keyed by lower-cased address."""
        ...

    async def update_account_limits(
        self, address: str, changes: Mapping[str, int], *, clear: bool
    ) -> dict[str, int] | None: ...


# ---------------------------------------------------------------- the hot path
#
# Below: what a serving node needs beyond the admin side. Node-local backends
# (SQLite files, an mmap) serve one machine; PostgreSQL and Redis backends let
# several nodes share the same limits and queue (docs/scale-out.md).


class LoginFailures(Protocol):
    """Failed-login windows with reservations; the rules are throttle.py's.

    ``reserve`` checks every rule and counts the attempt as pending in one
    atomic step, so parallel attempts (across workers and, when shared, across
    nodes) never get more secrets checked than the limits allow.
    """

    async def check(self, client_ip: str, username: str, now: float) -> Verdict | None:
        """Read-only: for a login whose secret is already known right (a cache hit)."""
        ...

    async def reserve(
        self, client_ip: str, username: str, now: float
    ) -> Verdict | Reservation | Wait: ...

    async def release(self, reservation: Reservation) -> None:
        """The secret was right: the pending attempt goes."""
        ...

    async def fail(self, reservation: Reservation) -> None:
        """The secret was wrong (or the exchange abandoned): it becomes a failure."""
        ...

    async def record_success(self, client_ip: str, account: str, now: float) -> None:
        """The account logs in from this network (its known-network exemption)."""
        ...

    async def prune(self, now: float) -> None: ...


class ConnectionCounts(Protocol):
    """Per-client-IP concurrent connections and connections per minute."""

    async def open(self, client_ip: str, now: float) -> str | None:
        """None: allowed and counted; else "concurrent" or "rate" (not counted)."""
        ...

    async def close(self, client_ip: str) -> None:
        """An allowed connection ended."""
        ...


class SendingCounters(Protocol):
    """The read side of sending limits (quotas.py); writes come with acceptance."""

    async def check_message(self, scopes: Sequence[Scope], now: float) -> bytes | None:
        """At MAIL: None, or the 451 reply naming the limit reached."""
        ...

    async def check_recipient(
        self,
        scopes: Sequence[Scope],
        account_address: str,
        recipient: str,
        *,
        accepted_so_far: int,
        new_so_far: int,
        now: float,
    ) -> tuple[bytes | None, bool]:
        """At RCPT: (None or a 451, whether the recipient is new for the account)."""
        ...

    async def prune(self, now: float) -> None: ...


class Acceptance(Protocol):
    """Accepting a message as one unit of work: the message, its body, its queue
    rows and the sending counters it adds commit together (or not at all), and
    concurrent sessions' messages share a commit (group commit)."""

    def store(self, message: SpooledMessage) -> asyncio.Future[None]:
        """Completes once durable; fails with spool.SpoolError (reply 451)."""
        ...

    async def close(self) -> None:
        """Commit what is pending, then stop."""
        ...


class DKIMKeys(Protocol):
    """DKIM signing keys: files in data_dir/dkim on one machine, rows on a cluster
    (every node signs with the same keys). Errors are delivery.dkim.DKIMError,
    worded for users; a key is never replaced, nor a selector reused."""

    async def generate(self, domain: str, selector: str | None, algorithm: KeyType) -> DKIMKey:
        """A new key, stored (selector None: the algorithm's default)."""
        ...

    async def load(self) -> dict[str, list[DKIMKey]]:
        """Every key by domain, RSA before Ed25519, then by selector."""
        ...

    def where(self, key: DKIMKey) -> str:
        """Where the key is kept, for people (a file's path)."""
        ...


# ------------------------------------------------------------ delivery


@dataclass(frozen=True, slots=True)
class Notice:
    """A bounce or delay warning, stored in the same transaction as the outcome
    that caused it (a failure is never recorded without its DSN)."""

    account: str  # whose message it is about (the log shows it under them)
    recipient: str  # the original sender
    body: bytes
    warning: bool  # a delay warning: the row is marked warned with it
    # [delivery] bounce_to = "capture": a notice for one of our own accounts stays
    # in the message log ("captured"). False: always queued for delivery.
    keep_local: bool = True


@dataclass(frozen=True, slots=True)
class Takeover:
    """A delivery row put back in the queue because whoever held it is gone."""

    queue_id: str
    node: str | None  # the node whose lease expired; None: this machine's last run


class LeaseLost(Exception):
    """The row is no longer ours (its lease expired and another node took it)."""


class DeliveryQueue(Protocol):
    """The rows to deliver, one per (message, recipient domain).

    A row is claimed (``sending``, with a lease on a shared database), then
    finished with the attempt's outcome or released. On PostgreSQL several
    nodes claim from one queue: ``FOR UPDATE SKIP LOCKED`` keeps their claims
    apart, and rows whose lease expired (a node died mid-delivery) go back to
    the queue at the next ``recover``.
    """

    async def recover(self, now: float) -> list[Takeover]:
        """Rows left ``sending`` by a process or node that is gone, made due again."""
        ...

    async def claim(self, now: float, limit: int) -> list[Delivery]: ...

    async def renew(self, delivery_ids: Sequence[int], now: float) -> None:
        """Rows still being worked on keep their lease."""
        ...

    async def finish(
        self,
        delivery: Delivery,
        outcome: Outcome,
        now: float,
        retry_at: float,
        notice: Notice | None,
    ) -> str | None:
        """Record a settled attempt and its notice in one transaction; the
        notice's queue id. Raises LeaseLost if the row is no longer ours."""
        ...

    async def release(self, delivery_id: int, next_attempt: float, now: float) -> None:
        """Back to the queue unchanged (an outcome that could not be recorded)."""
        ...

    async def body(self, message_id: str, limit: int | None = None) -> bytes | None:
        """The message as stored (at most ``limit`` bytes); raises
        storage.bodies.BodyMissing when its body file is gone."""
        ...

    async def arrival(self, message_id: str) -> float | None: ...

    async def entries(self) -> list[QueueEntry]:
        """Rows still to deliver (queued or being sent), oldest first."""
        ...

    async def summary(self) -> QueueSummary:
        """How many rows wait, by state, and the oldest one's age: one cheap
        query for a metrics scrape (no rows read)."""
        ...

    async def retry_now(self, message_id: str | None, now: float) -> int: ...

    async def delete(self, message_id: str, now: float) -> int:
        """Stop delivering a message (no bounce); how many rows were pending."""
        ...


@dataclass(frozen=True, slots=True)
class QueueEntry:
    id: str  # the message's queue id
    domain: str
    recipients: tuple[str, ...]
    status: str  # queued | sending | held (the defence: waits for `held release`)
    attempts: int
    next_attempt: float
    created_at: float
    last_reply: str | None
    mail_from: str
    node: str | None = None  # on a shared database: who holds its lease


@dataclass(frozen=True, slots=True)
class QueueSummary:
    # queued: never tried; deferred: tried, waiting for a retry; sending: being tried;
    # held: the compromised-account defence holds it (not in ``oldest``)
    counts: dict[str, int]
    oldest: float | None  # created_at of the oldest row still to deliver


@dataclass(frozen=True, slots=True)
class StatRow:
    """One count of the hourly stats (stats.py): ``hour`` is the hour's start
    (seconds since the epoch), ``label`` is "" or, for refused, the reason."""

    hour: int
    name: str
    label: str
    count: int


class HourlyStats(Protocol):
    """Counts per hour (table stats_hourly), added to by every process."""

    async def add(self, rows: Sequence[StatRow]) -> None:
        """Add each row's count to its (hour, name, label), creating it if new."""
        ...

    async def read(self, first: int, end: int) -> list[StatRow]:
        """Rows of the hours from ``first`` to before ``end``."""
        ...

    async def prune(self, before: int) -> None:
        """Forget the hours before ``before``."""
        ...


class PolicyCache(Protocol):
    """Fetched MTA-STS policies (delivery/mta_sts.py), shared by a cluster's nodes."""

    async def get(self, domain: str, now: float) -> tuple[str, str] | None:
        """(policy id, policy text) while unexpired at ``now``."""
        ...

    async def put(
        self, domain: str, policy_id: str, text: str, now: float, expires_at: float
    ) -> None: ...


class Secrets(Protocol):
    """Server secrets (keys for decoys and credential hashes), made on first use."""

    async def get_or_create(self, name: str, size: int = 32) -> bytes: ...


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    started_at: float
    last_seen: float
    pid: int
    version: str
    leases: int  # delivery rows it holds now


class Nodes(Protocol):
    """The nodes sharing the storage (``relaygate nodes``)."""

    async def heartbeat(self, name: str, started_at: float, pid: int, version: str) -> None: ...

    async def list(self, now: float) -> list[NodeRecord]: ...


class ChangeNotices(Protocol):
    """Telling every node that accounts or credentials changed (their sessions
    re-check their login, their caches drop what changed)."""

    async def announce(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A bearer token of the HTTP API (its secret is shown once, kept only keyed-hashed)."""

    name: str
    read_only: bool
    created_at: float
    last_used: float | None


class TokenExists(ValueError):
    """A token of that name exists already."""


class ApiTokens(Protocol):
    async def add(self, name: str, digest: bytes, read_only: bool, now: float) -> ApiToken:
        """Raises TokenExists."""
        ...

    async def list(self) -> list[ApiToken]: ...

    async def revoke(self, name: str) -> bool:
        """False: no token of that name."""
        ...

    async def find(self, digest: bytes, now: float) -> ApiToken | None:
        """The token with this keyed hash, its last use set to ``now``."""
        ...


# ------------------------------------------------------------ webhooks


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One event to POST to one webhook endpoint (webhooks/sender.py)."""

    id: int
    endpoint: str
    event_id: str
    type: str
    body: str
    attempts: int  # tries so far
    created_at: float


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """One POST of an event: what came back, and how long it took."""

    event_id: str
    type: str
    ts: float
    status_code: int | None  # None: no HTTP answer (timeout, refused, SSRF rule)
    error: str | None
    duration: float
    outcome: str  # delivered | retry | failed


class WebhookNotFound(LookupError):
    """No API-made webhook of that id."""


class Webhooks(Protocol):
    """Webhook endpoints made through the API, the outbox and its attempts.

    ``collect`` turns message rows and delivery attempts committed since the
    last call into outbox rows for the endpoints that want them, and moves its
    cursor in the same transaction: a crash re-reads, never skips, and the
    (endpoint, event id) key keeps a re-read from queueing twice. The outbox is
    claimed with leases (SKIP LOCKED on PostgreSQL) like the delivery queue.
    """

    async def add(self, endpoint: Endpoint) -> None: ...

    async def endpoints(self) -> list[Endpoint]: ...

    async def update(
        self, endpoint_id: str, url: str | None, events: tuple[str, ...] | None
    ) -> Endpoint:
        """Raises WebhookNotFound."""
        ...

    async def remove(self, endpoint_id: str) -> bool: ...

    async def collect(self, endpoints: Sequence[Endpoint], now: float, limit: int) -> int:
        """Queue the events that happened since the last call; how many rows queued.
        With no endpoints the cursor just moves to the present."""
        ...

    async def enqueue(self, endpoint_id: str, event: Event, now: float) -> None:
        """Queue one event for one endpoint (webhook.test, account events)."""
        ...

    async def claim(self, now: float, limit: int, lease: float) -> list[OutboxItem]: ...

    async def finish(
        self, item: OutboxItem, attempt: WebhookAttempt, next_attempt: float | None
    ) -> None:
        """Record an attempt; next_attempt None: settled (delivered or given up)."""
        ...

    async def attempts(self, endpoint_id: str, limit: int) -> list[WebhookAttempt]:
        """The newest attempts to one endpoint, newest first."""
        ...

    async def prune(self, before: float, limit: int) -> int:
        """Remove up to ``limit`` settled outbox rows (delivered or given up
        before ``before``) with their attempts; how many rows."""
        ...


# ------------------------------------------------------------ defence


@dataclass(frozen=True, slots=True)
class HeldAccount:
    """An account whose outbound mail is held (relaygate/defence.py)."""

    account: str  # lower case
    since: float | None  # when it was held; None: held mail left without a hold (see list)
    reason: str | None
    detail: str | None
    counts: dict[str, int]
    messages: int  # messages held now


@dataclass(frozen=True, slots=True)
class Sighting:
    """A network (/24, /48) or client name (EHLO) an account logged in with."""

    kind: str  # network | client
    value: str
    first_seen: float
    last_seen: float
    novel: bool  # a network first seen when the account already had others


class Defence(Protocol):
    """Compromised-account defence: baselines, holds, releases (services/defence.py).

    Counts of the hour and the baseline are the account rows of send_counters
    (quotas.py), which acceptance writes anyway; this adds the networks and
    client names an account was seen with and the hold flag. A held account's
    delivery rows are never claimed (DeliveryQueue.claim checks the flag), and
    new delivery rows of a message accepted as ``held`` start out held.
    """

    async def activity(self, account: str, now: float) -> Activity:
        """This hour's counts, the baseline, a recent new network, the flag: one round trip."""
        ...

    async def seen(self, account: str, network: str, client: str, now: float) -> None:
        """A login from ``network`` with EHLO ``client``: remembered (first and last seen)."""
        ...

    async def sightings(self, account: str, limit: int) -> list[Sighting]:
        """The networks and client names the account was seen with, most recent first."""
        ...

    async def hold(self, account: str, trigger: Trigger, now: float) -> int | None:
        """Flag the account and hold its queued mail; how many messages were held,
        None if it was held already (another worker or node was first)."""
        ...

    async def held(self) -> list[HeldAccount]:
        """Accounts held or with held mail, oldest hold first."""
        ...

    async def release(self, account: str, now: float, expected_until: float) -> list[str] | None:
        """Clear the flag and queue the held mail again, exactly once; the released
        message ids (None: nothing held). The baseline is raised until ``expected_until``
        to this hour's volume, so the account is not held again at once."""
        ...

    async def purge(self, account: str, now: float) -> list[str] | None:
        """Clear the flag and drop the held mail (status purged, no bounce);
        the purged message ids (None: nothing held)."""
        ...

    async def expect(self, account: str, until: float, messages: int) -> None:
        """An admin expects a burst: the baseline is at least ``messages`` an hour until then."""
        ...


class AdminStorage(Protocol):
    """What the admin edges (CLI, HTTP API, web UI) work on; both backends are one."""

    @property
    def messages(self) -> MessageLog: ...
    @property
    def accounts(self) -> Accounts: ...
    @property
    def credentials(self) -> Credentials: ...
    @property
    def dkim_keys(self) -> DKIMKeys: ...
    @property
    def queue(self) -> DeliveryQueue: ...
    @property
    def tokens(self) -> ApiTokens: ...
    @property
    def stats(self) -> HourlyStats: ...
    @property
    def secrets(self) -> Secrets: ...
    @property
    def sessions(self) -> UiSessions: ...
    @property
    def webhooks(self) -> Webhooks: ...
    @property
    def defence(self) -> Defence: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class UiSession:
    address: str
    password: bytes  # fingerprint of the password hash the login was made with
    created_at: float
    seen_at: float


class UiSessions(Protocol):
    """Web UI login sessions, found by a keyed hash of the cookie (services/web_login.py)."""

    async def add(self, digest: bytes, address: str, password: bytes, now: float) -> None: ...

    async def find(self, digest: bytes, now: float) -> UiSession | None:
        """The session, its seen_at moved to ``now`` (written at most once a minute)."""
        ...

    async def remove(self, digest: bytes) -> None: ...

    async def prune(self, seen_before: float, created_before: float) -> int:
        """Remove sessions idle since, or opened before, these times; how many went."""
        ...
