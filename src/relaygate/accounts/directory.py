"""Directory accounts: users that live in an LDAP directory, not in our store.

A login name that is not a local account is checked here when ``[ldap]`` is
set (docs/identity.md): one connection per check, StartTLS (or ldaps://),
a bind as the service account, a subtree search under ``base_dn`` with the
configured filter (``{address}`` replaced by the login name, escaped as RFC
4515 says), exactly one entry expected; then, if a ``disabled_filter`` is set,
a base-scope search of that entry with it; last a bind as the entry's DN with
the password the client gave. The password is never sent when it is empty:
RFC 4513 5.1.2 makes a simple bind with a name and no password an
"unauthenticated" bind, which many servers answer with success.

The checks are blocking (ldap3 is synchronous), so they run in a small
thread pool of their own, each operation bounded by ``timeout`` and the whole
check by three times that: a directory that stalls holds up only the logins
that wait for it, never the event loop or local accounts.

What a directory user may send as: its ``mail`` values and those of the
``alias_attributes``, each a full address (a value like ``@example.com`` or
anything that is not an address is ignored: a directory entry must not grant
a whole domain by accident). Active Directory's ``proxyAddresses`` values
(``SMTP:user@example.com``, ``smtp:alias@example.com``) lose their prefix.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from relaygate import logs
from relaygate.accounts.store import Account, AccountError, normalize_address
from relaygate.config import LDAPConfig, ldap_url_parts

THREADS = 4  # directory checks at once, per worker process
MAX_WAITING = 64  # checks queued for a thread; more are answered "busy" at once
_PROXY_PREFIX = "smtp:"  # AD proxyAddresses: SMTP: primary, smtp: others


class DirectoryUnavailable(Exception):
    """The directory could not answer (down, timed out, TLS or service bind failed)."""


@dataclass(frozen=True)
class DirectoryAccount(Account):
    """An Account that lives in the directory: id 0, no password hash, no SCRAM
    keys, the server's default sending limits. ``verified_at`` is monotonic time."""

    dn: str = ""
    verified_at: float = 0.0


# ------------------------------------------------------------ pure parts


def login_address(username: str) -> str | None:
    """The login name as an address (domain lower-cased), or None when it is not
    one: such names are never sent to the directory."""
    try:
        return normalize_address(username)
    except AccountError:
        return None


def user_filter(template: str, address: str) -> str:
    """The search filter for ``address``: every special character escaped."""
    return template.replace("{address}", escape_filter_chars(address))


def sender_addresses(values: Iterable[object]) -> tuple[str, ...]:
    """Full addresses among attribute values, sorted, without duplicates."""
    found: dict[str, str] = {}
    for value in values:
        if isinstance(value, bytes):
            try:
                text = value.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
        elif isinstance(value, str):
            text = value.strip()
        else:
            continue
        if text.lower().startswith(_PROXY_PREFIX):
            text = text[len(_PROXY_PREFIX) :]
        address = login_address(text)
        if address is not None:
            found.setdefault(address.lower(), address)
    return tuple(sorted(found.values(), key=str.lower))


def directory_account(address: str, dn: str, senders: Sequence[str]) -> DirectoryAccount:
    now = time.time()
    return DirectoryAccount(
        id=0,
        address=address,
        password_hash="",
        disabled=False,
        senders=tuple(senders),
        created_at=now,
        updated_at=now,
        dn=dn,
        verified_at=time.monotonic(),
    )


@dataclass(frozen=True)
class Check:
    """What one directory check found. ``outcome``: ok | unknown_user | ambiguous |
    bad_password | empty_password | disabled (the reasons auth.fail logs)."""

    outcome: str
    account: DirectoryAccount | None = None


# ------------------------------------------------------------ the directory


class Directory:
    """The LDAP directory of ``[ldap]``; one per worker process."""

    def __init__(self, config: LDAPConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self._loop = loop
        self._password = read_password(config.bind_password_file)
        scheme, self._host, self._port = ldap_url_parts(config.url)
        self._ldaps = scheme == "ldaps"
        self._tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED,
            version=ssl.PROTOCOL_TLS_CLIENT,
            ca_certs_file=str(config.ca_file) if config.ca_file else None,
        )
        self._attributes = ["mail", *config.alias_attributes]
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="ldap")
        self._waiting = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------ async API (event loop)

    async def verify(self, username: str, password: str) -> Check:
        """Is ``password`` right for the directory user ``username``?
        DirectoryUnavailable when the directory cannot say."""
        address = login_address(username)
        if address is None:
            return Check("unknown_user")
        if not password:
            return Check("empty_password")  # never an unauthenticated bind (RFC 4513)
        return await self._run(self._verify, address, password)

    async def lookup(self, address: str) -> DirectoryAccount | None:
        """The enabled directory user ``address``, found with the service account
        alone (no user bind); None when there is none, several, or it is disabled.
        DirectoryUnavailable when the directory cannot say. For logins that prove
        who they are another way (OAuth tokens) and for live sessions' re-checks."""
        normalized = login_address(address)
        if normalized is None:
            return None
        check = await self._run(self._lookup, normalized)
        return check.account

    async def _run(self, work: Any, *args: str) -> Check:
        if self._waiting >= MAX_WAITING:
            raise DirectoryUnavailable("too many directory checks waiting")
        self._waiting += 1
        try:
            future = self._loop.run_in_executor(self._pool, work, *args)
            try:
                result: Check = await asyncio.wait_for(future, 3 * self.config.timeout)
            except TimeoutError:
                raise DirectoryUnavailable(f"no answer within {3 * self.config.timeout}s") from None
            except DirectoryUnavailable:
                raise
            except Exception as exc:  # ldap3 raises more than LDAPException: never a 421
                raise DirectoryUnavailable(_reason(exc)) from None
            return result
        finally:
            self._waiting -= 1

    # ------------------------------------------------ blocking (pool threads)

    def _connect(self) -> ldap3.Connection:
        """A connection bound as the service account, over TLS unless the config
        allows clear text (loopback only)."""
        config = self.config
        server = ldap3.Server(
            self._host,
            port=self._port,
            use_ssl=self._ldaps,
            tls=self._tls,
            get_info=ldap3.NONE,
            connect_timeout=config.timeout,
        )
        connection = ldap3.Connection(
            server,
            user=config.bind_dn,
            password=self._password,
            receive_timeout=config.timeout,
            auto_referrals=False,  # never carry credentials to another server
            read_only=True,
            raise_exceptions=False,
        )
        try:
            connection.open()  # raises when it cannot connect
            if connection.closed:
                raise DirectoryUnavailable(f"cannot connect to {config.url}")
            if config.start_tls and not self._ldaps and not connection.start_tls():
                raise DirectoryUnavailable(f"StartTLS refused: {_describe(connection)}")
            if not connection.bind():
                raise DirectoryUnavailable(f"service bind refused: {_describe(connection)}")
        except DirectoryUnavailable:
            _close(connection)
            raise
        except (LDAPException, OSError, ssl.SSLError) as exc:
            _close(connection)
            raise DirectoryUnavailable(_reason(exc)) from None
        return connection

    def _find(self, connection: ldap3.Connection, address: str) -> Check:
        """The user's entry, and whether it is disabled (service account)."""
        config = self.config
        if not connection.search(
            config.base_dn,
            user_filter(config.filter, address),
            search_scope=ldap3.SUBTREE,
            attributes=self._attributes,
            size_limit=2,  # one is expected: two are enough to refuse
            time_limit=config.timeout,
        ):
            result = connection.result or {}
            if result.get("description") not in ("success", "sizeLimitExceeded"):
                if result.get("result") == 32:  # noSuchObject: base_dn is wrong
                    raise DirectoryUnavailable(f"base_dn not found: {_describe(connection)}")
                if connection.closed or result.get("result") is None:
                    raise DirectoryUnavailable(f"search failed: {_describe(connection)}")
        entries = [e for e in connection.response or [] if e.get("type") == "searchResEntry"]
        if not entries:
            return Check("unknown_user")
        if len(entries) > 1:
            return Check("ambiguous")
        entry = entries[0]
        dn = str(entry["dn"])
        attributes = entry.get("attributes") or {}
        values: list[object] = []
        for name in self._attributes:
            found = attributes.get(name, [])
            values += found if isinstance(found, list) else [found]
        account = directory_account(address, dn, sender_addresses(values))
        if config.disabled_filter and self._matches(connection, dn, config.disabled_filter):
            return Check("disabled", account)
        return Check("ok", account)

    def _matches(self, connection: ldap3.Connection, dn: str, search: str) -> bool:
        connection.search(
            dn,
            search,
            search_scope=ldap3.BASE,
            attributes=[ldap3.NO_ATTRIBUTES],
            time_limit=self.config.timeout,
        )
        result = connection.result or {}
        if result.get("result") not in (0, 32):  # success, or the entry went meanwhile
            raise DirectoryUnavailable(f"disabled_filter search failed: {_describe(connection)}")
        return any(e.get("type") == "searchResEntry" for e in connection.response or [])

    def _verify(self, address: str, password: str) -> Check:
        connection = self._connect()
        try:
            found = self._find(connection, address)
            if found.account is None:
                return found
            if not connection.rebind(user=found.account.dn, password=password):
                result = connection.result or {}
                if result.get("result") == 49:  # invalidCredentials
                    return Check("bad_password")
                raise DirectoryUnavailable(f"user bind failed: {_describe(connection)}")
            return found  # ok, or disabled (the password was right)
        except LDAPException as exc:
            if "invalidCredentials" in type(exc).__name__:
                return Check("bad_password")
            raise DirectoryUnavailable(_reason(exc)) from None
        except (OSError, ssl.SSLError) as exc:
            raise DirectoryUnavailable(_reason(exc)) from None
        finally:
            _close(connection)

    def _lookup(self, address: str) -> Check:
        connection = self._connect()
        try:
            found = self._find(connection, address)
            return found if found.outcome == "ok" else Check(found.outcome)
        except (LDAPException, OSError, ssl.SSLError) as exc:
            raise DirectoryUnavailable(_reason(exc)) from None
        finally:
            _close(connection)


def read_password(path: Path) -> str:
    """The service account's password: the file's text without its final newline."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


def _close(connection: ldap3.Connection) -> None:
    try:
        connection.unbind()
    except (LDAPException, OSError, ssl.SSLError):
        pass


def _describe(connection: ldap3.Connection) -> str:
    result = connection.result or {}
    text = str(result.get("description") or "no answer")
    message = str(result.get("message") or "")
    return f"{text}: {message}"[:200] if message else text[:200]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def log_unavailable(reason: str, url: str, user: str | None = None) -> None:
    """One line per failed directory check: no passwords, the login name only."""
    logs.event("ldap.unreachable", logging.WARNING, url=url, user=user, reason=reason)
