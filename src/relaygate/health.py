"""Is this node healthy? ``relaygate health`` and ``GET /healthz`` ask the same.

Checks, each ok / warn / fail:
- every SMTP listener answers with a 220 greeting (over TLS for implicit ones;
  a PROXY-protocol listener only has to accept the connection);
- the storage answers a query, and the delivery queue's oldest message is
  younger than [delivery] delay_warning_after (else warn: mail is stuck);
- the TLS certificate in use is valid for more than 14 days (warn) and not
  expired (fail).
A warning does not make the node unhealthy (a load balancer should not take a
node out because a remote domain defers); ``--strict`` makes it so.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from relaygate.config import Config, ListenerConfig
from relaygate.server.tls import certificate_pairs_quiet
from relaygate.storage.api import QueueSummary
from relaygate.times import rfc3339_of

Status = Literal["ok", "warn", "fail"]
CONNECT_TIMEOUT = 3.0
CERT_WARN_DAYS = 14
STUCK_AFTER = 4 * 3600.0  # when [delivery] delay_warning_after is 0


@dataclass(frozen=True)
class Check:
    name: str  # "listener 127.0.0.1:587", "storage", "queue", "certificate"
    status: Status
    detail: str


def overall(checks: list[Check], strict: bool = False) -> Status:
    if any(c.status == "fail" for c in checks):
        return "fail"
    if any(c.status == "warn" for c in checks):
        return "fail" if strict else "warn"
    return "ok"


def check_json(checks: list[Check], strict: bool = False) -> dict[str, object]:
    return {
        "status": overall(checks, strict),
        "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in checks],
    }


async def run_checks(
    config: Config, queue_summary: Callable[[], Awaitable[QueueSummary]] | None
) -> list[Check]:
    """Every check, listeners at once. ``queue_summary`` None: no storage found."""
    listener_checks = [check_listener(listener) for listener in config.listeners]
    checks = list(await asyncio.gather(*listener_checks))
    checks += await check_storage(config, queue_summary)
    checks += check_certificates(config)
    return checks


def _dial_host(host: str) -> str:
    """A wildcard address is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


async def check_listener(listener: ListenerConfig) -> Check:
    name = f"listener {listener.address}"
    host = _dial_host(listener.host)
    context: ssl.SSLContext | None = None
    if listener.tls == "implicit" and not listener.proxy_protocol:
        # Health, not trust: the certificate is checked on its own below.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, listener.port, ssl=context)
            if listener.proxy_protocol:
                return Check(name, "ok", "accepting connections (PROXY protocol: not greeted)")
            greeting = await reader.readline()
            if not greeting.startswith(b"220"):
                text = greeting[:80].decode("ascii", "replace").strip() or "nothing"
                return Check(name, "fail", f"answered {text!r}, not 220")
            writer.write(b"QUIT\r\n")
            await writer.drain()
    except TimeoutError:
        return Check(name, "fail", f"no greeting within {CONNECT_TIMEOUT:g} s")
    except (OSError, ssl.SSLError) as exc:
        return Check(name, "fail", f"cannot connect: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()
    return Check(name, "ok", f"220 greeting in {(time.monotonic() - started) * 1000:.0f} ms")


async def check_storage(
    config: Config, queue_summary: Callable[[], Awaitable[QueueSummary]] | None
) -> list[Check]:
    backend = "PostgreSQL" if config.storage.url else "SQLite"
    if queue_summary is None:
        return [Check("storage", "fail", f"no database at {config.database_path}")]
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT * 2):
            summary = await queue_summary()
    except TimeoutError:
        return [Check("storage", "fail", f"{backend}: no answer within {CONNECT_TIMEOUT * 2:g} s")]
    except Exception as exc:  # any storage error is the answer here
        return [Check("storage", "fail", f"{backend}: {' '.join(str(exc).split())[:200]}")]
    held = summary.counts.get("held", 0)
    waiting = sum(summary.counts.values()) - held
    also_held = f", {held} held (relaygate held list)" if held else ""
    checks = [Check("storage", "ok", f"{backend} answers")]
    if summary.oldest is None:
        checks.append(Check("queue", "ok", "empty" + also_held))
        return checks
    age = max(0.0, time.time() - summary.oldest)
    stuck = config.delivery.delay_warning_after or STUCK_AFTER
    detail = f"{waiting} waiting, oldest {_duration(age)} old{also_held}"
    checks.append(Check("queue", "warn" if age > stuck else "ok", detail))
    return checks


def check_certificates(config: Config) -> list[Check]:
    checks = []
    now = datetime.datetime.now(datetime.UTC)
    for cert_file, _ in certificate_pairs_quiet(config):
        name = f"certificate {cert_file.name}"
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not a PEM certificate"
            checks.append(Check(name, "fail", f"{cert_file}: {reason}"))
            continue
        left = cert.not_valid_after_utc - now
        until = rfc3339_of(cert.not_valid_after_utc)
        if left.total_seconds() <= 0:
            checks.append(Check(name, "fail", f"expired at {until}"))
        elif left.days < CERT_WARN_DAYS:
            checks.append(Check(name, "warn", f"expires in {left.days} days ({until})"))
        else:
            checks.append(Check(name, "ok", f"valid until {until} ({left.days} days)"))
    return checks


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
