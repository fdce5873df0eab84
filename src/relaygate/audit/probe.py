"""The conversations behind `relaygate check`; they fill in an ``Observations``.

Connections, one after the other (each closed with QUIT before the next):
1. in clear (STARTTLS ports only): greeting, EHLO, MAIL + RCPT to an outside
   address (then RSET, never DATA), AUTH PLAIN with a junk credential;
2. the main TLS session (STARTTLS or implicit), verifying nothing so that a bad
   certificate can still be examined: EHLO, the relay test again, and with
   --user the bare-LF probe to the login's own address;
3. a handshake that verifies the chain (system CAs or --ca-file);
4. one handshake each offering only TLS 1.0, then only TLS 1.1.
Real credentials are sent only inside TLS. Every address is under a reserved
domain (RFC 2606: example.com, example.net, .invalid) except the login's own.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import secrets
import ssl
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from relaygate.audit.client import Client, ProbeError, TLSFailed
from relaygate.audit.findings import Certificate, Observations, Reply, Smuggling, keywords
from relaygate.audit.target import Target

CLIENT_NAME = "relaygate-check.invalid"  # our EHLO name
RELAY_SENDER = "relaygate-check@example.com"
RELAY_RECIPIENT = "relay-test@example.net"  # outside any server's own domains
QUIET = 1.0  # seconds without a reply: no more replies are coming
MAX_EXTRA_REPLIES = 8
LEGACY_VERSIONS = (("TLSv1", ssl.TLSVersion.TLSv1), ("TLSv1.1", ssl.TLSVersion.TLSv1_1))
# Bare-LF ends of data that SMTP smuggling used (SEC Consult, CVE-2023-51766 and kin).
SMUGGLING_VARIANTS = (("<LF>.<LF>", b"\n.\n"), ("<LF>.<CR><LF>", b"\n.\r\n"))


class Unreachable(Exception):
    """No SMTP conversation at all (refused, no greeting, not SMTP): exit status 2."""


@dataclass(frozen=True)
class Settings:
    target: Target
    timeout: float = 10.0
    servername: str | None = None  # the name the certificate must carry (default: host)
    ca_file: str | None = None
    ca_pem: str | None = None  # CA certificates as PEM text (the API's way: no file path)
    user: str | None = None
    password: str | None = None

    @property
    def tls_name(self) -> str:
        return self.servername or self.target.host


def unverified_context(
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        # Old versions need old ciphers; SECLEVEL=0 lets OpenSSL 3 offer them at all.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = version
        context.maximum_version = version
    return context


def verifying_context(ca_file: str | None, ca_pem: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file, cadata=ca_pem)
    context.check_hostname = False  # names are matched in findings, to tell the two apart
    return context


def run_limit(timeout: float) -> float:
    """The whole run's bound: each step has ``timeout``, and a server that answers
    every step just in time must not keep a CI job for an hour."""
    return max(60.0, timeout * 12)


async def gather(settings: Settings) -> Observations:
    limit = run_limit(settings.timeout)
    try:
        return await asyncio.wait_for(_gather(settings), limit)
    except TimeoutError:
        raise Unreachable(f"the whole check took longer than {limit:g} s") from None


async def _gather(settings: Settings) -> Observations:
    obs = Observations(implicit=settings.target.implicit, now=datetime.now(UTC))
    if not settings.target.implicit:
        await _clear_session(settings, obs)
    await _tls_session(settings, obs)
    if obs.tls_version is not None:
        await _verify_chain(settings, obs)
        for name, version in LEGACY_VERSIONS:
            await _legacy(settings, obs, name, version)
    return obs


async def _open(settings: Settings, tls: ssl.SSLContext | None) -> tuple[Client, Reply]:
    target = settings.target
    client = await Client.connect(
        target.host,
        target.port,
        settings.timeout,
        tls=tls,
        server_hostname=settings.tls_name if tls else None,
    )
    try:
        greeting = await client.reply()
    except ProbeError:
        client.abort()
        raise
    return client, greeting


async def _clear_session(settings: Settings, obs: Observations) -> None:
    try:
        client, greeting = await _open(settings, None)
    except ProbeError as exc:
        raise Unreachable(str(exc)) from None
    obs.greeting = greeting
    if greeting.code != 220:
        client.abort()
        raise Unreachable(f"the server refused the session: {greeting}")
    try:
        obs.ehlo_plain_first, obs.ehlo_plain = await client.ehlo(CLIENT_NAME)
    except ProbeError as exc:
        client.abort()
        raise Unreachable(str(exc)) from None
    try:
        await _relay(client, obs, "before TLS")
        reply = await client.command("AUTH PLAIN " + _junk_credential())
        if reply.code == 334:
            await client.command("*")  # cancel (RFC 4954 section 4)
        obs.auth_before_tls = reply
    except ProbeError as exc:
        obs.auth_before_tls_error = str(exc)
    finally:
        await client.close()


def _junk_credential() -> str:
    """Never a real one: a random password for a login under .invalid."""
    junk = f"\0probe@{CLIENT_NAME}\0{secrets.token_urlsafe(12)}"
    return base64.b64encode(junk.encode()).decode()


async def _relay(client: Client, obs: Observations, phase: str) -> None:
    """MAIL and RCPT to an outside address without logging in; RSET, never DATA."""
    try:
        mail = await client.command(f"MAIL FROM:<{RELAY_SENDER}>")
        replies = [mail]
        if mail.code < 300:
            replies.append(await client.command(f"RCPT TO:<{RELAY_RECIPIENT}>"))
        obs.relay[phase] = replies
        await client.command("RSET")
    except ProbeError as exc:
        if phase not in obs.relay:
            obs.relay_errors[phase] = str(exc)
        raise


async def _starttls(client: Client, context: ssl.SSLContext, settings: Settings) -> Reply:
    """EHLO, STARTTLS, handshake. Raises ProbeError (TLSFailed for the handshake)."""
    _, caps = await client.ehlo(CLIENT_NAME)
    if "STARTTLS" not in keywords(caps):
        raise TLSFailed("STARTTLS not offered")
    reply = await client.command("STARTTLS")
    if reply.code != 220:
        raise TLSFailed(f"STARTTLS refused: {reply}")
    await client.starttls(context, settings.tls_name)
    return reply


async def _tls_session(settings: Settings, obs: Observations) -> None:
    implicit = settings.target.implicit
    try:
        client, greeting = await _open(settings, unverified_context() if implicit else None)
    except TLSFailed as exc:
        obs.tls_error = str(exc)
        return
    except ProbeError as exc:
        if implicit:
            raise Unreachable(str(exc)) from None
        obs.tls_error = str(exc)
        return
    try:
        if implicit:
            obs.greeting = greeting
            if greeting.code != 220:
                raise Unreachable(f"the server refused the session: {greeting}")
        elif "STARTTLS" in keywords(obs.ehlo_plain):
            try:
                obs.starttls_reply = await _starttls(client, unverified_context(), settings)
            except TLSFailed as exc:
                obs.tls_error = str(exc)
                return
        else:
            obs.tls_error = "STARTTLS not offered"
            return
        tls = client.tls_object
        if tls is None:  # pragma: no cover - asyncio always gives one after a handshake
            obs.tls_error = "no TLS object"
            return
        obs.tls_version = tls.version()
        der = tls.getpeercert(binary_form=True)
        first, obs.ehlo_tls = await client.ehlo(CLIENT_NAME)
        if implicit:
            obs.ehlo_plain_first = first
        if der:
            obs.certificate = read_certificate(der, settings)
        else:
            obs.certificate_error = "the server sent no certificate"
        await _relay(client, obs, "after TLS")
        if settings.user is not None and settings.password is not None:
            obs.smuggling = Smuggling()
            await _smuggling(client, settings.user, settings.password, obs.smuggling)
    except ProbeError as exc:
        if implicit and obs.ehlo_tls is None:
            raise Unreachable(str(exc)) from None
        if obs.smuggling is not None and obs.smuggling.error is None:
            obs.smuggling.error = str(exc)
    finally:
        await client.close()


async def _smuggling(client: Client, user: str, password: str, probe: Smuggling) -> None:
    """Log in over TLS, then send messages to the login's own address whose body
    holds a bare-LF end of data followed by a (harmless) MAIL and RCPT; count the
    replies: one means the whole thing was one message, more means the text after
    the bare-LF dot ran as commands. The smuggled transaction never gets DATA."""
    credential = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    probe.login = await client.command("AUTH PLAIN " + credential)
    if probe.login.code != 235:
        return
    for variant, ending in SMUGGLING_VARIANTS:
        for line, want in ((f"MAIL FROM:<{user}>", 250), (f"RCPT TO:<{user}>", 250)):
            reply = await client.command(line)
            if reply.code not in (want, 251):
                probe.error = f"{line.split(':')[0]} refused: {reply}"
                return
        reply = await client.command("DATA")
        if reply.code != 354:
            probe.error = f"DATA refused: {reply}"
            return
        await client.send(_smuggling_message(user, variant, ending))
        replies = [await client.reply()]
        for _ in range(MAX_EXTRA_REPLIES):
            try:
                replies.append(await client.reply(timeout=QUIET))
            except ProbeError:
                break
        probe.outcomes[variant] = replies
        if len(replies) > 1:
            return
        try:
            await client.command("RSET")
        except ProbeError:
            if replies[0].code < 400:
                raise
            probe.closed_after_refusal = True  # e.g. Postfix's 521 for bare LF: done
            return


def _smuggling_message(user: str, variant: str, ending: bytes) -> bytes:
    head = (
        f"From: <{user}>\r\nTo: <{user}>\r\n"
        f"Subject: relaygate check: SMTP smuggling probe {variant}\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\n"
        f"Message-ID: <{uuid.uuid4()}@{CLIENT_NAME}>\r\n\r\n"
        "Sent by `relaygate check` to its own login; it may be deleted.\r\n"
    ).encode()
    smuggled = f"MAIL FROM:<{user}>\r\nRCPT TO:<{user}>\r\n".encode()
    return head + b"text" + ending + smuggled + b"\r\n.\r\n"


async def _handshake(settings: Settings, context: ssl.SSLContext) -> Client:
    """A TLS session with ``context`` (STARTTLS or implicit), nothing more."""
    if settings.target.implicit:
        client, _ = await _open(settings, context)
        return client
    client, _ = await _open(settings, None)
    try:
        await _starttls(client, context, settings)
    except ProbeError:
        client.abort()
        raise
    return client


async def _verify_chain(settings: Settings, obs: Observations) -> None:
    if obs.certificate is None:
        return
    try:
        client = await _handshake(settings, verifying_context(settings.ca_file, settings.ca_pem))
    except ProbeError as exc:
        obs.certificate.chain_error = str(exc)
        return
    await client.close()


async def _legacy(
    settings: Settings, obs: Observations, name: str, version: ssl.TLSVersion
) -> None:
    try:
        context = unverified_context(version)
    except (ssl.SSLError, ValueError) as exc:
        obs.legacy_tls[name] = "untestable"
        obs.legacy_errors[name] = f"local OpenSSL refuses it: {exc}"
        return
    try:
        client = await _handshake(settings, context)
    except TLSFailed as exc:
        text = str(exc)
        if "NO_PROTOCOLS_AVAILABLE" in text.upper() or "no protocols available" in text:
            obs.legacy_tls[name] = "untestable"
            obs.legacy_errors[name] = "local OpenSSL refuses it"
        else:
            obs.legacy_tls[name] = "refused"
        return
    except ProbeError as exc:
        obs.legacy_tls[name] = "untestable"
        obs.legacy_errors[name] = f"the session failed before the handshake: {exc}"
        return
    tls = client.tls_object
    got = tls.version() if tls is not None else None
    obs.legacy_tls[name] = "accepted" if got == name else "refused"
    await client.close()


def read_certificate(der: bytes, settings: Settings) -> Certificate:
    cert = x509.load_der_x509_certificate(der)
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        ips = [
            ip
            for ip in san.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        ]
    except x509.ExtensionNotFound:
        dns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return Certificate(
        not_after=cert.not_valid_after_utc,
        names_match=name_matches(settings.tls_name, dns, ips),
        names=tuple(dns + [str(ip) for ip in ips]),
        chain_error=None,
    )


def name_matches(
    host: str,
    dns: list[str],
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> bool:
    """RFC 6125: an IP only against IP names; a name against DNS names, a wildcard
    only as the whole leftmost label."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return address in ips
    wanted = host.rstrip(".").lower()
    for name in dns:
        pattern = name.rstrip(".").lower()
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted:
            label, _, rest = wanted.partition(".")
            if label and rest == pattern[2:] and "*" not in rest:
                return True
    return False
