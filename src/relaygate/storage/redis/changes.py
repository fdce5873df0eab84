"""Account and credential changes told to every node (storage.api.ChangeNotices).

On one machine a write bumps the change signal in data_dir (accounts/changes.py)
and every worker sees it at once. With ``[shared] redis_url`` the writer also
publishes on CHANNEL, and worker 0 of each node relays what it hears to its own
machine's signal: open sessions anywhere re-check their login within a second
(a password changed, an account disabled, a credential revoked).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import redis.asyncio

from relaygate import logs
from relaygate.accounts import changes
from relaygate.storage.redis.client import TIMEOUT, open_client
from relaygate.storage.redis.fallback import SHARED_ERRORS, SharedHealth

CHANNEL = "relaygate:changes"
RECONNECT = 1.0  # seconds between attempts to subscribe again


async def publish(url: str, node: str) -> bool:
    """Tell the other nodes; False if Redis could not be reached (the write
    itself stands: their sessions see it at their next login)."""
    client = open_client(url)
    try:
        await client.publish(CHANNEL, node)
        return True
    except SHARED_ERRORS:
        return False
    finally:
        with contextlib.suppress(*SHARED_ERRORS):
            await client.aclose()


class ChangeRelay:
    """Worker 0's listener: a notice from any node bumps this machine's signal."""

    def __init__(self, client: redis.asyncio.Redis, data_dir: Path) -> None:
        self._client = client
        self._signal = changes.signal_path(data_dir)
        self._health = SharedHealth("change_notices")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                # Sending SUBSCRIBE proves nothing (a dying link takes it): wait for Redis's yes.
                confirmed = await pubsub.get_message(timeout=TIMEOUT)
                if confirmed is None or confirmed.get("type") != "subscribe":
                    raise TimeoutError("no reply to SUBSCRIBE")
                self._health.worked()
                # Changes made while we were not listening: re-check to be safe.
                self._bump()
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        self._bump()
            except SHARED_ERRORS as exc:
                self._health.failed(exc)
            finally:
                with contextlib.suppress(*SHARED_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            await asyncio.sleep(RECONNECT)

    def _bump(self) -> None:
        try:
            changes.announce(self._signal)
        except OSError as exc:  # a read-only data_dir: sessions re-check at next login
            logs.event("changes.unavailable", reason=str(exc))
