"""Failed-login windows (storage.api.LoginFailures) in the node-local throttle file.

throttle.py has the rules and the SQL; this runs them in the worker's service
thread (its ``state`` connection: data_dir/throttle.db), never on the event
loop. Shared by the machine's workers; for several nodes, see storage/redis/.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from relaygate.config import AuthThrottleConfig
from relaygate.storage.sqlite import ServiceConnections
from relaygate.storage.thread import DatabaseThread
from relaygate.throttle import AuthThrottle, Reservation, Verdict, Wait


def _state(c: ServiceConnections) -> sqlite3.Connection:
    return c.state


class SQLiteLoginFailures:
    def __init__(
        self,
        thread: DatabaseThread[Any],
        config: AuthThrottleConfig,
        state: Callable[[Any], sqlite3.Connection] = _state,
    ) -> None:
        self._thread = thread
        self._config = config
        self._state = state  # the throttle.db connection of the thread's resource
        self._throttle: AuthThrottle | None = None  # made in the thread, used only there

    def _in_thread(self, c: Any) -> AuthThrottle:
        if self._throttle is None:
            self._throttle = AuthThrottle(self._state(c), self._config)
        return self._throttle

    async def check(self, client_ip: str, username: str, now: float) -> Verdict | None:
        return await self._thread.run(lambda c: self._in_thread(c).check(client_ip, username, now))

    async def reserve(
        self, client_ip: str, username: str, now: float
    ) -> Verdict | Reservation | Wait:
        return await self._thread.run(
            lambda c: self._in_thread(c).reserve(client_ip, username, now)
        )

    async def release(self, reservation: Reservation) -> None:
        await self._thread.run(lambda c: self._in_thread(c).release(reservation))

    async def fail(self, reservation: Reservation) -> None:
        await self._thread.run(lambda c: self._in_thread(c).fail(reservation))

    async def record_success(self, client_ip: str, account: str, now: float) -> None:
        await self._thread.run(lambda c: self._in_thread(c).record_success(client_ip, account, now))

    async def prune(self, now: float) -> None:
        await self._thread.run(lambda c: self._in_thread(c).prune(now))
