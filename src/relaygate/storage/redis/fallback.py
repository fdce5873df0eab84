"""When Redis is away, the node keeps serving on its own state.

Login throttles and connection counts protect the service; they must never
stop it. So a shared backend is wrapped: a Redis error (or a reply slower
than the client's 1 s timeout) sends this call, and every call for the next
RETRY seconds, to the node-local backend (throttle.db, the mmap limiter), and
says so once a minute (``shared.unavailable``); the first call that works
again says ``shared.recovered``. An attempt reserved in one backend is
settled in the same one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions

from relaygate import logs
from relaygate.storage.api import LoginFailures
from relaygate.throttle import Reservation, Verdict, Wait

RETRY = 5.0  # seconds on local state before Redis is tried again
LOG_EVERY = 60.0  # seconds between shared.unavailable lines of one process
SHARED_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)

T = TypeVar("T")


class SharedHealth:
    """Whether Redis works, for every shared backend of a process."""

    def __init__(self, what: str) -> None:
        self.what = what  # for the log: which state falls back
        self.down_until = 0.0
        self.down = False
        self._logged = -LOG_EVERY

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.down = True
        self.down_until = now + RETRY
        if now >= self._logged + LOG_EVERY:
            self._logged = now
            logs.event(
                "shared.unavailable",
                logging.ERROR,
                state=self.what,
                reason=" ".join(str(exc).split()) or type(exc).__name__,
                fallback="node-local",
            )

    def worked(self) -> None:
        if self.down:
            self.down = False
            logs.event("shared.recovered", state=self.what)

    async def call(
        self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]
    ) -> T:
        if self.usable():
            try:
                result = await shared()
            except SHARED_ERRORS as exc:
                self.failed(exc)
            else:
                self.worked()
                return result
        return await local()


class FallbackLoginFailures:
    def __init__(self, shared: LoginFailures, local: LoginFailures, health: SharedHealth) -> None:
        self._shared = shared
        self._local = local
        self._health = health

    async def check(self, client_ip: str, username: str, now: float) -> Verdict | None:
        return await self._health.call(
            lambda: self._shared.check(client_ip, username, now),
            lambda: self._local.check(client_ip, username, now),
        )

    async def reserve(
        self, client_ip: str, username: str, now: float
    ) -> Verdict | Reservation | Wait:
        return await self._health.call(
            lambda: self._shared.reserve(client_ip, username, now),
            lambda: self._local.reserve(client_ip, username, now),
        )

    async def release(self, reservation: Reservation) -> None:
        if reservation.shared is None:
            await self._local.release(reservation)
            return
        try:
            await self._shared.release(reservation)
        except SHARED_ERRORS as exc:  # its pending entry expires by itself
            self._health.failed(exc)

    async def fail(self, reservation: Reservation) -> None:
        if reservation.shared is None:
            await self._local.fail(reservation)
            return
        try:
            await self._shared.fail(reservation)
        except SHARED_ERRORS as exc:
            self._health.failed(exc)

    async def record_success(self, client_ip: str, account: str, now: float) -> None:
        await self._local.record_success(client_ip, account, now)
        if self._health.usable():
            try:
                await self._shared.record_success(client_ip, account, now)
            except SHARED_ERRORS as exc:
                self._health.failed(exc)

    async def prune(self, now: float) -> None:
        await self._local.prune(now)
        await self._shared.prune(now)
