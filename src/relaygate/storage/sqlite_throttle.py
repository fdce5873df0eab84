"""Failed-login windows (storage.api.LoginFailures) in the node-local throttle file.

throttle.py has the rules and the SQL; this runs them in the worker's service
thread (its ``state`` connection: data_dir/throttle.db), never on the event
loop. Shared by the machine's workers; for several nodes, see storage/redis/.
"""

from __future__ import annotations

from relaygate.config import AuthThrottleConfig
from relaygate.storage.sqlite import ServiceConnections
from relaygate.storage.thread import DatabaseThread
from relaygate.throttle import AuthThrottle, Reservation, Verdict, Wait


class SQLiteLoginFailures:
    def __init__(
        self, thread: DatabaseThread[ServiceConnections], config: AuthThrottleConfig
    ) -> None:
        self._thread = thread
        self._config = config
        self._throttle: AuthThrottle | None = None  # made in the thread, used only there

    def _in_thread(self, c: ServiceConnections) -> AuthThrottle:
        if self._throttle is None:
            self._throttle = AuthThrottle(c.state, self._config)
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
