"""Compromised-account defence in a serving process: watch, hold, release.

The rules are relaygate/defence.py's; this keeps what they need at hand.

- Counts: acceptance already writes every account's hourly counters
  (quotas.py), and a worker reads an account's activity (this hour, the
  14-day baseline, a recent login from a never-used network, the hold flag)
  at most once per ``refresh_seconds``, adding what it accepted itself since.
  So the cost per message is a dictionary look-up and a few additions; an
  account's first message in a refresh period waits for one read.
- Logins: each (account, network, EHLO name) is written once per ten minutes
  per worker (first and last seen); the account's next message waits for
  that write, so a burst right after a login from a new network is judged
  with the network known to be new.
- Holding: the message that fires a trigger and every later one is stored
  as ``held`` (accepted with 250, its delivery rows held); the flag and the
  hold of the account's queued mail are written at once in the background.
  Other workers and nodes see the flag within ``refresh_seconds``; meanwhile
  the delivery queue never claims a flagged account's rows (storage), so
  nothing they accept in that window leaves either.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from relaygate import defence, logs
from relaygate.accepted import SpooledMessage
from relaygate.config import DefenceConfig
from relaygate.defence import Activity, Trigger
from relaygate.storage.api import Defence
from relaygate.webhooks.events import ACCOUNT_HELD
from relaygate.webhooks.notices import EventNotices

SEEN_INTERVAL = 600.0  # a login's network and EHLO name are written this often per worker
_MAX_ACCOUNTS = 10_000  # remembered accounts per worker; past this the memory starts over


@dataclass
class _Account:
    activity: Activity | None = None
    fetched: float = float("-inf")  # monotonic time of the read
    messages: int = 0  # accepted here since the read
    recipients: int = 0
    held: bool = False  # held here, maybe before the read says so
    reading: asyncio.Future[None] | None = None
    login: asyncio.Future[None] | None = None  # a login's seen() being written
    holds: set[asyncio.Future[None]] = field(default_factory=set)


class DefenceService:
    def __init__(
        self,
        config: DefenceConfig,
        store: Defence,
        *,
        notices: EventNotices | None = None,
    ) -> None:
        self.config = config
        self.notices = notices
        self._store = store
        self._accounts: dict[str, _Account] = {}
        self._seen: dict[tuple[str, str, str], float] = {}

    def reconfigure(self, config: DefenceConfig, notices: EventNotices | None) -> None:
        self.config = config
        self.notices = notices

    # ------------------------------------------------------------ logins

    def logged_in(self, account: str, client_ip: str, helo: str) -> None:
        """A login: remember its network and EHLO name (not more than once per
        ten minutes per worker)."""
        if not self.config.enabled:
            return
        network = defence.network_of(client_ip)
        if network is None:
            return
        key = account.lower()
        client = defence.client_name(helo)
        now = time.monotonic()
        if now - self._seen.get((key, network, client), float("-inf")) < SEEN_INTERVAL:
            return
        if len(self._seen) > _MAX_ACCOUNTS:
            self._seen.clear()
        self._seen[(key, network, client)] = now
        state = self._state(key)
        state.login = asyncio.ensure_future(self._write_seen(key, network, client))
        state.fetched = float("-inf")  # the next message reads again, after the write

    async def _write_seen(self, account: str, network: str, client: str) -> None:
        try:
            await self._store.seen(account, network, client, time.time())
        except Exception as exc:  # the login stands; the next one writes again
            self._seen.pop((account, network, client), None)
            logs.event("defence.error", logging.WARNING, account=account, error=str(exc))

    # ------------------------------------------------------------ messages

    def screen(self, message: SpooledMessage) -> Awaitable[None] | None:
        """Judge a message about to be stored: it may come back ``held``. None:
        judged already (the common case); else await the returned work first."""
        if not self.config.enabled:
            return None
        state = self._state(message.account.lower())
        fresh = time.monotonic() - state.fetched < self.config.refresh_seconds
        if fresh and state.activity is not None and state.login is None:
            self._judge(message, state)
            return None
        return self._screen_later(message, state)

    async def _screen_later(self, message: SpooledMessage, state: _Account) -> None:
        key = message.account.lower()
        if state.login is not None:
            login = state.login
            await asyncio.wait([login])
            if state.login is login:
                state.login = None
        if time.monotonic() - state.fetched >= self.config.refresh_seconds or not state.activity:
            if state.reading is None:
                state.reading = asyncio.ensure_future(self._read(key, state))
            await asyncio.wait([state.reading])
        if state.activity is not None:
            self._judge(message, state)
        elif state.held:
            self._mark(message)

    async def _read(self, key: str, state: _Account) -> None:
        try:
            activity = await self._store.activity(key, time.time())
        except Exception as exc:  # fail open: the mail flows, the next message reads again
            logs.event("defence.error", logging.WARNING, account=key, error=str(exc))
            return
        finally:
            state.reading = None
        state.activity = activity
        state.fetched = time.monotonic()
        state.messages = state.recipients = 0
        # Held here and its hold not written yet: still held (the write is on its way).
        state.held = activity.held or bool(state.holds)

    def _judge(self, message: SpooledMessage, state: _Account) -> None:
        assert state.activity is not None
        state.messages += 1
        state.recipients += len(message.recipients)
        if state.held:
            self._mark(message)
            return
        activity = dataclasses.replace(
            state.activity,
            messages=state.activity.messages + state.messages,
            recipients=state.activity.recipients + state.recipients,
        )
        trigger = defence.decide(self.config, activity, time.time())
        if trigger is None:
            return
        state.held = True
        self._mark(message)
        hold = asyncio.ensure_future(self._hold(message.account.lower(), trigger))
        state.holds.add(hold)
        hold.add_done_callback(state.holds.discard)

    @staticmethod
    def _mark(message: SpooledMessage) -> None:
        if message.status == "queued":  # captured mail never leaves: nothing to hold back
            message.status = "held"

    async def _hold(self, account: str, trigger: Trigger) -> None:
        try:
            await hold_account(self._store, account, trigger, self.notices)
        except Exception as exc:
            logs.event("defence.error", logging.WARNING, account=account, error=str(exc))

    def _state(self, key: str) -> _Account:
        state = self._accounts.get(key)
        if state is None:
            if len(self._accounts) > _MAX_ACCOUNTS:
                self._accounts = {k: v for k, v in self._accounts.items() if v.held}
            state = self._accounts[key] = _Account()
        return state


async def hold_account(
    store: Defence, account: str, trigger: Trigger, notices: EventNotices | None
) -> int | None:
    """Write the hold; log and announce it if this process made it (not another)."""
    held = await store.hold(account, trigger, time.time())
    if held is None:
        return None
    logs.event(
        "account.held",
        logging.WARNING,
        account=account,
        reason=trigger.reason,
        detail=trigger.detail,
        held=held,
        **{k: v for k, v in trigger.counts.items()},
    )
    if notices is not None:
        notices.emit(
            ACCOUNT_HELD,
            account,
            {
                "account": account,
                "reason": trigger.reason,
                "detail": trigger.detail,
                "counts": trigger.counts,
                "held_messages": held,
            },
        )
    return held


class RejectWatch:
    """Remote refusals (5xx) per account over the last hour, in the delivery process.

    Counted in memory per delivery process (per node on a cluster): a
    restart starts the hour over. After a hold the account's window starts
    over, so a release is judged on fresh refusals.
    """

    def __init__(
        self, config: DefenceConfig, store: Defence, notices: EventNotices | None = None
    ) -> None:
        self.config = config
        self.notices = notices
        self._store = store
        # account -> [(minute, refused, attempted)], oldest first
        self._windows: dict[str, list[list[int]]] = {}
        self._holding: set[asyncio.Future[None]] = set()

    def outcome(self, account: str, refused: int, attempted: int) -> None:
        """A delivery attempt's recipients: ``refused`` of ``attempted`` got a 5xx."""
        if not self.config.enabled or not self.config.remote_reject_min or attempted <= 0:
            return
        key = account.lower()
        minute = int(time.time() // 60)
        window = self._windows.setdefault(key, [])
        while window and window[0][0] <= minute - 60:
            window.pop(0)
        if window and window[-1][0] == minute:
            window[-1][1] += refused
            window[-1][2] += attempted
        else:
            window.append([minute, refused, attempted])
        if len(self._windows) > _MAX_ACCOUNTS:
            self._windows = {key: window}
        trigger = defence.reject_trigger(
            self.config, sum(w[1] for w in window), sum(w[2] for w in window)
        )
        if trigger is None:
            return
        del self._windows[key]
        work = asyncio.ensure_future(self._hold(key, trigger))
        self._holding.add(work)
        work.add_done_callback(self._holding.discard)

    async def _hold(self, account: str, trigger: Trigger) -> None:
        try:
            await hold_account(self._store, account, trigger, self.notices)
        except Exception as exc:
            logs.event("defence.error", logging.WARNING, account=account, error=str(exc))
