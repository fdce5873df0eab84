"""Where the token-signing keys come from, and how they are kept fresh.

``jwks_url``: fetched at start, again every ``jwks_refresh``, and again when a
token names a key id the set lacks (the provider rotated its keys) -- but at
most once per ``jwks_min_interval`` whatever the reason, so a flood of tokens
with made-up kids cannot make us hammer the provider. One fetch at a time;
callers that need it wait for the same one. A failed fetch keeps the last good
set (and is logged). ``jwks_file``: read at start and again when its size or
modification time changes (looked at no more than once a second).

Fetching and reading happen off the login's hot path except when a new kid
shows up; a token never waits longer than FETCH_TIMEOUT for keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

import httpx

from relaygate import logs
from relaygate.config import OAuthConfig
from relaygate.oauth.keys import MAX_JWKS_BYTES, JwksError, KeySet

FETCH_TIMEOUT = 5.0
FILE_CHECK_INTERVAL = 1.0

Fetch = Callable[[], Awaitable[bytes]]


class FetchError(Exception):
    """The JWKS could not be fetched (the message is safe to log)."""


async def fetch_url(url: str) -> bytes:
    """GET the JWKS: 200 only, no redirects, at most MAX_JWKS_BYTES."""
    try:
        async with (
            httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", url, headers={"Accept": "application/json"}) as response,
        ):
            if response.status_code != 200:
                raise FetchError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise FetchError(f"larger than {MAX_JWKS_BYTES} bytes")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise FetchError(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None


class JwksSource:
    def __init__(
        self,
        config: OAuthConfig,
        *,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.keys = KeySet()
        self.fetches = 0  # attempts made (tests and logs)
        self._clock = clock
        url = config.jwks_url
        self._fetch: Fetch | None = fetch
        if self._fetch is None and url is not None:
            self._fetch = lambda: fetch_url(url)
        self._last_attempt: float | None = None
        self._inflight: asyncio.Future[None] | None = None
        self._refresher: asyncio.Future[None] | None = None
        self._file_seen: tuple[int, int] | None = None  # (size, mtime_ns) last read
        self._file_checked = float("-inf")

    @property
    def where(self) -> str:
        return self.config.jwks_url or str(self.config.jwks_file)

    async def start(self, wait: bool = True) -> None:
        """The first load (a failure is logged, not fatal), then the periodic refresh.

        ``wait=False``: the first fetch runs on its own; a login that comes
        before it ends waits for it (keys_for joins the fetch under way).
        """
        if self._fetch is not None:
            first = self._begin("start")
            self._refresher = asyncio.ensure_future(self._refresh_forever(first))
            if wait:
                await first
        else:
            self._check_file(force=True)

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def keys_for(self, kid: str | None) -> KeySet:
        """The key set to verify a token naming ``kid`` with (maybe fetched anew)."""
        if self._fetch is None:
            self._check_file()
            return self.keys
        if (not self.keys or (kid is not None and kid not in self.keys)) and self._may_fetch():
            await self.refresh("unknown_kid" if self.keys else "no_keys")
        return self.keys

    def _may_fetch(self) -> bool:
        if self._inflight is not None:
            return True  # join the fetch under way
        last = self._last_attempt
        return last is None or self._clock() - last >= self.config.jwks_min_interval

    async def refresh(self, reason: str) -> None:
        """Fetch now (or join the fetch under way); keeps the old set on failure."""
        await asyncio.shield(self._begin(reason))

    def _begin(self, reason: str) -> asyncio.Future[None]:
        """The fetch under way, or a new one."""
        if self._inflight is None:
            self._last_attempt = self._clock()
            self._inflight = asyncio.ensure_future(self._fetch_once(reason))
            self._inflight.add_done_callback(self._fetched)
        return self._inflight

    def _fetched(self, _: asyncio.Future[None]) -> None:
        self._inflight = None

    async def _fetch_once(self, reason: str) -> None:
        assert self._fetch is not None
        self.fetches += 1
        try:
            data = await asyncio.wait_for(self._fetch(), FETCH_TIMEOUT)
            keys = KeySet.parse(data)
        except (FetchError, JwksError, TimeoutError, OSError) as exc:
            logs.event(
                "oauth.jwks_failed",
                logging.WARNING,
                source=self.where,
                reason=str(exc) or type(exc).__name__,
                trigger=reason,
                keys_kept=len(self.keys),
            )
            return
        self._loaded(keys, reason)

    def _loaded(self, keys: KeySet, reason: str) -> None:
        if keys.kids != self.keys.kids or len(keys) != len(self.keys) or reason == "start":
            logs.event(
                "oauth.jwks_loaded",
                source=self.where,
                keys=len(keys),
                kids=",".join(keys.kids) or None,
                trigger=reason,
            )
        self.keys = keys

    async def _refresh_forever(self, first: asyncio.Future[None]) -> None:
        with contextlib.suppress(Exception):
            await first
        while True:
            # Without any keys (the provider was away at start), try sooner.
            pause = self.config.jwks_refresh if self.keys else self.config.jwks_min_interval
            await asyncio.sleep(pause)
            with contextlib.suppress(Exception):
                await self.refresh("periodic")

    def _check_file(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._file_checked < FILE_CHECK_INTERVAL:
            return
        self._file_checked = now
        path = self.config.jwks_file
        assert path is not None
        try:
            stat = os.stat(path)
            seen = (stat.st_size, stat.st_mtime_ns)
            if seen == self._file_seen:
                return
            self._file_seen = seen
            if stat.st_size > MAX_JWKS_BYTES:
                raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = KeySet.parse(path.read_bytes())
        except (OSError, JwksError) as exc:
            logs.event(
                "oauth.jwks_failed",
                logging.WARNING,
                source=self.where,
                reason=getattr(exc, "strerror", None) or str(exc) or type(exc).__name__,
                trigger="file",
                keys_kept=len(self.keys),
            )
            return
        self._loaded(keys, "start" if force else "file")
