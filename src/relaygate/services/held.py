"""Held accounts (compromised-account defence): list, release, purge, expect.

One method per use case, called alike by `relaygate held ...`, the HTTP API
(/api/v1/held) and the web UI (/ui/held). Errors are NotHeld ("no such
account", "no such held account") or AccountError (an address worded wrong).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relaygate import logs
from relaygate.accounts.store import normalize_address
from relaygate.storage.api import Accounts, Defence, HeldAccount, Sighting
from relaygate.times import rfc3339
from relaygate.webhooks.events import ACCOUNT_PURGED, ACCOUNT_RELEASED

# Queues a webhook event: (type, key, data); services/webhooks.WebhooksAdmin.announce.
Announce = Callable[[str, str, dict[str, object]], Awaitable[None]]


class NotHeld(LookupError):
    """No such account, or nothing of it is held; the text says which."""


DEFAULT_EXPECT_MESSAGES = 1000  # `held expect` without --messages: an hour's baseline
SIGHTINGS_SHOWN = 50  # networks and client names `held show` lists, most recent first
NEW_FOR = 86400.0  # a network first seen this recently (after others) is marked new


@dataclass(frozen=True, slots=True)
class Expected:
    account: str
    until: float
    messages: int


@dataclass(frozen=True, slots=True)
class AccountWatch:
    """What the defence knows of one account, for a person judging a hold."""

    account: str
    held: HeldAccount | None
    networks: list[Sighting]  # most recent first
    clients: list[Sighting]  # EHLO names, most recent first


class HeldAdmin:
    def __init__(
        self, store: Defence, accounts: Accounts, announce: Announce | None = None
    ) -> None:
        self._store = store
        self._accounts = accounts
        self._announce = announce

    async def accounts(self) -> list[HeldAccount]:
        """Accounts held, or with held mail, oldest hold first."""
        return await self._store.held()

    async def show(self, account: str) -> AccountWatch:
        """The account's hold (if any) and the networks and client names it logged
        in with: where a person looks before releasing or purging."""
        key = normalize_address(account).lower()
        held = next((h for h in await self._store.held() if h.account == key), None)
        networks, clients = await self.sightings(key)
        # A directory (LDAP) account has no local row but is watched all the same.
        if held is None and not networks and not clients and not await self._accounts.get(key):
            raise NotHeld(f"no such account: {key}")
        return AccountWatch(key, held, networks, clients)

    async def sightings(self, key: str) -> tuple[list[Sighting], list[Sighting]]:
        """The networks and the client names ``key`` (as ``held list`` names it) was
        seen with, most recent first."""
        seen = await self._store.sightings(key, SIGHTINGS_SHOWN)
        return [s for s in seen if s.kind == "network"], [s for s in seen if s.kind == "client"]

    async def release(self, account: str, expect_seconds: float) -> list[str]:
        """Deliver the held mail (each message once) and clear the hold; the
        baseline is raised for ``expect_seconds`` so it is not held again at once."""
        key = normalize_address(account).lower()
        now = time.time()
        released = await self._store.release(key, now, now + expect_seconds)
        if released is None:
            raise NotHeld(f"no such held account: {key}")
        logs.event("account.released", account=key, messages=len(released))
        await self._tell(
            ACCOUNT_RELEASED,
            key,
            {
                "account": key,
                "messages": len(released),
                "expected_until": rfc3339(now + expect_seconds),
            },
        )
        return released

    async def purge(self, account: str) -> list[str]:
        """Drop the held mail (status purged; no bounce) and clear the hold."""
        key = normalize_address(account).lower()
        purged = await self._store.purge(key, time.time())
        if purged is None:
            raise NotHeld(f"no such held account: {key}")
        logs.event("account.purged", account=key, messages=len(purged))
        await self._tell(ACCOUNT_PURGED, key, {"account": key, "messages": len(purged)})
        return purged

    async def expect(self, account: str, seconds: float, messages: int | None) -> Expected:
        """An expected burst: the account's baseline is at least ``messages`` an
        hour for ``seconds`` (its volume threshold is factor x that)."""
        address = normalize_address(account)
        if await self._accounts.get(address) is None:
            raise NotHeld(f"no such account: {address}")
        key = address.lower()
        count = DEFAULT_EXPECT_MESSAGES if messages is None else messages
        until = time.time() + seconds
        await self._store.expect(key, until, count)
        logs.event("account.expected", account=key, messages=count, until=rfc3339(until))
        return Expected(key, until, count)

    async def _tell(self, event_type: str, key: str, data: dict[str, object]) -> None:
        # The release or purge is done and stays done: a webhook that cannot be
        # queued is logged, not raised to the admin as if the action failed.
        if self._announce is None:
            return
        try:
            await self._announce(event_type, key, data)
        except Exception as exc:
            logs.event("webhook.error", logging.ERROR, reason=f"{event_type} not queued: {exc}")


def held_json(item: HeldAccount) -> dict[str, object]:
    return {
        "account": item.account,
        "held": item.since is not None,
        "since": None if item.since is None else rfc3339(item.since),
        "reason": item.reason,
        "detail": item.detail,
        "counts": item.counts,
        "held_messages": item.messages,
    }


def watch_json(watch: AccountWatch, now: float) -> dict[str, object]:
    return {
        "account": watch.account,
        "held": None if watch.held is None else held_json(watch.held),
        "networks": [
            {
                "network": s.value,
                "first_seen": rfc3339(s.first_seen),
                "last_seen": rfc3339(s.last_seen),
                "new": is_new(s, now),
            }
            for s in watch.networks
        ],
        "clients": [
            {
                "client": s.value,
                "first_seen": rfc3339(s.first_seen),
                "last_seen": rfc3339(s.last_seen),
            }
            for s in watch.clients
        ],
    }


def is_new(sighting: Sighting, now: float) -> bool:
    """A network that appeared in the last day when the account already had others."""
    return sighting.novel and now - sighting.first_seen < NEW_FOR
