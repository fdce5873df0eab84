"""Logging in to the web UI: an account's address and password, the same
throttles and hold-backs as SMTP AUTH (services/login.py), and a session kept
in storage so that logging out, a password change or disabling the account
ends it at once, on every node.

The cookie holds a random token; storage keeps only its HMAC (keyed with a
server secret), so a copy of the table opens no session. The CSRF token for
forms is derived from the session token the same way: nothing more to store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from relaygate.accounts.credentials import looks_like_credential
from relaygate.accounts.store import Account
from relaygate.services.login import LoginService
from relaygate.storage.api import Accounts, Secrets, UiSessions

SESSION_KEY = "ui_session_key"  # the server secret sessions are keyed-hashed with
IDLE_SECONDS = 12 * 3600  # a session unused this long ends
MAX_SECONDS = 7 * 86400  # and every session ends after this long
PRUNE_EVERY = 3600.0


@dataclass(frozen=True, slots=True)
class WebLoginResult:
    account: Account | None
    token: str | None  # the session cookie's value, when logged in
    error: str  # what to tell the person; "" when logged in
    retry_after: float = 0.0  # throttled: seconds until it may work


def _fingerprint(password_hash: str) -> bytes:
    return hashlib.sha256(password_hash.encode()).digest()[:16]


class WebLogin:
    def __init__(
        self, accounts: Accounts, sessions: UiSessions, secrets_store: Secrets, logins: LoginService
    ) -> None:
        self._accounts = accounts
        self._sessions = sessions
        self._secrets = secrets_store
        self._logins = logins
        self._key: bytes | None = None
        self._pruned = 0.0

    async def _secret(self) -> bytes:
        if self._key is None:
            self._key = await self._secrets.get_or_create(SESSION_KEY)
        return self._key

    async def _digest(self, token: str) -> bytes:
        key = await self._secret()
        return hmac.new(key, b"session:" + token.encode(), hashlib.sha256).digest()

    async def login(self, address: str, password: str, client_ip: str) -> WebLoginResult:
        """Check the password as SMTP AUTH would (throttled, failures held back);
        on success open a session. App credentials cannot log in here: they are
        for programs, and the UI manages them."""
        if looks_like_credential(password):
            return WebLoginResult(
                None, None, "app credentials cannot log in here; use the account's password"
            )
        result = await self._logins.password(address, password, client_ip, 0)
        if result.delay > 0:
            await asyncio.sleep(result.delay)  # as SMTP holds a failure reply back
        if result.outcome == "throttled":
            after = result.verdict.retry_after if result.verdict is not None else 60.0
            return WebLoginResult(
                None, None, "too many failed logins from your address; try again later", after
            )
        if result.outcome in ("busy", "error"):
            return WebLoginResult(None, None, "the server is busy; try again in a moment")
        account = result.account
        if not result.ok or account is None:
            return WebLoginResult(None, None, "wrong address or password")
        return WebLoginResult(account, await self.open_session(account), "")

    async def open_session(self, account: Account, now: float | None = None) -> str:
        """A new session for an account whose password was just checked: its token."""
        token = secrets.token_urlsafe(32)
        now = time.time() if now is None else now
        await self._sessions.add(
            await self._digest(token), account.address, _fingerprint(account.password_hash), now
        )
        await self._prune(now)
        return token

    async def resolve(self, token: str) -> Account | None:
        """The account a session cookie belongs to, while the session is valid:
        not idle or too old, the account still enabled with the same password."""
        if not token or len(token) > 100:
            return None
        now = time.time()
        session = await self._sessions.find(await self._digest(token), now)
        if session is None:
            return None
        if now - session.seen_at > IDLE_SECONDS or now - session.created_at > MAX_SECONDS:
            await self._sessions.remove(await self._digest(token))
            return None
        account = await self._accounts.get(session.address)
        if account is None or account.disabled:
            return None
        if not hmac.compare_digest(session.password, _fingerprint(account.password_hash)):
            return None  # the password changed since: log in again
        return account

    async def logout(self, token: str) -> None:
        if token and len(token) <= 100:
            await self._sessions.remove(await self._digest(token))

    async def csrf_token(self, token: str) -> str:
        """The form token for this session (compare with ``csrf_valid``)."""
        key = await self._secret()
        mac = hmac.new(key, b"csrf:" + token.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    async def csrf_valid(self, token: str, offered: str) -> bool:
        return hmac.compare_digest((await self.csrf_token(token)).encode(), offered.encode())

    async def _prune(self, now: float) -> None:
        if now - self._pruned < PRUNE_EVERY:
            return
        self._pruned = now
        await self._sessions.prune(now - IDLE_SECONDS, now - MAX_SECONDS)
