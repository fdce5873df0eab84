"""Logging in: who may, and what a failed attempt costs the one who made it.

The SMTP connection driver asks; this module decides. Nothing here blocks the
event loop: database work runs in ``DatabaseThread``s, argon2id in thread pools.

A password login, in order:

1. The account row (accounts thread). An app-credential secret (``rgc_...``) is
   checked right there: a keyed hash, no slow hash needed.
2. A verified-cache hit: HMAC(process key, user NUL password) remembered with
   the stored hash it matched, valid only while the account still has that
   hash and is enabled. The password is then known to be right, so a read-only
   throttle check is enough (it still refuses a client over its limit).
3. Otherwise a throttle slot is *reserved* (throttle thread, see throttle.py)
   before argon2id runs, so no concurrency gets more guesses checked than
   the limits allow; when only other attempts still in flight stand in the
   way, we wait for them (briefly) instead of refusing. Right: the
   reservation is released. Wrong: it becomes a failure.

Failed attempts cost time, not only a count: each failure reply is held for
``failure_delay`` (growing with the failures on the connection and from the
address in the last minute, capped by ``max_delay``), and a throttled reply
for up to ``max_delay``. The connection is kept meanwhile, which costs a
timer, while a guesser that reconnects pays a TLS handshake.

Clients that failed lately ("suspects") have their argon2id run in a pool of
its own at the lowest CPU priority (SCHED_IDLE), with a bounded queue, and
at most SUSPECT_SHARE of one core per worker (the thread rests between
hashes): a guessing storm then uses a bounded part of the CPU that good
clients leave over, instead of taking it from them (idle CPU is not free on
a small machine: the storm's 19 MiB hashes also evict the good clients'
caches). Suspects wait longer; their replies are held anyway.

OAuth bearer tokens (OAUTHBEARER, XOAUTH2): the token is verified first
(a signature check, 100-200 us, in the hash pool), then the throttle decides
as for app credentials: a valid token for an enabled account gets the
read-only check, anything else is recorded as a failure.

SCRAM: the keys are handed out only after a reservation, so the proof check
(which tells right from wrong) is throttled like a password. Unknown and
disabled accounts get decoy keys derived from the user name with a server
secret kept in the database: the same salt every time, in every worker,
across restarts, so repeated starts do not tell real names from others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from relaygate.accounts.credentials import Credential, looks_like_credential
from relaygate.accounts.directory import (
    Directory,
    DirectoryAccount,
    DirectoryUnavailable,
    log_unavailable,
)
from relaygate.accounts.passwords import PasswordHasher
from relaygate.accounts.store import Account
from relaygate.config import AuthThrottleConfig
from relaygate.oauth import KeySet, OAuthTokens, TokenCheck
from relaygate.sasl import StoredKeys, stored_keys_for_password
from relaygate.sasl.scram import DEFAULT_ITERATIONS
from relaygate.storage.api import Accounts, Credentials, LoginFailures, Secrets
from relaygate.storage.errors import STORAGE_ERRORS
from relaygate.throttle import Reservation, Verdict, Wait
from relaygate.webhooks.events import AUTH_THROTTLED
from relaygate.webhooks.notices import EventNotices

# A hash pool shut down under us is RuntimeError: both mean "could not check".
VERIFY_ERRORS: tuple[type[BaseException], ...] = (*STORAGE_ERRORS, RuntimeError)
# An account looked up for an identity proved elsewhere: the store or the directory failed.
LOOKUP_ERRORS: tuple[type[BaseException], ...] = (*STORAGE_ERRORS, DirectoryUnavailable)
CACHE_SIZE = 10000
TOUCH_INTERVAL = 60.0  # seconds between last_used_at writes for one credential
SUSPECT_QUEUE = 64  # argon2id runs waiting for suspects; more are refused for now
SUSPECT_SHARE = 0.25  # of one core, at most, for suspects' hashes (per worker)
RESERVE_PATIENCE = 10.0  # seconds to queue behind other attempts still being checked
OAUTH_USER = "<oauth-token>"  # throttle name for a token that names nobody
SCRAM_DECOY_KEY = "scram_decoy_key"  # name of the server secret in storage.secrets
_REAL_SALT_LENGTH = len(stored_keys_for_password("length probe", 4096).salt)


@dataclass(frozen=True, slots=True)
class LoginResult:
    account: Account | None
    # ok | unknown_user | bad_password | disabled | bad_proof | bad_credential |
    # revoked | expired | network | authzid_mismatch | throttled | busy | error;
    # OAuth tokens: tokens.py's reasons, unknown_account, disabled_account
    outcome: str
    credential: Credential | None = None
    cached: bool = False
    verdict: Verdict | None = None  # why, when throttled
    delay: float = 0.0  # seconds to hold the reply back
    user: str | None = None  # who the attempt named, when the client did not (OAuth)

    @property
    def ok(self) -> bool:
        return self.account is not None

    @property
    def senders(self) -> tuple[str, ...]:
        """The sender patterns this login may use (a credential may narrow them)."""
        if self.account is None:
            return ()
        if self.credential is not None:
            return self.credential.effective_senders(self.account.senders)
        return self.account.senders


def failure_delay(config: AuthThrottleConfig, connection_failures: int, recent: int) -> float:
    """How long to hold a failure reply.

    0 while within ``connection_delay_after`` (0 turns delays off), then
    ``delay_seconds`` doubling with each further failure, at most ``max_delay``.

    ``connection_failures`` counts this connection's failures and ``recent`` this
    address's in the last minute, both including this one: reconnecting resets
    the first, not the second.
    """
    if not config.connection_delay_after:
        return 0.0  # delays turned off
    over = max(connection_failures, recent) - config.connection_delay_after
    if over <= 0:
        return 0.0
    return float(min(config.delay_seconds * 2.0 ** min(over - 1, 30), config.max_delay))


def _lowest_priority() -> None:
    """Pool initializer: this thread runs only on CPU nobody else wants.

    SCHED_IDLE, not just nice 19: a nice-19 thread still keeps a waking good
    client waiting for the rest of its time slice (a few ms, seen as a doubled
    p99 under a guessing storm); an idle-class thread gives way at once. Linux
    schedules threads one by one, so this touches no other thread. Elsewhere,
    or if refused: nice 19, else normal priority.
    """
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (OSError, AttributeError):
        pass


class LoginService:
    def __init__(
        self,
        *,
        accounts: Accounts,
        credentials: Credentials,
        failures: LoginFailures,
        throttle_config: AuthThrottleConfig,
        hasher: PasswordHasher,
        decoy_key: bytes,
        loop: asyncio.AbstractEventLoop,
        notices: EventNotices | None = None,
        oauth: OAuthTokens | None = None,
        directory: Directory | None = None,
    ) -> None:
        self.notices = notices  # auth.throttled webhooks (at most one per IP and user a minute)
        self.oauth = oauth  # None: no [oauth], no bearer-token logins
        self._accounts = accounts
        self._credentials = credentials
        self._failures = failures
        self.config = throttle_config
        self._hasher = hasher
        self._decoy_key = decoy_key
        self._loop = loop
        self._key = os.urandom(32)
        self._cache: dict[bytes, str] = {}
        self._touched: dict[int, float] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="password-hash"
        )
        self._suspect_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="suspect-hash", initializer=_lowest_priority
        )
        self._suspects_waiting = 0
        self._rest_until = 0.0  # the suspect thread's own: when it may hash again
        self._background: set[asyncio.Future[None]] = set()
        self.directory = directory  # [ldap]: logins not found locally are checked there
        self._directory_cache: dict[bytes, DirectoryAccount] = {}  # verified logins
        self._directory_seen: dict[str, DirectoryAccount] = {}  # last found, by address

    @staticmethod
    async def decoy_key(secrets: Secrets) -> bytes:
        """The server's persistent SCRAM decoy secret (made on first use)."""
        return await secrets.get_or_create(SCRAM_DECOY_KEY)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.directory is not None:
            self.directory.close()
        self._suspect_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ throttle calls

    async def _reserve(self, ip: str, user: str) -> Verdict | Reservation | None:
        """A reservation, a verdict, or None when others' checks kept us waiting too long."""
        pause = 0.01
        deadline = self._loop.time() + RESERVE_PATIENCE
        while True:
            answer = await self._failures.reserve(ip, user, time.time())
            if not isinstance(answer, Wait):
                return answer
            if self._loop.time() + pause > deadline:
                return None
            await asyncio.sleep(pause)  # attempts in flight settle in milliseconds
            pause = min(pause * 2, 0.2)

    def _later(self, work: Awaitable[None]) -> None:
        """Fire and forget (a reservation settled, a use recorded): nobody waits for
        it, and at shutdown it may not run (a pending row then stops counting after
        PENDING_TTL)."""
        try:
            future = asyncio.ensure_future(work)
        except RuntimeError:
            return  # shutting down
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def abandon(self, reservation: Reservation) -> None:
        """A SCRAM exchange given up after its keys were handed out: a failure."""
        self._later(self._failures.fail(reservation))

    async def _allow(self, ip: str, account: str) -> Verdict | None:
        """For a secret known right: the read-only check, and the network remembered."""
        now = time.time()
        verdict = await self._failures.check(ip, account, now)
        if verdict is None:
            await self._failures.record_success(ip, account, now)
        return verdict

    async def _release(self, reservation: Reservation, ip: str, account: str) -> None:
        await self._failures.release(reservation)
        await self._failures.record_success(ip, account, time.time())

    async def _settle(self, reservation: Reservation, outcome: str, ip: str, account: str) -> None:
        """A password attempt's end: a failure counts, anything else only frees
        its reservation ("busy" and "error" are our side's, not the client's)."""
        try:
            if outcome in ("ok", "busy", "error"):
                await self._release(reservation, ip, account)
            else:
                await self._failures.fail(reservation)
        except STORAGE_ERRORS:
            pass  # a pending attempt left behind stops counting after PENDING_TTL

    async def prune(self) -> None:
        await self._failures.prune(time.time())

    def _throttled(self, verdict: Verdict, ip: str, user: str) -> LoginResult:
        if self.notices is not None:
            self.notices.emit(
                AUTH_THROTTLED,
                f"{ip} {user.lower()}",
                {
                    "client_ip": ip,
                    "user": user,
                    "scope": verdict.scope,
                    "retry_after": round(verdict.retry_after),
                },
            )
        delay = min(self.config.max_delay, verdict.retry_after)
        if not self.config.connection_delay_after:
            delay = 0.0
        return LoginResult(None, "throttled", verdict=verdict, delay=delay)

    def _failed(
        self, outcome: str, connection_failures: int, recent: int, user: str | None = None
    ) -> LoginResult:
        delay = failure_delay(self.config, connection_failures + 1, recent)
        return LoginResult(None, outcome, delay=delay, user=user)

    async def _account(self, username: str) -> Account | None:
        try:
            return await self._accounts.get(username)
        except ValueError:
            return None

    async def account_for_address(self, address: str) -> Account | None:
        """The account an identity asserted from outside (an OAuth token's address)
        logs in as; None when there is none. One place for other account sources
        to hook in: with [ldap], an address that is no local account may be an
        enabled directory user (DirectoryUnavailable when the directory cannot say)."""
        account = await self._account(address)
        if account is None and self.directory is not None:
            return await self._directory_user(address)
        return account

    # ------------------------------------------------------------ PLAIN, LOGIN

    async def password(
        self, username: str, password: str, client_ip: str, connection_failures: int
    ) -> LoginResult:
        """Check a user name and password (or app-credential secret)."""
        try:
            if looks_like_credential(password):
                return await self._credential(username, password, client_ip, connection_failures)
            key = self._cache_key(username, password)
            account = await self._account(username)
            if account is None and self.directory is not None:
                return await self._directory_password(
                    username, password, key, client_ip, connection_failures
                )
            if account is not None and not account.disabled:
                cached = self._cache.get(key)
                if cached is not None and hmac.compare_digest(
                    cached.encode(), account.password_hash.encode()
                ):
                    # The password is known right: the read-only check is enough.
                    verdict = await self._allow(client_ip, account.address)
                    if verdict is not None:
                        return self._throttled(verdict, client_ip, username)
                    return LoginResult(account, "ok", cached=True)
            self._cache.pop(key, None)
            reserved = await self._reserve(client_ip, username)
        except STORAGE_ERRORS:
            return LoginResult(None, "error")
        if reserved is None:
            return LoginResult(None, "busy", delay=1.0)
        if isinstance(reserved, Verdict):
            return self._throttled(reserved, client_ip, username)
        suspect = connection_failures > 0 or reserved.recent > 1
        try:
            outcome = await self._slow_verify(account, password, suspect)
        except VERIFY_ERRORS:
            outcome = "error"
        await self._settle(reserved, outcome, client_ip, username)
        if outcome == "ok" and account is not None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))  # drop the oldest entry
            self._cache[key] = account.password_hash
            return LoginResult(account, "ok")
        if outcome == "busy":
            return LoginResult(
                None, "busy", delay=failure_delay(self.config, connection_failures + 1, 0)
            )
        if outcome == "error":
            return LoginResult(None, "error")
        return self._failed(outcome, connection_failures, reserved.recent)

    def _cache_key(self, username: str, password: str) -> bytes:
        material = username.lower().encode() + b"\0" + password.encode()
        return hmac.new(self._key, material, hashlib.sha256).digest()

    async def _slow_verify(self, account: Account | None, password: str, suspect: bool) -> str:
        if not suspect:
            return await self._loop.run_in_executor(self._pool, self._verify, account, password)
        if self._suspects_waiting >= SUSPECT_QUEUE:
            return "busy"
        self._suspects_waiting += 1
        try:
            return await self._loop.run_in_executor(
                self._suspect_pool, self._verify_resting, account, password
            )
        finally:
            self._suspects_waiting -= 1

    def _verify_resting(self, account: Account | None, password: str) -> str:
        """``_verify``, then rest so suspects use at most SUSPECT_SHARE of a core.

        The rest comes before the next suspect's hash, not after this one's:
        this reply is not delayed by it.
        """
        pause = self._rest_until - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        started = time.thread_time()
        try:
            return self._verify(account, password)
        finally:
            spent = time.thread_time() - started
            self._rest_until = time.monotonic() + spent * (1.0 / SUSPECT_SHARE - 1.0)

    def _verify(self, account: Account | None, password: str) -> str:
        if account is None:
            self._hasher.verify_dummy(password)  # an unknown user costs the same time
            return "unknown_user"
        if not self._hasher.verify(account.password_hash, password):
            return "bad_password"
        return "disabled" if account.disabled else "ok"

    async def _credential(
        self, username: str, secret: str, client_ip: str, connection_failures: int
    ) -> LoginResult:
        """App credentials are high-entropy: checked at once, then the throttle decides.

        The secret is checked first (a keyed hash: nothing to gain by throttling
        that), then a right one gets the read-only check and a wrong one is
        recorded as a failure through a reservation.
        """
        now = time.time()
        credential = await self._credentials.find(secret)
        account = None
        if credential is not None and credential.account_address.lower() == username.lower():
            account = await self._account(credential.account_address)
        if credential is None or account is None:
            outcome = "bad_credential"
        elif credential.revoked_at is not None:
            outcome = "revoked"
        elif not credential.is_active(now):
            outcome = "expired"
        elif not credential.allows_network(client_ip):
            outcome = "network"
        elif account.disabled:
            outcome = "disabled"
        else:
            outcome = "ok"
        if outcome != "ok":
            answer = await self._reserve(client_ip, username)
            if answer is None:
                return LoginResult(None, "busy", delay=1.0)
            if isinstance(answer, Verdict):
                return self._throttled(answer, client_ip, username)
            await self._failures.fail(answer)  # known wrong already: straight to a failure
            return self._failed(outcome, connection_failures, answer.recent)
        assert credential is not None and account is not None
        verdict = await self._allow(client_ip, account.address)
        if verdict is not None:  # right, but this client is over a limit
            return self._throttled(verdict, client_ip, username)
        if now - self._touched.get(credential.id, 0.0) >= TOUCH_INTERVAL:
            self._touched[credential.id] = now
            self._later(self._touch(credential.id, now))  # informational
        return LoginResult(account, "ok", credential=credential)

    async def _touch(self, credential_id: int, now: float) -> None:
        with contextlib.suppress(*STORAGE_ERRORS):
            await self._credentials.touch(credential_id, now)

    # ------------------------------------------------------------ OAUTHBEARER, XOAUTH2

    async def bearer(
        self, token: str, claimed: str, client_ip: str, connection_failures: int
    ) -> LoginResult:
        """Check an OAuth bearer token; ``claimed`` is the address the client
        named with it (may be empty): it must be the token's own."""
        if self.oauth is None:
            return LoginResult(None, "error")
        try:
            check = await self.oauth.check(token, self._offload_token)
        except RuntimeError:  # the pool shut down under us
            return LoginResult(None, "error")
        if check.reason == "keys_unavailable":
            return LoginResult(None, "error")  # our side: 454, the client tries later
        outcome = check.reason
        account = None
        try:
            if check.ok:
                assert check.address is not None
                if claimed and claimed.lower() != check.address.lower():
                    outcome = "authzid_mismatch"
                else:
                    account = await self.account_for_address(check.address)
                    if account is None:
                        outcome = "unknown_account"
                    elif account.disabled:
                        outcome = "disabled_account"
            user = claimed or check.address or OAUTH_USER
            if outcome != "ok":
                answer = await self._reserve(client_ip, user)
                if answer is None:
                    return LoginResult(None, "busy", delay=1.0)
                if isinstance(answer, Verdict):
                    return self._throttled(answer, client_ip, user)
                await self._failures.fail(answer)  # known wrong already: straight to a failure
                return self._failed(outcome, connection_failures, answer.recent, check.address)
            assert account is not None
            verdict = await self._allow(client_ip, account.address)
        except LOOKUP_ERRORS:
            return LoginResult(None, "error")
        if verdict is not None:  # right, but this client is over a limit
            return self._throttled(verdict, client_ip, user)
        return LoginResult(account, "ok", user=account.address)

    async def _offload_token(
        self,
        verify: Callable[[str, KeySet, float], TokenCheck],
        token: str,
        keys: KeySet,
        now: float,
    ) -> TokenCheck:
        """The signature check (RSA 100 us, ECDSA 150, Ed25519 190 measured here)
        runs in the hash pool, as argon2id does, not on the event loop."""
        return await self._loop.run_in_executor(self._pool, verify, token, keys, now)

    # ------------------------------------------------------------ SCRAM

    async def scram_keys(
        self, username: str, client_ip: str, connection_failures: int
    ) -> tuple[StoredKeys, Reservation] | LoginResult:
        """The keys to run SCRAM with, after a throttle reservation; or a refusal."""
        try:
            reserved = await self._reserve(client_ip, username)
            account = await self._account(username) if isinstance(reserved, Reservation) else None
        except STORAGE_ERRORS:
            return LoginResult(None, "error")
        if reserved is None:
            return LoginResult(None, "busy", delay=1.0)
        if isinstance(reserved, Verdict):
            return self._throttled(reserved, client_ip, username)
        if account is not None and account.scram is not None and not account.disabled:
            return account.scram, reserved
        return self.decoy_keys(username), reserved

    def decoy_keys(self, username: str) -> StoredKeys:
        """Keys that fail every proof, the same for a name wherever and whenever asked."""
        digest = hmac.new(
            self._decoy_key, b"scram-decoy\0" + username.lower().encode(), hashlib.sha256
        ).digest()
        return StoredKeys(
            salt=digest[:_REAL_SALT_LENGTH],
            stored_key=hashlib.sha256(digest + b"stored").digest(),
            server_key=hashlib.sha256(digest + b"server").digest(),
            iterations=DEFAULT_ITERATIONS,
        )

    async def scram_finished(
        self,
        username: str,
        proof_ok: bool,
        reservation: Reservation | None,
        client_ip: str,
        connection_failures: int,
    ) -> LoginResult:
        """The mechanism checked the proof; the account must still exist and be enabled."""
        recent = reservation.recent if reservation is not None else 0
        try:
            account = await self._account(username)
            if account is None or account.scram is None:
                outcome = "unknown_user"
            elif not proof_ok:
                outcome = "bad_proof"
            elif account.disabled:
                outcome = "disabled"
            else:
                outcome = "ok"
            if reservation is not None:
                if outcome == "ok":
                    assert account is not None
                    await self._release(reservation, client_ip, account.address)
                else:
                    await self._failures.fail(reservation)
        except STORAGE_ERRORS:
            return LoginResult(None, "error")
        if outcome == "ok":
            return LoginResult(account, "ok")
        return self._failed(outcome, connection_failures, recent)

    # ------------------------------------------------------------ directory (LDAP)
    #
    # A login name that is no local account, when [ldap] is set: the directory
    # says (accounts/directory.py). The same throttle reservation, failure
    # accounting and replies as a local password; a failure also costs one
    # dummy argon2id, so it takes as long as a local one; a right password is
    # remembered for [ldap] cache_ttl (keyed like the local cache), after which
    # the directory is asked again: a disabled, deleted or re-passworded user
    # loses access within that time. SCRAM never reaches here: directory users
    # have no stored keys, so they get the decoy keys of an unknown user.

    async def _directory_password(
        self, username: str, password: str, key: bytes, client_ip: str, connection_failures: int
    ) -> LoginResult:
        directory = self.directory
        assert directory is not None
        cached = self._directory_cache.get(key)
        if cached is not None and self._directory_fresh(cached):
            verdict = await self._allow(client_ip, cached.address)
            if verdict is not None:
                return self._throttled(verdict, client_ip, username)
            return LoginResult(cached, "ok", cached=True)
        self._directory_cache.pop(key, None)
        reserved = await self._reserve(client_ip, username)
        if reserved is None:
            return LoginResult(None, "busy", delay=1.0)
        if isinstance(reserved, Verdict):
            return self._throttled(reserved, client_ip, username)
        suspect = connection_failures > 0 or reserved.recent > 1
        account: DirectoryAccount | None = None
        try:
            check = await directory.verify(username, password)
            outcome, account = check.outcome, check.account
        except DirectoryUnavailable as exc:
            log_unavailable(str(exc), directory.config.url, username)
            outcome = "error"
        if outcome not in ("ok", "error"):
            try:  # a failure costs what a local one does
                if await self._slow_verify(None, password, suspect) == "busy":
                    outcome = "busy"
            except VERIFY_ERRORS:
                outcome = "error"
        await self._settle(reserved, outcome, client_ip, username)
        if outcome == "ok" and account is not None:
            self._remember_directory(account, key)
            return LoginResult(account, "ok")
        if outcome == "busy":
            return LoginResult(
                None, "busy", delay=failure_delay(self.config, connection_failures + 1, 0)
            )
        if outcome == "error":
            return LoginResult(None, "error")
        return self._failed(outcome, connection_failures, reserved.recent)

    def _directory_fresh(self, account: DirectoryAccount) -> bool:
        assert self.directory is not None
        return time.monotonic() - account.verified_at < self.directory.config.cache_ttl

    def _remember_directory(self, account: DirectoryAccount, key: bytes | None) -> None:
        if key is not None:
            if len(self._directory_cache) >= CACHE_SIZE:
                self._directory_cache.pop(next(iter(self._directory_cache)))  # the oldest
            self._directory_cache[key] = account
        if len(self._directory_seen) >= CACHE_SIZE:
            self._directory_seen.pop(next(iter(self._directory_seen)))
        self._directory_seen[account.address.lower()] = account

    def needs_recheck(self, account: Account) -> bool:
        """A live session of a directory user: verified longer than cache_ttl ago?"""
        return isinstance(account, DirectoryAccount) and not self._directory_fresh(account)

    async def _directory_current(self, address: str) -> DirectoryAccount | None:
        """The directory user as the directory says now (search only), for a live
        session's re-check; while the directory cannot answer, the last one found
        stands until cache_ttl has passed (then DirectoryUnavailable)."""
        directory = self.directory
        assert directory is not None
        try:
            account = await directory.lookup(address)
        except DirectoryUnavailable as exc:
            log_unavailable(str(exc), directory.config.url, address)
            seen = self._directory_seen.get(address.lower())
            if seen is not None and self._directory_fresh(seen):
                return seen
            raise
        if account is None:
            self._directory_seen.pop(address.lower(), None)
        else:
            self._remember_directory(account, None)
        return account

    async def _directory_user(self, address: str) -> DirectoryAccount | None:
        """Is ``address`` a valid, enabled directory user (search only, no password)?
        For logins proven another way (OAuth tokens, account_for_address). The
        answer is remembered for cache_ttl like a verified password."""
        directory = self.directory
        assert directory is not None
        seen = self._directory_seen.get(address.lower())
        if seen is not None and self._directory_fresh(seen):
            return seen
        try:
            account = await directory.lookup(address)
        except DirectoryUnavailable as exc:
            log_unavailable(str(exc), directory.config.url, address)
            raise
        if account is None:
            self._directory_seen.pop(address.lower(), None)
        else:
            self._remember_directory(account, None)
        return account

    # ------------------------------------------------------------ re-checks

    async def current(
        self, address: str, credential_id: int | None
    ) -> tuple[Account | None, Credential | None]:
        """The account (and credential) as stored now, to re-check a live session."""
        account = await self._account(address)
        if account is None and self.directory is not None:
            return await self._directory_current(address), None
        if account is None or credential_id is None:
            return account, None
        return account, await self._credentials.by_id(credential_id)


def login_problem(
    before: Account,
    credential_before: Credential | None,
    account: Account | None,
    credential: Credential | None,
    client_ip: str,
) -> str | None:
    """Why a login made as ``before`` (with ``credential_before``, if any) no longer
    holds now that the account and credential read as given; None if it still does."""
    if account is None:
        return "account removed"
    if account.disabled:
        return "account disabled"
    if credential_before is not None:
        if credential is None:
            return "credential removed"
        if credential.revoked_at is not None:
            return "credential revoked"
        if not credential.is_active(time.time()):
            return "credential expired"
        if not credential.allows_network(client_ip):
            return "network not allowed"
        return None
    if account.password_hash != before.password_hash:
        return "password changed"
    return None
