"""What one serving process needs from storage, opened from the config.

A worker (and, for its part, the delivery process and the CLI) asks for its
storage here and gets the interfaces of storage/api.py, whatever the backend:

- ``[storage] url`` absent: the embedded SQLite database in data_dir. The
  accounts, credentials and counters share the worker's service thread (one
  hop per look-up, never on the event loop); acceptance is the spool's
  group-commit writer thread.
- ``[storage] url`` set: PostgreSQL through one pool per process; acceptance
  is the group-commit writer on that pool.

Failed-login windows stay on the node (data_dir/throttle.db) unless
``[shared] redis_url`` makes them cluster-wide.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio

from relaygate.accepted import SpooledMessage
from relaygate.accounts import changes
from relaygate.config import Config
from relaygate.delivery.dkim import key_directory
from relaygate.spool import Spool
from relaygate.storage import sqlite as sqlite_storage
from relaygate.storage.api import (
    Acceptance,
    Accounts,
    Credentials,
    Defence,
    DeliveryQueue,
    DKIMKeys,
    HourlyStats,
    LoginFailures,
    PolicyCache,
    Secrets,
    SendingCounters,
    Webhooks,
)
from relaygate.storage.dkim_files import FileDKIMKeys
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.postgres.nodes import PostgresNodes
from relaygate.storage.postgres.webhooks import PostgresWebhooks
from relaygate.storage.redis import changes as redis_changes
from relaygate.storage.redis.client import open_client
from relaygate.storage.redis.fallback import FallbackLoginFailures, SharedHealth
from relaygate.storage.redis.login_failures import RedisLoginFailures
from relaygate.storage.secrets import SQLiteSecrets
from relaygate.storage.sqlite import ServiceConnections
from relaygate.storage.sqlite_accounts import SQLiteAccounts, same
from relaygate.storage.sqlite_backend import SQLiteStorage
from relaygate.storage.sqlite_counters import SQLiteSendingCounters
from relaygate.storage.sqlite_credentials import SQLiteCredentials
from relaygate.storage.sqlite_defence import SQLiteDefence
from relaygate.storage.sqlite_queue import SQLiteDeliveryQueue, SQLitePolicyCache
from relaygate.storage.sqlite_stats import SQLiteHourlyStats
from relaygate.storage.sqlite_throttle import SQLiteLoginFailures
from relaygate.storage.sqlite_webhooks import SQLiteWebhooks
from relaygate.storage.thread import DatabaseThread


class SpoolAcceptance:
    """The SQLite spool as storage.api.Acceptance (its writer is a thread)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def store(self, message: SpooledMessage) -> asyncio.Future[None]:
        return self.spool.store(message)

    async def close(self) -> None:
        await asyncio.to_thread(self.spool.close)


def announcer(config: Config) -> Callable[[], Awaitable[None]]:
    """Tell every worker that accounts or credentials changed: this machine's
    through the change signal, the other nodes' through Redis when shared."""
    local = local_announcer(config.data_dir)
    url = config.shared.redis_url
    if url is None:
        return local

    async def announce() -> None:
        await local()
        await redis_changes.publish(url, config.node_name)

    return announce


def local_announcer(data_dir: Path) -> Callable[[], Awaitable[None]]:
    """Tell this machine's workers that accounts or credentials changed."""

    async def announce() -> None:
        try:
            changes.announce(changes.signal_path(data_dir))
        except OSError:
            pass  # read-only data_dir: sessions see the change at their next login

    return announce


@dataclass
class NodeStorage:
    accounts: Accounts
    credentials: Credentials
    failures: LoginFailures
    counters: SendingCounters
    acceptance: Acceptance
    secrets: Secrets
    nodes: PostgresNodes | None  # None: one machine, nobody to tell
    stats: HourlyStats
    defence: Defence
    _closers: list[Callable[[], Awaitable[None]]]
    webhooks: Webhooks | None = None  # account and login events (webhooks/notices.py)
    redis: redis.asyncio.Redis | None = None  # [shared] redis_url: the process's client

    async def close(self) -> None:
        """Acceptance first (it commits what it holds), then the rest."""
        await self.acceptance.close()
        for close in self._closers:
            await close()


async def open_node_storage(
    config: Config, loop: asyncio.AbstractEventLoop, *, deliver: bool
) -> NodeStorage:
    """Raises storage.postgres.pool.PostgresUnavailable or sqlite.DatabaseError;
    redis.RedisUnavailable for a ``[shared] redis_url`` that cannot be read."""
    storage = await _open_node_storage(config, loop, deliver=deliver)
    url = config.shared.redis_url
    if url is None:
        return storage
    try:
        client = open_client(url)
    except BaseException:
        await storage.close()
        raise
    # Failed-login windows cluster-wide; this node's own throttle.db when Redis is away.
    storage.failures = FallbackLoginFailures(
        RedisLoginFailures(client, config.auth_throttle),
        storage.failures,
        SharedHealth("login_failures"),
    )
    storage.redis = client
    storage._closers.append(client.aclose)
    return storage


async def _open_node_storage(
    config: Config, loop: asyncio.AbstractEventLoop, *, deliver: bool
) -> NodeStorage:
    if config.storage.url is None:
        # Everything in data_dir: the service thread, which opens its connections
        # (relaygate.db, throttle.db) on first use, off the event loop.
        service: DatabaseThread[ServiceConnections] = DatabaseThread(
            lambda: sqlite_storage.connect_service(config.database_path), loop, name="service-db"
        )

        async def close_service() -> None:
            await asyncio.to_thread(service.close)

        data = _data  # accounts, credentials, counters: the main database
        return NodeStorage(
            accounts=SQLiteAccounts(service, data),
            credentials=SQLiteCredentials(service, data),
            failures=SQLiteLoginFailures(service, config.auth_throttle),
            counters=SQLiteSendingCounters(service, data, config.database_path),
            acceptance=SpoolAcceptance(Spool(config.database_path, loop, deliver=deliver)),
            secrets=SQLiteSecrets(service, data),
            nodes=None,
            stats=SQLiteHourlyStats(service, data),
            defence=SQLiteDefence(service, data),
            _closers=[close_service],
            webhooks=SQLiteWebhooks(service, data),
        )
    # On PostgreSQL only the node's own failed-login windows stay in data_dir
    # (throttle.db) unless [shared] redis_url makes them cluster-wide.
    state: DatabaseThread[sqlite3.Connection] = DatabaseThread(
        lambda: sqlite_storage.connect_state(sqlite_storage.state_path(config.database_path)),
        loop,
        name="state-db",
    )

    async def close_state() -> None:
        await asyncio.to_thread(state.close)

    failures = SQLiteLoginFailures(state, config.auth_throttle, same)
    try:
        shared = await PostgresStorage.open(
            config.storage.url, config.storage.pool_size, announcer(config)
        )
    except BaseException:
        await close_state()
        raise
    return NodeStorage(
        accounts=shared.accounts,
        credentials=shared.credentials,
        failures=failures,
        counters=shared.counters,
        acceptance=shared.acceptance(config.node_name, deliver=deliver),
        secrets=shared.secrets,
        nodes=shared.nodes,
        stats=shared.stats,
        defence=shared.defence,
        _closers=[shared.close, close_state],
        webhooks=shared.webhooks,
    )


def _data(c: ServiceConnections) -> sqlite3.Connection:
    return c.data


@dataclass
class DeliveryStorage:
    """What the delivery process needs: the queue, the MTA-STS cache, the DKIM keys."""

    queue: DeliveryQueue
    policies: PolicyCache
    dkim_keys: DKIMKeys
    stats: HourlyStats
    webhooks: Webhooks
    defence: Defence
    close: Callable[[], Awaitable[None]]


async def open_delivery_storage(config: Config, loop: asyncio.AbstractEventLoop) -> DeliveryStorage:
    """SQLite in data_dir (its own connection, in a thread), or the shared
    PostgreSQL database, where this node claims rows under its node_name.
    Raises storage.postgres.pool.PostgresUnavailable or sqlite.DatabaseError."""
    if config.storage.url is None:
        thread: DatabaseThread[sqlite3.Connection] = DatabaseThread(
            lambda: sqlite_storage.connect(config.database_path), loop, name="delivery-db"
        )

        # The webhook sender's own connection: its reads never wait behind outcomes.
        hooks: DatabaseThread[sqlite3.Connection] = DatabaseThread(
            lambda: sqlite_storage.connect(config.database_path), loop, name="webhooks-db"
        )

        async def close_thread() -> None:
            await asyncio.to_thread(thread.close)
            await asyncio.to_thread(hooks.close)

        return DeliveryStorage(
            queue=SQLiteDeliveryQueue(thread, same, config.database_path),
            policies=SQLitePolicyCache(thread, same),
            dkim_keys=FileDKIMKeys(key_directory(config.data_dir)),
            stats=SQLiteHourlyStats(thread, same),
            webhooks=SQLiteWebhooks(hooks, same),
            defence=SQLiteDefence(hooks, same),
            close=close_thread,
        )
    shared = await PostgresStorage.open(
        config.storage.url, DELIVERY_POOL_SIZE, local_announcer(config.data_dir)
    )
    return DeliveryStorage(
        queue=shared.delivery_queue(config.node_name, config.delivery.lease_seconds),
        policies=shared.policies,
        dkim_keys=shared.dkim_keys,
        stats=shared.stats,
        webhooks=PostgresWebhooks(shared.pool, config.node_name),
        defence=shared.defence,
        close=shared.close,
    )


DELIVERY_POOL_SIZE = 10  # finishes run in parallel, one per outbound connection at most


async def open_admin_storage(
    config: Config, pool_size: int | None = None
) -> SQLiteStorage | PostgresStorage:
    """The storage the admin edges (the CLI, the HTTP API) work on."""
    if config.storage.url is None:
        return SQLiteStorage(config.database_path)
    size = ADMIN_POOL_SIZE if pool_size is None else pool_size
    return await PostgresStorage.open(config.storage.url, size, announcer(config))


async def open_login_failures(
    config: Config, loop: asyncio.AbstractEventLoop
) -> tuple[LoginFailures, Callable[[], Awaitable[None]]]:
    """The failed-login windows, for an edge that logs people in besides SMTP
    (the HTTP process): the same as the workers', so a guesser cannot switch
    doors to get more guesses."""
    state: DatabaseThread[sqlite3.Connection] = DatabaseThread(
        lambda: sqlite_storage.connect_state(sqlite_storage.state_path(config.database_path)),
        loop,
        name="state-db",
    )
    failures: LoginFailures = SQLiteLoginFailures(state, config.auth_throttle, same)
    closers: list[Callable[[], Awaitable[None]]] = [lambda: asyncio.to_thread(state.close)]
    if config.shared.redis_url is not None:
        client = open_client(config.shared.redis_url)
        failures = FallbackLoginFailures(
            RedisLoginFailures(client, config.auth_throttle),
            failures,
            SharedHealth("login_failures"),
        )
        closers.append(client.aclose)

    async def close() -> None:
        for c in closers:
            await c()

    return failures, close


ADMIN_POOL_SIZE = 2  # one command at a time, and a spare
HTTP_POOL_SIZE = 5  # the HTTP process: API calls, pages and scrapes at once
