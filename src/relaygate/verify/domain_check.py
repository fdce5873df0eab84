"""The RCPT-time recipient domain check (``[submission] check_recipient_domains``).

A recipient whose domain cannot take mail is refused at RCPT (550 5.1.2)
rather than accepted and bounced later: no bounce to send, no failed delivery
counted against our reputation. A DNS timeout gets 451 4.4.3 (the client
tries again). Answers are cached by the Verifier (positive ones [verify]
cache_ttl, negative ones the shorter negative_cache_ttl), so a domain seen
before costs no DNS at all and no wait: ``check`` then answers at once.
"""

from __future__ import annotations

from collections.abc import Awaitable

from relaygate.config import Config
from relaygate.delivery.remote_text import clean
from relaygate.verify.classify import parse
from relaygate.verify.verifier import DomainAnswer, Verifier

DOMAIN_REFUSAL_PREFIXES = (b"550 5.1.2 ", b"451 4.4.3 ")


# The DNS answers that refuse a recipient, and the reply for each ({} is the domain).
_REFUSALS = {
    "no_domain": "550 5.1.2 Domain {} does not exist",
    "null_mx": "550 5.1.2 Domain {} accepts no mail (null MX)",
    "no_mx": "550 5.1.2 Domain {} has no MX and no address records",
    "timeout": "451 4.4.3 DNS lookup for {} timed out, try again later",
    "dns_error": "451 4.4.3 DNS lookup for {} failed, try again later",
}


def refusal(domain: str, answer: DomainAnswer) -> bytes | None:
    """The reply for a domain's DNS answer; None: the domain may take mail.

    Only facts that make delivery impossible refuse; other DNS trouble (MX
    hosts without addresses, private addresses) is left to delivery, which
    retries and reports it. Every RCPT to a good cached domain is one dict miss.
    """
    template = None if answer.kind is None else _REFUSALS.get(answer.kind)
    if template is None:
        return None
    return (template.format(clean(domain, 255)) + "\r\n").encode()


class RecipientDomains:
    def __init__(self, config: Config) -> None:
        self.verifier = Verifier(config)

    def check(self, recipient: str) -> bytes | Awaitable[bytes | None] | None:
        """The reply now (None: accept), or an awaitable when DNS must be asked."""
        domain = recipient.rpartition("@")[2]
        if domain.isascii():  # the usual case: the cache decides, no parse on each RCPT
            cached = self.verifier.cached_domain(domain)
            if cached is not None:
                return refusal(domain, cached)
        parsed = parse(recipient)
        if isinstance(parsed, str):
            return None  # the session checked the syntax; a literal or such: not ours
        cached = self.verifier.cached_domain(parsed.domain)
        if cached is not None:
            return refusal(parsed.domain, cached)
        return self._look_up(parsed.domain)

    async def _look_up(self, domain: str) -> bytes | None:
        return refusal(domain, await self.verifier.domain(domain))
