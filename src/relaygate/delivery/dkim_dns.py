"""Is a DKIM key published? One TXT look-up of ``selector._domainkey.domain``,
compared with the key we hold (the ``p=`` value), for the DKIM page and API."""

from __future__ import annotations

import asyncio
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from relaygate.config import DeliveryConfig
from relaygate.delivery.dkim import DKIMKey, public_key_value

DNSState = Literal["published", "different", "missing", "unknown"]
LOOKUP_SECONDS = 3.0


def resolver_for(config: DeliveryConfig) -> dns.asyncresolver.Resolver:
    """The resolver delivery uses: ``[delivery] resolvers`` when set, else the system's."""
    if config.resolvers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in config.resolvers
        ]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = LOOKUP_SECONDS
    return resolver


def _tags(text: str) -> dict[str, str]:
    tags = {}
    for item in text.split(";"):
        name, _, value = item.partition("=")
        tags[name.strip().lower()] = "".join(value.split())
    return tags


async def published(resolver: dns.asyncresolver.Resolver, key: DKIMKey) -> DNSState:
    """published: a record with our public key; different: a DKIM record with
    another key; missing: no such name or no DKIM record; unknown: DNS did not answer."""
    try:
        answer = await asyncio.wait_for(resolver.resolve(key.dns_name, "TXT"), LOOKUP_SECONDS + 1)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return "missing"
    except (dns.exception.DNSException, TimeoutError, OSError):
        return "unknown"
    ours = public_key_value(key)
    found_dkim = False
    for record in answer:
        text = b"".join(record.strings).decode("ascii", "replace")
        tags = _tags(text)
        if "p" not in tags:
            continue
        found_dkim = True
        if tags["p"] == ours:
            return "published"
    return "different" if found_dkim else "missing"
