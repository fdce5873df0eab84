"""One outbound SMTP connection: connect, TLS as the policy says, log in, send.

The SMTP client protocol itself is aiosmtplib's; this module decides what to
connect to and how: implicit TLS, STARTTLS when offered (opportunistic: not
verified, because MX certificates rarely match), STARTTLS required with
verification (per-domain policy: never falls back to clear text), or none.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from relaygate.config import SmarthostConfig
from relaygate.delivery.remote_text import clean


class DeliveryError(Exception):
    """The destination could not be used; ``reply`` is SMTP-shaped for the history."""

    def __init__(self, reply: str, *, permanent: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Plan:
    """How to reach one host."""

    connect_to: str  # IP or host name
    port: int
    server_name: str  # name the certificate must carry
    tls: str  # "implicit" | "starttls-required" | "starttls-opportunistic" | "none"
    verify: bool
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None  # trust only these CAs (a smarthost's ca_file)


def smarthost_plan(smarthost: SmarthostConfig) -> Plan:
    tls = {
        "implicit": "implicit",
        "starttls": "starttls-required",
        "none": "none",
    }[smarthost.tls]
    return Plan(
        connect_to=smarthost.host,
        port=smarthost.port,
        server_name=smarthost.host,
        tls=tls,
        verify=smarthost.verify_certificate,
        username=smarthost.username,
        password_file=smarthost.password_file,
        ca_file=smarthost.ca_file,
    )


def _context(verify: bool, ca_file: Path | None = None) -> ssl.SSLContext:
    if verify and ca_file is not None:
        # Read at each connection: a renewed CA file needs no restart.
        context = ssl.create_default_context(cafile=str(ca_file))
    elif verify:
        context = ssl.create_default_context()  # honours SSL_CERT_FILE for private CAs
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def describe_tls(client: aiosmtplib.SMTP, verified: bool) -> str | None:
    transport = client.transport
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    name = cipher[0] if cipher else "?"
    return f"{ssl_object.version()} {name} {'verified' if verified else 'unverified'}"


async def open_connection(
    plan: Plan, *, local_hostname: str, connect_timeout: float, command_timeout: float
) -> tuple[aiosmtplib.SMTP, str | None]:
    """A connected, greeted (and, per the plan, encrypted and logged-in) client."""
    implicit = plan.tls == "implicit"
    label = clean(f"{plan.server_name}[{plan.connect_to}]:{plan.port}")
    try:
        context = _context(plan.verify, plan.ca_file) if implicit else None
    except (OSError, ssl.SSLError) as exc:  # a ca_file gone or broken since the start
        raise DeliveryError(f"451 4.4.1 cannot use {label}: ca_file: {clean(str(exc))}") from None
    client = aiosmtplib.SMTP(
        hostname=plan.connect_to,
        port=plan.port,
        local_hostname=local_hostname,
        timeout=command_timeout,
        use_tls=implicit,
        start_tls=False,
        validate_certs=plan.verify,
        tls_context=context,
    )
    try:
        await client.connect(timeout=connect_timeout)
        await client.ehlo()
        if plan.tls.startswith("starttls"):
            offered = client.supports_extension("starttls")
            if offered:
                await client.starttls(
                    server_hostname=plan.server_name,
                    validate_certs=plan.verify and plan.tls == "starttls-required",
                    tls_context=_context(
                        plan.verify and plan.tls == "starttls-required", plan.ca_file
                    ),
                )
                await client.ehlo()
            elif plan.tls == "starttls-required":
                raise DeliveryError(f"451 4.7.5 {label} does not offer STARTTLS, which is required")
        if plan.username is not None and plan.password_file is not None:
            password = plan.password_file.read_text(encoding="utf-8").strip()
            await client.login(plan.username, password)
    except DeliveryError:
        client.close()
        raise
    except aiosmtplib.SMTPAuthenticationError as exc:
        client.close()
        reply = f"{exc.code} {clean(exc.message)} (login to {label} failed)"
        raise DeliveryError(reply) from None
    except aiosmtplib.SMTPResponseException as exc:
        client.close()
        # The remote's own code and enhanced code first: they decide (and go in DSNs).
        raise DeliveryError(f"{exc.code} {clean(exc.message)} (from {label})") from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
        client.close()
        reason = clean(str(exc)) or type(exc).__name__
        raise DeliveryError(f"451 4.4.1 cannot use {label}: {reason}") from None
    except Exception as exc:  # anything else the remote provoked: this host is unusable
        client.close()
        reason = clean(f"{type(exc).__name__}: {exc}")
        raise DeliveryError(f"451 4.4.1 cannot use {label}: {reason}") from None
    except BaseException:  # cancelled (the caller's time budget ran out): do not leak it
        client.close()
        raise
    verified = plan.verify and plan.tls in ("implicit", "starttls-required")
    return client, describe_tls(client, verified)
