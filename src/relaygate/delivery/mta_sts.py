"""MTA-STS (RFC 8461): which MX hosts a domain allows, and whether TLS to them is a must.

A domain that publishes ``_mta-sts.<domain> TXT "v=STSv1; id=..."`` serves its
policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. In ``enforce``
mode, mail may go only to MX hosts the policy names, over STARTTLS with a
certificate valid for that MX host name; ``testing`` and ``none`` change
nothing for delivery.

The flow of :meth:`MTASTS.policy_for` (RFC 8461 sections 3 and 5.1):

1. Look up the TXT record. None (or not exactly one valid one): keep using a
   cached policy until its ``max_age`` runs out, else there is no policy.
2. A cached, unexpired policy with the TXT record's ``id``: use it, no fetch.
3. Otherwise fetch the policy over HTTPS: the host's addresses come from the
   same dnspython resolver as the MX look-ups (``[delivery] resolvers``), the
   certificate is verified for ``mta-sts.<domain>`` with
   ``ssl.create_default_context()`` (the system's CAs, or the bundle named by
   ``SSL_CERT_FILE``), redirects are not followed, the status must be 200 and
   the type ``text/plain``. A good policy replaces the cached one.
4. A failed fetch falls back to the cached, unexpired policy (whatever its
   id), else there is no policy.

Nothing here raises for DNS, network or HTTP trouble, and nothing is logged:
the reason of the last failure is left in :attr:`MTASTS.last_error` for the
caller's log and delivery history.

The cache lives in the table ``mta_sts_policies`` of the delivery database,
created here on first use (``CREATE TABLE IF NOT EXISTS``); it can move into a
schema migration of ``storage/sqlite.py`` unchanged.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

import dns.asyncresolver
import dns.exception
import dns.resolver

from relaygate.storage.errors import STORAGE_ERRORS

if TYPE_CHECKING:
    from relaygate.storage.api import PolicyCache

__all__ = [
    "CREATE_TABLE",
    "MAX_MAX_AGE",
    "MTASTS",
    "Policy",
    "PolicyError",
    "apply",
    "parse_policy",
]

Mode = Literal["enforce", "testing", "none"]

MAX_MAX_AGE = 31_557_600  # one year: the largest max_age RFC 8461 allows

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS mta_sts_policies (
    domain     TEXT PRIMARY KEY,    -- lower case, no final dot
    id         TEXT NOT NULL,       -- the TXT record's id= when the policy was fetched
    policy     TEXT NOT NULL,       -- the policy file as served
    fetched_at REAL NOT NULL,
    expires_at REAL NOT NULL        -- fetched_at + max_age
)
"""

_WELL_KNOWN = "/.well-known/mta-sts.txt"
_HEADER_LINE_LIMIT = 8 * 1024  # one status or header line
_HEADER_TOTAL_LIMIT = 32 * 1024  # the whole header block
_MAX_HEADERS = 100

_TXT_VERSION = re.compile(r"v=STSv1[ \t]*;")
_TXT_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)")
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_POLICY_VALUE = re.compile(r"[^\x00-\x20\x7f]([^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DIGITS = re.compile(r"[0-9]{1,10}")


class PolicyError(ValueError):
    """A policy file (or TXT record) that does not follow RFC 8461."""


# ---------------------------------------------------------------- the policy


def _host(name: str) -> str:
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class Policy:
    mode: Mode
    mx: tuple[str, ...]  # patterns, lower case, no final dot: "mx.example.com", "*.example.net"
    max_age: int  # seconds
    id: str  # the TXT record's id= this policy was fetched under ("" if unknown)

    def matches(self, mx_host: str) -> bool:
        """Whether ``mx_host`` is one of the policy's MX patterns (RFC 8461 section 3.4).

        Case does not matter, nor do final dots; ``*.example.com`` stands for
        exactly one label more (``mx.example.com``, not ``example.com`` nor
        ``a.b.example.com``).
        """
        host = _host(mx_host)
        if not host:
            return False
        for pattern in self.mx:
            wanted = _host(pattern)
            if wanted.startswith("*."):
                first, dot, rest = host.partition(".")
                if first and dot and rest == wanted[2:]:
                    return True
            elif host == wanted:
                return True
        return False


def _valid_domain(name: str, *, min_labels: int = 2) -> bool:
    labels = name.split(".")
    return (
        len(name) <= 253
        and len(labels) >= min_labels
        and all(_LABEL.fullmatch(label) for label in labels)
    )


def parse_policy(text: str, *, policy_id: str = "") -> Policy:
    """The policy in ``text``, a policy file's body (RFC 8461 section 3.2).

    Lines are ``key: value`` ended by LF or CRLF; blank lines and white space
    around keys and values are tolerated. ``version`` (``STSv1``), ``mode``
    and ``max_age`` are required exactly once, ``mx`` at least once unless the
    mode is ``none``; keys are case-sensitive; unknown keys are ignored.
    Anything else raises :class:`PolicyError`.
    """
    version: str | None = None
    mode: str | None = None
    max_age: int | None = None
    mx: list[str] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not colon or not _POLICY_KEY.fullmatch(key) or not _POLICY_VALUE.fullmatch(value):
            raise PolicyError(f"line {number} is not 'key: value'")
        if key in seen:
            raise PolicyError(f"{key} given more than once")
        if key in ("version", "mode", "max_age"):
            seen.add(key)
        if key == "version":
            if value != "STSv1":
                raise PolicyError(f"unknown version {value!r}")
            version = value
        elif key == "mode":
            if value not in ("enforce", "testing", "none"):
                raise PolicyError(f"unknown mode {value!r}")
            mode = value
        elif key == "max_age":
            if not _DIGITS.fullmatch(value) or int(value) > MAX_MAX_AGE:
                raise PolicyError(
                    f"max_age {value!r} is not a number of seconds up to {MAX_MAX_AGE}"
                )
            max_age = int(value)
        elif key == "mx":
            pattern = value.rstrip(".").lower()
            if not _valid_domain(pattern.removeprefix("*.")):
                raise PolicyError(f"mx {value!r} is not a host name or *.domain")
            if pattern not in mx:
                mx.append(pattern)
    if version is None:
        raise PolicyError("version missing")
    if mode is None:
        raise PolicyError("mode missing")
    if max_age is None:
        raise PolicyError("max_age missing")
    if not mx and mode != "none":
        raise PolicyError(f"no mx in a policy in mode {mode}")
    return Policy(mode=cast(Mode, mode), mx=tuple(mx), max_age=max_age, id=policy_id)


def apply(policy: Policy | None, mx_hosts: list[str]) -> tuple[list[str], bool]:
    """The MX hosts delivery may use, and whether TLS must be required and verified.

    ``enforce``: only the hosts the policy matches (order and repeats kept; may
    be empty: then the message must wait, RFC 8461 section 5.1), with verified
    TLS. ``testing``, ``none`` or no policy: every host, TLS as usual.
    """
    if policy is not None and policy.mode == "enforce":
        return [host for host in mx_hosts if policy.matches(host)], True
    return list(mx_hosts), False


# ---------------------------------------------------------------- discovery


class _FetchError(Exception):
    """Why a policy could not be fetched (the message goes to ``last_error``)."""


@dataclass
class _Gate:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class MTASTS:
    """Policy discovery with a cache (storage.api.PolicyCache: SQLite on one
    machine, PostgreSQL on a cluster); one instance per delivery process."""

    def __init__(
        self,
        cache: PolicyCache,
        resolver: dns.asyncresolver.Resolver,
        *,
        https_port: int = 443,
        fetch_timeout: float = 10.0,
        max_body: int = 64 * 1024,
    ) -> None:
        self.cache = cache
        self.resolver = resolver
        self.https_port = https_port
        self.fetch_timeout = fetch_timeout
        self.max_body = max_body
        self.last_error: str | None = None
        self._gates: dict[str, _Gate] = {}

    async def policy_for(self, domain: str, now: float) -> Policy | None:
        """The policy to apply to mail for ``domain`` at ``now`` (a Unix time).

        Never raises for DNS, network or HTTP trouble. :attr:`last_error` is
        set as this returns (None when all went well, or the domain simply has
        no MTA-STS), so read it right after the ``await``.
        """
        name = _host(domain)
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate()
        gate.users += 1
        try:
            # One discovery per domain at a time: a second connection to the
            # same domain waits and then finds the first one's cache entry.
            async with gate.lock:
                policy, error = await self._discover(name, now)
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[name]
        self.last_error = error
        return policy

    async def _discover(self, domain: str, now: float) -> tuple[Policy | None, str | None]:
        try:
            domain = _ascii_domain(domain)
        except _FetchError as exc:
            return None, str(exc)
        cached, cache_error = await self._cached(domain, now)
        try:
            policy_id = await self._txt_id(domain)
        except _FetchError as exc:
            return cached, _join(str(exc), cache_error)
        if policy_id is None:  # no MTA-STS record: a cached policy lasts its max_age
            return cached, cache_error
        if cached is not None and cached.id == policy_id:
            return cached, None
        try:
            text = await self._fetch(domain)
            policy = parse_policy(text, policy_id=policy_id)
        except (_FetchError, PolicyError) as exc:
            reason = f"MTA-STS policy of {domain} unusable: {exc}"
            if cached is not None:
                reason += f" (using the cached policy id={cached.id})"
            return cached, _join(reason, cache_error)
        return policy, await self._store(domain, policy, text, now)

    # -- DNS ------------------------------------------------------------------

    async def _txt_id(self, domain: str) -> str | None:
        """The id= of the one ``v=STSv1`` TXT record; None when there is none."""
        name = f"_mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.fetch_timeout):
                answer = await self.resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.DNSException, OSError, TimeoutError) as exc:
            raise _FetchError(f"DNS lookup of {name} TXT failed: {_describe(exc)}") from None
        records: list[str] = []
        for rdata in answer:
            strings: tuple[bytes, ...] = getattr(rdata, "strings", ())
            text = b"".join(strings).decode("utf-8", "replace").strip()
            if _TXT_VERSION.match(text):
                records.append(text)
        if not records:
            return None
        if len(records) > 1:
            raise _FetchError(f"{name} has {len(records)} STSv1 TXT records, not one")
        fields = [part.strip() for part in records[0].split(";")[1:]]
        policy_id: str | None = None
        for part in fields:
            if not part:
                continue
            match = _TXT_FIELD.fullmatch(part)
            if match is None:
                raise _FetchError(f"{name} TXT record is malformed at {part[:40]!r}")
            if match[1] == "id" and policy_id is None:
                policy_id = match[2]
        if policy_id is None or not _TXT_ID.fullmatch(policy_id):
            raise _FetchError(f"{name} TXT record has no valid id=")
        return policy_id

    async def _addresses(self, host: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):  # IPv4 first: the likelier to be reachable
            try:
                answer = await self.resolver.resolve(host, rdtype)
            except dns.resolver.NXDOMAIN:
                raise _FetchError(f"{host} does not exist") from None
            except dns.resolver.NoAnswer:
                continue
            found += [rdata.to_text() for rdata in answer]
        if not found:
            raise _FetchError(f"{host} has no address")
        return found

    # -- HTTPS ----------------------------------------------------------------

    async def _fetch(self, domain: str) -> str:
        """The policy file's text, or _FetchError; all of it within ``fetch_timeout``."""
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.fetch_timeout):
                addresses = await self._addresses(host)
                context = ssl.create_default_context()  # honours SSL_CERT_FILE
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                errors: list[str] = []
                for address in addresses:
                    try:
                        body = await self._get(address, host, context)
                    except (OSError, asyncio.IncompleteReadError) as exc:
                        errors.append(f"{address}: {_describe(exc)}")  # try the next address
                        continue
                    try:
                        return body.decode("utf-8")
                    except UnicodeDecodeError:
                        raise _FetchError("policy is not UTF-8 text") from None
                raise _FetchError(f"cannot fetch https://{host}{_WELL_KNOWN}: {'; '.join(errors)}")
        except TimeoutError:
            raise _FetchError(
                f"fetching https://{host}{_WELL_KNOWN} took over {self.fetch_timeout:g} s"
            ) from None
        except dns.exception.DNSException as exc:
            raise _FetchError(f"DNS lookup of {host} failed: {_describe(exc)}") from None

    async def _get(self, address: str, host: str, context: ssl.SSLContext) -> bytes:
        """GET the policy from ``address``; _FetchError for an unusable HTTP answer."""
        reader, writer = await asyncio.open_connection(
            address,
            self.https_port,
            ssl=context,
            server_hostname=host,
            ssl_handshake_timeout=self.fetch_timeout,
            limit=_HEADER_LINE_LIMIT,
        )
        try:
            authority = host if self.https_port == 443 else f"{host}:{self.https_port}"
            writer.write(
                f"GET {_WELL_KNOWN} HTTP/1.1\r\nHost: {authority}\r\n"
                "User-Agent: relaygate\r\nAccept: text/plain\r\nConnection: close\r\n\r\n".encode(
                    "ascii"
                )
            )
            await writer.drain()
            try:
                return await self._response(reader)
            except ValueError as exc:  # a line over the limit
                raise _FetchError(f"bad HTTP response: {exc}") from None
        finally:
            # All we wanted is read (or it is too late): no close_notify
            # exchange, which a stalled server would make us wait for.
            writer.transport.abort()

    async def _response(self, reader: asyncio.StreamReader) -> bytes:
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _FetchError(f"not an HTTP response: {status_line[:60]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        total = len(status_line)
        while True:
            line = await reader.readline()
            total += len(line)
            if not line.endswith(b"\n"):
                raise _FetchError("connection closed in the HTTP header")
            if line in (b"\r\n", b"\n"):
                break
            if total > _HEADER_TOTAL_LIMIT or len(headers) >= _MAX_HEADERS:
                raise _FetchError("HTTP header too large")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _FetchError(f"bad HTTP header line {line[:60]!r}")
            name = name.strip().lower()
            value = value.strip()
            if (
                name in ("content-length", "transfer-encoding")
                and headers.get(name, value) != value
            ):
                raise _FetchError(f"conflicting {name} headers")
            headers[name] = value
        if status != 200:
            if 300 <= status < 400:
                raise _FetchError(
                    f"HTTP {status} redirect to {headers.get('location', '?')!r} not followed"
                )
            raise _FetchError(f"HTTP status {status}")
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "text/plain":
            raise _FetchError(f"Content-Type {media_type or 'missing'}, not text/plain")
        encoding = headers.get("transfer-encoding", "").lower()
        if encoding:
            if [c.strip() for c in encoding.split(",")] != ["chunked"]:
                raise _FetchError(f"unsupported Transfer-Encoding {encoding}")
            return await self._chunked(reader)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise _FetchError(f"bad Content-Length {length[:20]!r}")
            if int(length) > self.max_body:
                raise _FetchError(f"policy larger than {self.max_body} bytes")
            return await reader.readexactly(int(length))
        body = b""
        while chunk := await reader.read(self.max_body + 1 - len(body)):
            body += chunk
            if len(body) > self.max_body:
                raise _FetchError(f"policy larger than {self.max_body} bytes")
        return body

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = b""
        while True:
            size_line = await reader.readline()
            size_text = size_line.split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _FetchError(f"bad chunk size {size_line[:20]!r}") from None
            if size == 0:
                break
            if len(body) + size > self.max_body:
                raise _FetchError(f"policy larger than {self.max_body} bytes")
            body += await reader.readexactly(size)
            if (await reader.readline()).strip():
                raise _FetchError("chunk not followed by CRLF")
        for _ in range(_MAX_HEADERS):  # the trailer, ignored
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                return body
        raise _FetchError("HTTP trailer too large")

    # -- cache ----------------------------------------------------------------

    async def _cached(self, domain: str, now: float) -> tuple[Policy | None, str | None]:
        """The cached policy of ``domain`` if unexpired at ``now``."""
        try:
            found = await self.cache.get(domain, now)
        except STORAGE_ERRORS as exc:
            return None, f"MTA-STS cache unreadable: {exc}"
        if found is None:
            return None, None
        try:
            return parse_policy(found[1], policy_id=found[0]), None
        except PolicyError:
            return None, None  # stored by an older, laxer parser: as good as absent

    async def _store(self, domain: str, policy: Policy, text: str, now: float) -> str | None:
        try:
            await self.cache.put(domain, policy.id, text, now, now + policy.max_age)
        except STORAGE_ERRORS as exc:
            return f"MTA-STS cache not updated: {exc}"
        return None


def _ascii_domain(domain: str) -> str:
    try:
        name = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise _FetchError(f"domain {domain!r} cannot be looked up") from None
    name = name.lower()
    if not _valid_domain(name, min_labels=1):
        raise _FetchError(f"domain {domain!r} cannot be looked up")
    return name


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _join(first: str, second: str | None) -> str:
    return first if second is None else f"{first}; {second}"
