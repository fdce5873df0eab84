"""The PostgreSQL backend of storage/api.py, as one object over one pool.

A process (a worker, the delivery process, one CLI command) makes one of
these; its interfaces share the pool. ``announce`` is how writes to accounts
and credentials reach running sessions (storage.api.ChangeNotices): the local
change signal, and Redis pub/sub when nodes share one.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.postgres.acceptance import PostgresAcceptance
from relaygate.storage.postgres.accounts import Announce, PostgresAccounts, PostgresSecrets
from relaygate.storage.postgres.counters import PostgresSendingCounters
from relaygate.storage.postgres.credentials import PostgresCredentials
from relaygate.storage.postgres.defence import PostgresDefence
from relaygate.storage.postgres.dkim import PostgresDKIMKeys
from relaygate.storage.postgres.messages import PostgresMessageLog
from relaygate.storage.postgres.nodes import PostgresNodes
from relaygate.storage.postgres.pool import check_schema, open_pool
from relaygate.storage.postgres.queue import PostgresDeliveryQueue, PostgresPolicyCache
from relaygate.storage.postgres.sessions import PostgresUiSessions
from relaygate.storage.postgres.stats import PostgresHourlyStats
from relaygate.storage.postgres.tokens import PostgresApiTokens
from relaygate.storage.postgres.webhooks import PostgresWebhooks
from relaygate.storage.secrets import CREDENTIAL_KEY

DEFAULT_LEASE = 120.0


class PostgresStorage:
    def __init__(
        self, pool: AsyncConnectionPool, announce: Announce, credential_key: bytes
    ) -> None:
        self.pool = pool
        self.messages = PostgresMessageLog(pool)
        self.accounts = PostgresAccounts(pool, announce)
        self.secrets = PostgresSecrets(pool)
        self.credentials = PostgresCredentials(pool, announce, credential_key)
        self.counters = PostgresSendingCounters(pool)
        self.nodes = PostgresNodes(pool)
        self.dkim_keys = PostgresDKIMKeys(pool)
        self.tokens = PostgresApiTokens(pool)
        self.sessions = PostgresUiSessions(pool)
        self.stats = PostgresHourlyStats(pool)
        self.webhooks = PostgresWebhooks(pool)
        self.defence = PostgresDefence(pool)

        self.policies = PostgresPolicyCache(pool)
        # Admin commands list, retry and delete; a delivery process claims with
        # its own node name (delivery_queue).
        self.queue = PostgresDeliveryQueue(pool, "", DEFAULT_LEASE)

    def acceptance(self, node: str, *, deliver: bool) -> PostgresAcceptance:
        return PostgresAcceptance(self.pool, node, deliver=deliver)

    def delivery_queue(self, node: str, lease_seconds: float) -> PostgresDeliveryQueue:
        return PostgresDeliveryQueue(self.pool, node, lease_seconds)

    @classmethod
    async def open(cls, url: str, pool_size: int, announce: Announce) -> PostgresStorage:
        """Raises pool.PostgresUnavailable with one line for the user (also when
        the schema is not this relaygate's: run ``relaygate migrate``)."""
        await check_schema(url)
        pool = await open_pool(url, pool_size)
        try:
            key = await PostgresSecrets(pool).get_or_create(CREDENTIAL_KEY)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, announce, key)

    async def close(self) -> None:
        await self.pool.close()
