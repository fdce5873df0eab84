"""Where webhooks may go: http(s) URLs whose host is a public address (SSRF rule).

Private, loopback, link-local, CGNAT, multicast, unspecified and reserved
ranges (IPv4, IPv6, and IPv4 inside IPv6) are refused unless
``[http] allow_private_targets = true``. A literal host is checked when the
webhook is configured; every host is checked again on the resolved address at
send time, and the sender connects to that checked address (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Beyond what the ipaddress flags cover (CGNAT is not "private" there).
_EXTRA_V4 = (
    ipaddress.IPv4Network("100.64.0.0/10"),  # CGNAT (RFC 6598)
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments
    ipaddress.IPv4Network("198.18.0.0/15"),  # benchmarking
)
_EXTRA_V6 = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64
    ipaddress.IPv6Network("2002::/16"),  # 6to4: embeds any IPv4 address
)


class TargetError(ValueError):
    """A URL a webhook may not be sent to; the text says why."""


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            why = refusal(embedded)
            return f"{why} (inside IPv6)" if why else None
        if address in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64 of an IPv4 address
            why = refusal(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
            return f"{why} (NAT64)" if why else None
    for flag, why in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(address, flag):
            return why
    extra = _EXTRA_V4 if isinstance(address, ipaddress.IPv4Address) else _EXTRA_V6
    if any(address in network for network in extra):
        return "private"
    if not address.is_global:
        return "not globally routable"
    return None


def check_url(url: str, allow_private: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL a webhook may use; TargetError if not.
    A literal IP host is classified here; a name only at send time."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TargetError("only http:// and https:// URLs are allowed")
    host = parts.hostname
    if not host:
        raise TargetError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetError("credentials in the URL are not allowed (use the signature)")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    literal = _literal(host)
    if literal is not None and not allow_private:
        why = refusal(literal)
        if why is not None:
            raise TargetError(
                f"{host} is a {why} address; set [http] allow_private_targets = true to allow it"
            )
    return parts.scheme, host, port


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", maxsplit=1)[0])
    except ValueError:
        return None


async def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to: the first that passes the rule (all are
    checked; one refused address refuses the host, so a name cannot mix a
    public address with a private one)."""
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise TargetError(f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise TargetError(f"{host} has no address")
    if not allow_private:
        for address in addresses:
            why = refusal(address)
            if why is not None:
                raise TargetError(f"{host} resolves to {address}, a {why} address")
    return str(addresses[0])
