"""The checklist of `relaygate check`: observations in, one result per check out.

No sockets, clocks or printing: ``probe.py`` gathers an ``Observations`` and
``evaluate`` turns it into ``Result`` rows in a fixed order. Every rule of the
checklist (what is a pass, a warning, a failure) lives here; docs/check.md
gives the standard behind each one.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from relaygate.audit.text import clean

Status = Literal["pass", "warn", "fail"]
Legacy = Literal["accepted", "refused", "untestable"]  # one old TLS version, tried alone

EXPIRY_WARNING = timedelta(days=14)
CHECK_IDS = (
    "starttls.offered",
    "tls.versions",
    "tls.certificate",
    "auth.before_tls",
    "auth.mechanisms",
    "relay.unauthenticated",
    "smuggling.bare_lf",
    "banner",
    "limits.size",
)


@dataclass(frozen=True)
class Result:
    id: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Reply:
    """One SMTP reply as read (``text``: the lines without their codes, joined by " | ")."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {clean(self.text, 100)}"


@dataclass
class Certificate:
    """What the peer's certificate says and whether the chain verified."""

    not_after: datetime  # aware, UTC
    names_match: bool  # the host (or --servername) is among its names
    names: tuple[str, ...]  # DNS and IP names of the subjectAltName (else the CN)
    chain_error: str | None  # None: verified against the trust store (or --ca-file)


@dataclass
class Smuggling:
    """The bare-LF probe with the account's own address: what came back."""

    login: Reply | None = None  # AUTH PLAIN over TLS
    error: str | None = None  # the probe could not run to its end (why)
    # variant name (e.g. "<LF>.<LF>") -> the replies after the whole message was sent
    outcomes: dict[str, list[Reply]] = field(default_factory=dict)
    closed_after_refusal: bool = False  # the server hung up after refusing one: no more tried


@dataclass
class Observations:
    implicit: bool
    now: datetime
    greeting: Reply | None = None
    ehlo_plain: list[str] | None = None  # EHLO keywords before TLS (None: implicit TLS)
    ehlo_plain_first: str = ""  # the first EHLO line (hostname and greeting text)
    starttls_reply: Reply | None = None
    tls_error: str | None = None  # the TLS handshake (STARTTLS or implicit) failed
    tls_version: str | None = None  # negotiated with default settings ("TLSv1.3")
    ehlo_tls: list[str] | None = None  # EHLO keywords after TLS
    legacy_tls: dict[str, Legacy] = field(default_factory=dict)  # "TLSv1" / "TLSv1.1"
    legacy_errors: dict[str, str] = field(default_factory=dict)  # why untestable
    certificate: Certificate | None = None
    certificate_error: str | None = None  # could not read one
    auth_before_tls: Reply | None = None  # answer to AUTH PLAIN with a junk credential
    auth_before_tls_error: str | None = None
    relay: dict[str, list[Reply]] = field(default_factory=dict)  # phase -> MAIL, RCPT replies
    relay_errors: dict[str, str] = field(default_factory=dict)
    smuggling: Smuggling | None = None  # None: no --user given, not tested


def evaluate(obs: Observations) -> list[Result]:
    results: list[Result] = []
    if not obs.implicit:
        results.append(starttls_offered(obs))
    results += [
        tls_versions(obs),
        tls_certificate(obs),
        auth_before_tls(obs),
        auth_mechanisms(obs),
        relay_unauthenticated(obs),
    ]
    if obs.smuggling is not None:
        results.append(smuggling_bare_lf(obs.smuggling))
    results += [banner(obs), limits_size(obs)]
    return results


def keywords(ehlo: list[str] | None) -> dict[str, str]:
    """EHLO keyword (upper case) -> its parameters."""
    out: dict[str, str] = {}
    for line in ehlo or []:
        word, _, params = line.strip().partition(" ")
        if word:
            out.setdefault(word.upper(), params.strip())
    return out


def _tls_ehlo(obs: Observations) -> list[str] | None:
    """The capabilities a client gets to use: after TLS, or in clear if TLS failed."""
    return obs.ehlo_tls if obs.ehlo_tls is not None else obs.ehlo_plain


def starttls_offered(obs: Observations) -> Result:
    rid = "starttls.offered"
    if "STARTTLS" not in keywords(obs.ehlo_plain):
        return Result(rid, "fail", "STARTTLS not advertised in the EHLO reply")
    if obs.starttls_reply is not None and obs.starttls_reply.code != 220:
        return Result(rid, "fail", f"STARTTLS refused: {obs.starttls_reply}")
    if obs.tls_error is not None:
        return Result(rid, "fail", f"STARTTLS handshake failed: {clean(obs.tls_error)}")
    if obs.ehlo_tls is None:
        return Result(rid, "fail", "no EHLO reply after STARTTLS")
    return Result(rid, "pass", f"STARTTLS offered and works ({obs.tls_version})")


def tls_versions(obs: Observations) -> Result:
    rid = "tls.versions"
    if obs.tls_version is None:
        why = clean(obs.tls_error) if obs.tls_error else "no TLS"
        return Result(rid, "fail", f"could not negotiate TLS: {why}")
    accepted = [_version_name(v) for v, o in obs.legacy_tls.items() if o == "accepted"]
    if accepted:
        return Result(rid, "fail", f"{' and '.join(accepted)} accepted (RFC 8996 forbids them)")
    untestable = [v for v, o in obs.legacy_tls.items() if o == "untestable"]
    if untestable:
        names = " and ".join(_version_name(v) for v in untestable)
        why = "; ".join(clean(obs.legacy_errors.get(v, "no reason"), 80) for v in untestable)
        return Result(rid, "warn", f"could not test {names} ({why})")
    if obs.tls_version == "TLSv1.3":
        return Result(rid, "pass", "TLS 1.3 offered; TLS 1.0 and 1.1 refused")
    return Result(rid, "warn", f"TLS 1.3 not offered (best: {_version_name(obs.tls_version)})")


def _version_name(version: str) -> str:
    return {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2"}.get(
        version, version.replace("TLSv", "TLS ")
    )


def tls_certificate(obs: Observations) -> Result:
    rid = "tls.certificate"
    cert = obs.certificate
    if cert is None:
        why = obs.certificate_error or obs.tls_error or "no TLS"
        return Result(rid, "fail", f"no certificate to check: {clean(why)}")
    until = cert.not_after.strftime("%Y-%m-%d")
    problems: list[str] = []
    if cert.not_after <= obs.now:
        problems.append(f"expired on {until}")
    if not cert.names_match:
        names = ", ".join(cert.names[:5]) or "none"
        problems.append(f"name mismatch (certificate names: {clean(names, 100)})")
    if cert.chain_error is not None and not (problems and _only_expiry(cert.chain_error)):
        problems.append(f"chain not trusted: {clean(cert.chain_error, 100)}")
    if problems:
        return Result(rid, "fail", "; ".join(problems))
    left = cert.not_after - obs.now
    if left <= EXPIRY_WARNING:
        return Result(rid, "warn", f"expires in {left.days} days ({until})")
    return Result(rid, "pass", f"chain verified, name matches, valid until {until}")


def _only_expiry(chain_error: str) -> bool:
    return "expired" in chain_error.lower()


def auth_before_tls(obs: Observations) -> Result:
    rid = "auth.before_tls"
    if obs.implicit:
        return Result(rid, "pass", "implicit TLS: nothing is sent in clear")
    plain = keywords(obs.ehlo_plain)
    if "AUTH" in plain:
        return Result(rid, "fail", f"AUTH {clean(plain['AUTH'], 80)} advertised before TLS")
    reply = obs.auth_before_tls
    if reply is None:
        if obs.auth_before_tls_error:
            return Result(
                rid, "pass", f"AUTH not advertised before TLS ({clean(obs.auth_before_tls_error)})"
            )
        return Result(rid, "pass", "AUTH not advertised before TLS")
    if reply.code in (334, 535) or 200 <= reply.code < 300:
        meaning = {
            334: "the server asked for credentials in clear",
            535: "the server checked a credential sent in clear",
        }.get(reply.code, "the server accepted a junk credential in clear")
        return Result(rid, "fail", f"AUTH PLAIN before TLS answered {reply}: {meaning}")
    return Result(rid, "pass", f"AUTH not advertised before TLS; AUTH PLAIN refused: {reply}")


SCRAM = re.compile(r"^SCRAM-", re.IGNORECASE)
CLEARTEXT = frozenset({"PLAIN", "LOGIN"})


def auth_mechanisms(obs: Observations) -> Result:
    rid = "auth.mechanisms"
    before = set(keywords(obs.ehlo_plain).get("AUTH", "").upper().split())
    if not obs.implicit and before & CLEARTEXT:
        shown = " ".join(sorted(before & CLEARTEXT))
        return Result(rid, "fail", f"{shown} offered before TLS (passwords in clear)")
    if obs.ehlo_tls is None:
        return Result(rid, "fail", "no TLS session to see the mechanisms in")
    after = keywords(obs.ehlo_tls).get("AUTH", "").upper().split()
    if not after:
        return Result(rid, "warn", "no AUTH advertised after TLS")
    shown = clean(" ".join(after), 100)
    if any(SCRAM.match(m) for m in after):
        return Result(rid, "pass", f"after TLS: {shown}")
    return Result(rid, "warn", f"no SCRAM mechanism offered (after TLS: {shown})")


def relay_unauthenticated(obs: Observations) -> Result:
    rid = "relay.unauthenticated"
    if not obs.relay:
        why = "; ".join(f"{k}: {clean(v, 80)}" for k, v in obs.relay_errors.items())
        return Result(rid, "fail", f"could not test: {why or 'no session'}")
    notes: list[str] = []
    status: Status = "pass"
    for phase, replies in obs.relay.items():
        mail = replies[0]
        rcpt = replies[1] if len(replies) > 1 else None
        if mail.code >= 300:
            notes.append(f"{phase}: MAIL refused {mail}")
        elif rcpt is None:
            notes.append(f"{phase}: no RCPT reply")
            status = "warn"
        elif 200 <= rcpt.code < 300:
            return Result(rid, "fail", f"{phase}: RCPT to an outside domain accepted: {rcpt}")
        elif 400 <= rcpt.code < 500:
            notes.append(f"{phase}: RCPT only temporarily refused {rcpt}")
            status = "warn"
        else:
            notes.append(f"{phase}: RCPT refused {rcpt}")
    for phase, error in obs.relay_errors.items():
        notes.append(f"{phase}: {clean(error, 80)}")
    return Result(rid, status, "; ".join(notes))


def smuggling_bare_lf(probe: Smuggling) -> Result:
    rid = "smuggling.bare_lf"
    if probe.login is None or probe.login.code != 235:
        why = str(probe.login) if probe.login else clean(probe.error or "no reply")
        return Result(rid, "fail", f"could not test: login over TLS failed: {why}")
    for variant, replies in probe.outcomes.items():
        if len(replies) > 1:
            shown = ", ".join(str(r.code) for r in replies[:6])
            return Result(
                rid,
                "fail",
                f"{variant} ended the data: the text after it ran as commands (replies {shown})",
            )
    if probe.error is not None:
        return Result(rid, "fail", f"could not test: {clean(probe.error)}")
    if not probe.outcomes:
        return Result(rid, "fail", "could not test: no message sent")
    parts = []
    for variant, replies in probe.outcomes.items():
        verdict = "one message" if replies[0].code < 300 else "refused"
        parts.append(f"{variant} {verdict} ({replies[0].code})")
    detail = "bare LF never ends the data: " + ", ".join(parts)
    if probe.closed_after_refusal:
        detail += "; then the server closed the connection"
    return Result(rid, "pass", detail)


# "Postfix 3.7.6", "Exim 4.96", "Sendmail 8.15.2/8.15.2", "Microsoft ESMTP MAIL Service,
# Version: 10.0.17763.1" - a word, then a dotted version (never a dotted quad address).
VERSION = re.compile(r"(?i)\b[a-z][\w-]*:?[ /]v?(\d+(?:\.\d+){1,3})(?![.\d])")


def banner(obs: Observations) -> Result:
    rid = "banner"
    texts = [obs.greeting.text if obs.greeting else "", obs.ehlo_plain_first]
    for text in texts:
        for match in VERSION.finditer(text):
            if _is_ipv4(match.group(1)):
                continue
            return Result(rid, "warn", f"software version shown: {clean(match.group(0), 60)}")
    shown = clean(obs.greeting.text, 80) if obs.greeting else "(none)"
    return Result(rid, "pass", f"no software version in the greeting: {shown}")


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def limits_size(obs: Observations) -> Result:
    rid = "limits.size"
    caps = keywords(_tls_ehlo(obs))
    if "SIZE" not in caps:
        return Result(rid, "warn", "SIZE not advertised (RFC 1870)")
    value = caps["SIZE"]
    if value.isdigit() and int(value) > 0:
        return Result(rid, "pass", f"SIZE {int(value)} bytes")
    if not value or value == "0":
        return Result(rid, "pass", "SIZE advertised without a fixed limit")
    return Result(rid, "warn", f"SIZE advertised with a malformed value: {clean(value, 40)}")


def report(host: str, port: int, results: list[Result]) -> dict[str, object]:
    """The --json document (and the API's answer): host, port and each check."""
    return {
        "host": host,
        "port": port,
        "checks": [{"id": r.id, "status": r.status, "detail": r.detail} for r in results],
    }


def failed(results: list[Result]) -> bool:
    return any(r.status == "fail" for r in results)
