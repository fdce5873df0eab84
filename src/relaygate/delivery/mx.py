"""Where to deliver a domain's mail (RFC 5321 section 5.1, RFC 7505).

MX records by preference (equal preferences shuffled), each host's AAAA and
A addresses; no MX at all means the domain itself is the host (the implicit
MX); a null MX ("MX 0 .") means the domain takes no mail: a permanent
failure. DNS answers come from dnspython, pointed at ``[delivery] resolvers``
when set (tests and staging use a resolver on loopback).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relaygate.config import DeliveryConfig
from relaygate.delivery.remote_text import clean

# The name itself cannot exist in DNS (too long, empty label, bad IDNA): asking
# again will not help, so these bounce like NXDOMAIN.
_BAD_NAME = (
    dns.name.LabelTooLong,
    dns.name.NameTooLong,
    dns.name.EmptyLabel,
    dns.name.BadEscape,
    dns.name.IDNAException,
    UnicodeError,
)


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # the MX host name (TLS verification uses it)
    address: str  # the IP to connect to
    preference: int


class DNSFailure(Exception):
    """A DNS answer that gives no target. ``kind`` names the fact for callers that
    need more than the reply text (relaygate verify, the RCPT-time domain check):
    ``no_domain``, ``null_mx``, ``no_mx`` (neither MX nor address records),
    ``no_mx_address`` (MX hosts without addresses), ``private`` (only non-public
    addresses), ``timeout`` or ``dns_error``."""

    def __init__(self, text: str, kind: str = "dns_error") -> None:
        super().__init__(text)
        self.kind = kind


class PermanentDNSError(DNSFailure):
    """The domain cannot take our mail (no such domain, null MX, a name DNS cannot
    hold, only non-public addresses): bounce at once."""


class TemporaryDNSError(DNSFailure):
    """DNS did not answer properly: try again later."""


class MXResolver:
    def __init__(self, config: DeliveryConfig, timeout: float = 10.0) -> None:
        if config.resolvers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in config.resolvers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._allow_private = config.allow_private_targets

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        """The configured resolver, for other look-ups on delivery (MTA-STS)."""
        return self._resolver

    async def targets(self, domain: str) -> list[Target]:
        """The addresses to try, best first. Raises only the two DNS errors above."""
        try:
            targets = await self._targets(domain)
        except (PermanentDNSError, TemporaryDNSError):
            raise
        except _BAD_NAME as exc:
            raise PermanentDNSError(
                f"550 5.1.2 Domain {clean(domain)} is not a valid DNS name: {_reason(exc)}",
                "no_domain",
            ) from None
        except Exception as exc:  # any other resolver failure: try again later
            raise TemporaryDNSError(
                f"451 4.4.3 DNS lookup of {clean(domain)} failed: {_reason(exc)}",
                _temporary_kind(exc),
            ) from None
        if self._allow_private:
            return targets
        # A user must not reach services on our own networks by choosing a domain
        # whose MX points there (smarthosts and routes are the admin's, never filtered).
        public = [t for t in targets if is_public(t.address)]
        if not public:
            addresses = sorted({t.address for t in targets})
            refused = ", ".join(addresses[:4]) + (", ..." if len(addresses) > 4 else "")
            raise PermanentDNSError(
                f"554 5.4.4 MX hosts of {clean(domain)} have only non-public addresses"
                f" ({refused}), refused by [delivery] allow_private_targets = false",
                "private",
            )
        return public

    async def _targets(self, domain: str) -> list[Target]:
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise PermanentDNSError(
                f"550 5.1.2 Domain {clean(domain)} does not exist", "no_domain"
            ) from None
        except dns.resolver.NoAnswer:
            try:
                return await self._addresses(domain, 0)  # implicit MX: the domain itself
            except PermanentDNSError as exc:
                exc.kind = "no_mx" if exc.kind == "no_address" else exc.kind
                raise
        records = [(int(r.preference), clean(str(r.exchange)).rstrip(".").lower()) for r in answer]
        if any(host in ("", ".") for _, host in records):
            raise PermanentDNSError(
                f"556 5.1.10 Domain {clean(domain)} accepts no mail (null MX)", "null_mx"
            )
        random.shuffle(records)
        records.sort(key=lambda item: item[0])
        targets: list[Target] = []
        errors: list[str] = []
        for preference, host in records:
            try:
                targets += await self._addresses(host, preference)
            except (PermanentDNSError, TemporaryDNSError) as exc:
                errors.append(str(exc))
            except _BAD_NAME as exc:
                errors.append(f"550 5.1.2 Host {host} is not a valid DNS name: {_reason(exc)}")
        if not targets:
            raise TemporaryDNSError(
                f"451 4.4.4 No address for any MX host of {clean(domain)}: {'; '.join(errors)}",
                "no_mx_address",
            )
        return targets

    async def _addresses(self, host: str, preference: int) -> list[Target]:
        found: list[Target] = []
        missing = 0
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except dns.resolver.NXDOMAIN:
                raise PermanentDNSError(
                    f"550 5.1.2 Host {clean(host)} does not exist", "no_domain"
                ) from None
            except dns.resolver.NoAnswer:
                missing += 1
                continue
            except _BAD_NAME:
                raise
            except Exception as exc:  # timeout, SERVFAIL, anything: try again later
                raise TemporaryDNSError(
                    f"451 4.4.3 DNS lookup of {clean(host)} failed: {_reason(exc)}",
                    _temporary_kind(exc),
                ) from None
            found += [Target(clean(host), r.to_text(), preference) for r in answer]
        if not found:
            raise PermanentDNSError(f"550 5.1.2 Host {clean(host)} has no address", "no_address")
        return found


def _temporary_kind(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, dns.exception.Timeout) else "dns_error"


def _reason(exc: BaseException) -> str:
    return clean(str(exc)) or type(exc).__name__


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (what an MX on the internet has).

    False for loopback, private (RFC 1918, ULA fc00::/7), link-local, CGNAT
    100.64/10, unspecified, multicast, reserved and documentation ranges, and
    for IPv4-mapped or NAT64-embedded IPv6 forms of any of those.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(str(embedded))
        if ip.teredo is not None:
            return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_link_local
    )


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
