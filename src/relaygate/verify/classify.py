"""What an address check found, as a result and reason codes. Sans-IO.

The checks run in order (docs/verify.md): syntax, the domain's DNS facts,
disposable domain, role address, then (when probed) the replies of the
domain's MX. This module holds the pure parts: the syntax check with IDN
domains turned into A-labels, the role and disposable look-ups, and the rules
that turn facts and replies into ``deliverable``, ``undeliverable``,
``risky`` or ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import idna
from disposable_email_domains import blocklist as _DISPOSABLE

from relaygate.delivery.remote_text import clean
from relaygate.smtp.address import AddressSyntaxError, check_mailbox

Result = Literal["deliverable", "undeliverable", "risky", "unknown"]

# Local parts that name a function, not a person: mail to them reaches a team,
# a ticket queue or nobody. A policy, so a short list here, not a data set.
ROLE_LOCAL_PARTS = frozenset(
    {
        "abuse",
        "admin",
        "administrator",
        "billing",
        "contact",
        "do-not-reply",
        "donotreply",
        "help",
        "hostmaster",
        "info",
        "mailer-daemon",
        "marketing",
        "no-reply",
        "noreply",
        "office",
        "postmaster",
        "root",
        "sales",
        "security",
        "support",
        "webmaster",
    }
)

# DNS facts (relaygate.delivery.mx DNSFailure.kind) -> the reason code reported.
DNS_REASONS = {
    "no_domain": "no_domain",
    "null_mx": "null_mx",
    "no_mx": "no_mx",
    "no_mx_address": "no_mx",
    "private": "private_mx",
    "timeout": "timeout",
    "dns_error": "dns_error",
}
PERMANENT_DNS = frozenset({"no_domain", "null_mx", "no_mx"})


@dataclass(frozen=True, slots=True)
class Parsed:
    address: str  # as given, trimmed
    local: str
    domain: str  # A-labels, lower case: what DNS is asked


def parse(text: str) -> Parsed | str:
    """The address split and its domain in A-labels, or why it is malformed."""
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not address:
        return "empty address"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        return "control character in the address"
    try:
        check_mailbox(address, smtputf8=True)
    except AddressSyntaxError as exc:
        return str(exc)
    local, _, domain = address.rpartition("@")
    if domain.startswith("["):
        return "address literals are not verified (no MX to ask)"
    if "." not in domain:
        return "domain has a single label (not a public mail domain)"
    try:
        a_labels = idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        return f"domain is not a valid IDN: {clean(str(exc), 120)}"
    return Parsed(address, local, a_labels)


def is_role(local: str) -> bool:
    base = local.strip('"').split("+", 1)[0].lower()
    return base in ROLE_LOCAL_PARTS


def is_disposable(domain: str) -> bool:
    """The domain, or a parent of it, is a known throwaway-mailbox provider."""
    labels = domain.lower().split(".")
    return any(".".join(labels[i:]) in _DISPOSABLE for i in range(len(labels) - 1))


@dataclass(frozen=True, slots=True)
class Reply:
    """A remote SMTP reply, its text made safe (``clean``) at construction."""

    code: int
    text: str

    @classmethod
    def of(cls, code: int, text: str | bytes) -> Reply:
        return cls(code, clean(text))

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "text": self.text}


@dataclass(frozen=True, slots=True)
class Probe:
    """What the MX answered. ``failure``: ``timeout``, ``unreachable`` or
    ``probe_refused`` (EHLO or MAIL FROM refused) when no RCPT reply came."""

    rcpt: Reply | None = None
    random_rcpt: Reply | None = None  # None: not asked (the address was refused)
    catch_all: bool | None = None  # from the cache when the random RCPT was not sent
    failure: str | None = None
    failure_text: str = ""


@dataclass(slots=True)
class Verdict:
    address: str
    result: Result
    reasons: list[str] = field(default_factory=list)
    mx: list[str] = field(default_factory=list)
    smtp: Reply | None = None
    catch_all: bool | None = None
    detail: str = ""  # one line: the syntax problem or the DNS / remote text

    def as_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "result": self.result,
            "reasons": list(self.reasons),
            "mx": list(self.mx),
            "smtp": None if self.smtp is None else self.smtp.as_json(),
            "catch_all": self.catch_all,
            "detail": self.detail,
        }


def catch_all_from(random_rcpt: Reply | None) -> bool | None:
    """250 to a made-up local part: the domain accepts everything; 5xx: it does
    not; anything else (4xx, not asked) says nothing."""
    if random_rcpt is None:
        return None
    if 200 <= random_rcpt.code < 300:
        return True
    if 500 <= random_rcpt.code < 600:
        return False
    return None


def decide(
    address: str,
    parsed: Parsed | str,
    *,
    dns_kind: str | None = None,
    dns_text: str = "",
    mx: list[str] | None = None,
    probe: Probe | None = None,
) -> Verdict:
    """The verdict from the facts gathered so far (the checks that ran)."""
    if isinstance(parsed, str):
        return Verdict(address, "undeliverable", ["syntax"], detail=parsed)
    verdict = Verdict(address, "deliverable", mx=list(mx or []))
    if dns_kind is not None:
        verdict.reasons.append(DNS_REASONS.get(dns_kind, "dns_error"))
        verdict.detail = clean(dns_text)
        verdict.result = "undeliverable" if dns_kind in PERMANENT_DNS else "unknown"
    if is_disposable(parsed.domain):
        verdict.reasons.append("disposable")
    if is_role(parsed.local):
        verdict.reasons.append("role")
    if probe is not None and dns_kind is None:
        _apply_probe(verdict, probe)
    if verdict.result == "deliverable" and {"disposable", "role", "catch_all"} & set(
        verdict.reasons
    ):
        verdict.result = "risky"
    return verdict


def _apply_probe(verdict: Verdict, probe: Probe) -> None:
    if probe.rcpt is None:
        verdict.result = "unknown"
        verdict.reasons.append(probe.failure or "unreachable")
        verdict.detail = clean(probe.failure_text)
        return
    verdict.smtp = probe.rcpt
    code = probe.rcpt.code
    if 500 <= code < 600:
        verdict.result = "undeliverable"
        verdict.reasons.append("mailbox_unknown")
        return
    if 400 <= code < 500:
        verdict.result = "unknown"
        verdict.reasons.append("greylisted")
        return
    if not 200 <= code < 300:
        verdict.result = "unknown"
        verdict.reasons.append("unexpected_reply")
        return
    catch_all = catch_all_from(probe.random_rcpt) if probe.random_rcpt else probe.catch_all
    verdict.catch_all = catch_all
    if catch_all:
        verdict.reasons.append("catch_all")
