"""Checking a login: account look-up, argon2id off the event loop, a verified cache.

- The account row is read on every AUTH, so a password change, a disabled
  account or a removed one made with the CLI counts at once, in every worker.
- argon2id costs milliseconds of CPU; it runs in a thread pool (argon2-cffi
  releases the GIL), never on the event loop.
- A client that logs in for every message should not pay the hash each time:
  after a successful verify we remember HMAC(process key, user NUL password)
  together with the stored hash it matched. The cache never holds the secret,
  and an entry only counts while the account still has that very hash and is
  enabled, so changing the password or disabling the account drops it.
- Unknown user, wrong password and disabled account all cost one full verify
  and give the same answer, so neither reply nor timing tells them apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import sqlite3
from concurrent.futures import Executor
from dataclasses import dataclass

from relaygate.accounts.credentials import Credential, CredentialStore, looks_like_credential
from relaygate.accounts.passwords import PasswordHasher
from relaygate.accounts.store import Account, AccountStore
from relaygate.sasl import StoredKeys, stored_keys_for_password
from relaygate.sasl.scram import DEFAULT_ITERATIONS

CACHE_SIZE = 10000
_REAL_SALT = stored_keys_for_password("length probe", 4096).salt
TOUCH_INTERVAL = 60.0  # seconds between last_used_at writes for one credential


@dataclass(frozen=True, slots=True)
class AuthResult:
    account: Account | None
    # ok | unknown_user | bad_password | disabled | bad_proof | error, and for app
    # credentials: bad_credential | revoked | expired | network
    outcome: str
    cached: bool = False
    credential: Credential | None = None

    @property
    def senders(self) -> tuple[str, ...]:
        """The sender patterns this login may use (a credential may narrow them)."""
        if self.account is None:
            return ()
        if self.credential is not None:
            return self.credential.effective_senders(self.account.senders)
        return self.account.senders


class Authenticator:
    def __init__(
        self,
        store: AccountStore,
        credentials: CredentialStore,
        hasher: PasswordHasher,
        executor: Executor,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._store = store
        self._credentials = credentials
        self._touched: dict[int, float] = {}
        self._hasher = hasher
        self._executor = executor
        self._loop = loop
        self._key = os.urandom(32)
        self._cache: dict[bytes, str] = {}

    def _cache_key(self, username: str, password: str) -> bytes:
        material = username.lower().encode() + b"\0" + password.encode()
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def verify(
        self, username: str, password: str, client_ip: str = "", now: float = 0.0
    ) -> asyncio.Future[AuthResult]:
        """A future with the result; already done on a cache hit or an app credential."""
        future: asyncio.Future[AuthResult] = self._loop.create_future()
        if looks_like_credential(password):
            future.set_result(self._verify_credential(username, password, client_ip, now))
            return future
        try:
            account = self._store.get(username)
        except (sqlite3.Error, ValueError):
            account = None
            future.set_result(AuthResult(None, "error"))
            return future
        key = self._cache_key(username, password)
        if account is not None and not account.disabled:
            cached_hash = self._cache.get(key)
            if cached_hash is not None and hmac.compare_digest(
                cached_hash.encode(), account.password_hash.encode()
            ):
                future.set_result(AuthResult(account, "ok", cached=True))
                return future
        self._cache.pop(key, None)
        work = self._loop.run_in_executor(self._executor, self._slow_verify, account, password)
        work.add_done_callback(lambda done: self._finish(done, future, key, account))
        return future

    def _verify_credential(
        self, username: str, secret: str, client_ip: str, now: float
    ) -> AuthResult:
        """App credentials are high-entropy: a keyed fast hash, no argon2 needed."""
        try:
            credential = self._credentials.find(secret)
            if credential is None or credential.account_address.lower() != username.lower():
                return AuthResult(None, "bad_credential")
            account = self._store.get(credential.account_address)
        except (sqlite3.Error, ValueError):
            return AuthResult(None, "error")
        if account is None:
            return AuthResult(None, "bad_credential")
        if credential.revoked_at is not None:
            return AuthResult(None, "revoked")
        if not credential.is_active(now):
            return AuthResult(None, "expired")
        if not credential.allows_network(client_ip):
            return AuthResult(None, "network")
        if account.disabled:
            return AuthResult(None, "disabled")
        if now - self._touched.get(credential.id, 0.0) >= TOUCH_INTERVAL:
            self._touched[credential.id] = now
            try:
                self._credentials.touch(credential.id, now)
            except sqlite3.Error:
                pass  # last-used time is informational; the login stands
        return AuthResult(account, "ok", credential=credential)

    def _slow_verify(self, account: Account | None, password: str) -> str:
        if account is None:
            self._hasher.verify_dummy(password)
            return "unknown_user"
        matched = self._hasher.verify(account.password_hash, password)
        if not matched:
            return "bad_password"
        return "disabled" if account.disabled else "ok"

    def _finish(
        self,
        done: asyncio.Future[str],
        future: asyncio.Future[AuthResult],
        key: bytes,
        account: Account | None,
    ) -> None:
        if future.done():
            return
        if done.cancelled() or done.exception() is not None:
            future.set_result(AuthResult(None, "error"))
            return
        outcome = done.result()
        if outcome == "ok" and account is not None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))  # drop the oldest entry
            self._cache[key] = account.password_hash
            future.set_result(AuthResult(account, "ok"))
        else:
            future.set_result(AuthResult(None, outcome))

    # ------------------------------------------------------------ SCRAM

    def stored_keys(self, username: str) -> StoredKeys:
        """The user's SCRAM keys, or decoys that fail the proof just the same.

        Decoys are derived from the user name with our process key, so asking
        twice gives the same salt and nothing tells a missing user apart.
        """
        try:
            account = self._store.get(username)
        except (sqlite3.Error, ValueError):
            account = None
        if account is not None and account.scram is not None and not account.disabled:
            return account.scram
        seed = hmac.new(self._key, b"scram-decoy\0" + username.lower().encode(), hashlib.sha256)
        digest = seed.digest()
        return StoredKeys(
            salt=digest[: len(_REAL_SALT)],  # the same length as a real salt
            stored_key=hashlib.sha256(digest + b"stored").digest(),
            server_key=hashlib.sha256(digest + b"server").digest(),
            iterations=DEFAULT_ITERATIONS,
        )

    def scram_verified(self, username: str) -> AuthResult:
        """The mechanism checked the proof; the account must still exist and be enabled."""
        try:
            account = self._store.get(username)
        except (sqlite3.Error, ValueError):
            return AuthResult(None, "error")
        if account is None or account.scram is None:
            return AuthResult(None, "unknown_user")
        if account.disabled:
            return AuthResult(None, "disabled")
        return AuthResult(account, "ok")
