"""The SQLite backend of storage/api.py, as one object: one thread, one connection.

The message log, accounts and credentials share a DatabaseThread (one
connection to relaygate.db, opened at first use, never on the event loop);
``close`` finishes what was asked and closes it. The edges (the CLI, and the
HTTP API to come) make one of these per process or command.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from relaygate.delivery.dkim import key_directory
from relaygate.storage import bodies
from relaygate.storage import sqlite as storage
from relaygate.storage.dkim_files import FileDKIMKeys
from relaygate.storage.secrets import SQLiteSecrets
from relaygate.storage.sqlite_accounts import SQLiteAccounts, same
from relaygate.storage.sqlite_credentials import SQLiteCredentials
from relaygate.storage.sqlite_defence import SQLiteDefence
from relaygate.storage.sqlite_messages import SQLiteMessageLog
from relaygate.storage.sqlite_queue import SQLiteDeliveryQueue
from relaygate.storage.sqlite_sessions import SQLiteUiSessions
from relaygate.storage.sqlite_stats import SQLiteHourlyStats
from relaygate.storage.sqlite_tokens import SQLiteApiTokens
from relaygate.storage.sqlite_webhooks import SQLiteWebhooks
from relaygate.storage.thread import DatabaseThread


class SQLiteStorage:
    def __init__(self, database: Path, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._thread: DatabaseThread[sqlite3.Connection] = DatabaseThread(
            lambda: storage.connect(database), loop or asyncio.get_running_loop(), "storage"
        )
        self.messages = SQLiteMessageLog(self._thread, bodies.directory_for(database))
        self.accounts = SQLiteAccounts(self._thread)
        self.credentials = SQLiteCredentials(self._thread)
        self.dkim_keys = FileDKIMKeys(key_directory(database.parent))
        self.secrets = SQLiteSecrets(self._thread, same)
        self.queue = SQLiteDeliveryQueue(self._thread, same, database)
        self.tokens = SQLiteApiTokens(self._thread, same)
        self.sessions = SQLiteUiSessions(self._thread, same)
        self.stats = SQLiteHourlyStats(self._thread, same)
        self.webhooks = SQLiteWebhooks(self._thread, same)
        self.defence = SQLiteDefence(self._thread, same)

    async def close(self) -> None:
        await asyncio.to_thread(self._thread.close)
