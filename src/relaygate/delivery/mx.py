"""Where to deliver a domain's mail (RFC 5321 section 5.1, RFC 7505).

MX records by preference (equal preferences shuffled), each host's AAAA and
A addresses; no MX at all means the domain itself is the host (the implicit
MX); a null MX ("MX 0 .") means the domain takes no mail: a permanent
failure. DNS answers come from dnspython, pointed at ``[delivery] resolvers``
when set (tests and staging use a resolver on loopback).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relaygate.config import DeliveryConfig


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # the MX host name (TLS verification uses it)
    address: str  # the IP to connect to
    preference: int


class PermanentDNSError(Exception):
    """The domain cannot take mail (no such domain, null MX): bounce at once."""


class TemporaryDNSError(Exception):
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

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        """The configured resolver, for other look-ups on delivery (MTA-STS)."""
        return self._resolver

    async def targets(self, domain: str) -> list[Target]:
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise PermanentDNSError(f"550 5.1.2 Domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            return await self._addresses(domain, 0)  # implicit MX: the domain itself
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise TemporaryDNSError(f"451 4.4.3 DNS lookup of {domain} failed: {exc}") from None
        records = [(int(r.preference), str(r.exchange).rstrip(".").lower()) for r in answer]
        if any(host in ("", ".") for _, host in records):
            raise PermanentDNSError(f"556 5.1.10 Domain {domain} accepts no mail (null MX)")
        random.shuffle(records)
        records.sort(key=lambda item: item[0])
        targets: list[Target] = []
        errors: list[str] = []
        for preference, host in records:
            try:
                targets += await self._addresses(host, preference)
            except (PermanentDNSError, TemporaryDNSError) as exc:
                errors.append(str(exc))
        if not targets:
            raise TemporaryDNSError(
                f"451 4.4.4 No address for any MX host of {domain}: {'; '.join(errors)}"
            )
        return targets

    async def _addresses(self, host: str, preference: int) -> list[Target]:
        found: list[Target] = []
        missing = 0
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except dns.resolver.NXDOMAIN:
                raise PermanentDNSError(f"550 5.1.2 Host {host} does not exist") from None
            except dns.resolver.NoAnswer:
                missing += 1
                continue
            except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
                raise TemporaryDNSError(f"451 4.4.3 DNS lookup of {host} failed: {exc}") from None
            found += [Target(host, r.to_text(), preference) for r in answer]
        if not found:
            raise PermanentDNSError(f"550 5.1.2 Host {host} has no address")
        return found
