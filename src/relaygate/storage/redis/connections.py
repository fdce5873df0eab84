"""Per-client connection limits across the nodes (storage.api.ConnectionCounts).

Each machine keeps its own limiter (server/connlimit.py, an mmap: no round
trip); with ``[shared] redis_url`` a connection that passes it is also counted
in Redis, so ``per_ip_concurrent`` and ``per_ip_per_minute`` hold for the
client across the cluster. Open connections are counted per holder (node and
process) in a hash per client, and each holder keeps a lease key alive
(LEASE seconds, renewed every RENEW): the counts of a node that was killed
stop counting when its lease runs out, without anyone cleaning up after it.
IPv6 clients are counted per /64, as on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
from functools import lru_cache

import redis.asyncio

from relaygate.config import ConnectionLimitsConfig

PREFIX = "relaygate:conn:"
LEASE = 30  # seconds a holder's counts outlive its last renewal
RENEW = 10.0

# KEYS: the client's hash of open connections, its counter this minute.
# ARGV: holder, concurrent limit, per-minute limit, the lease key prefix.
_OPEN = """
local fields = redis.call('HGETALL', KEYS[1])
local open = 0
for i = 1, #fields, 2 do
  if redis.call('EXISTS', ARGV[4] .. fields[i]) == 1 then
    open = open + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
local concurrent, per_minute = tonumber(ARGV[2]), tonumber(ARGV[3])
if concurrent > 0 and open >= concurrent then return 'concurrent' end
local minute = tonumber(redis.call('GET', KEYS[2]) or '0')
if per_minute > 0 and minute >= per_minute then return 'rate' end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], 86400)
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 120)
return ''
"""

_CLOSE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


class RedisConnectionCounts:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        config: ConnectionLimitsConfig,
        holder: str,
        lease: int = LEASE,
    ) -> None:
        self._client = client
        self._lease = lease
        self._config = config
        self._holder = holder  # node:pid
        self._exempt = tuple(ipaddress.ip_network(n, strict=False) for n in config.exempt)
        self._open = client.register_script(_OPEN)
        self._close = client.register_script(_CLOSE)
        self._lease_task: asyncio.Task[None] | None = None
        self.active = bool(config.per_ip_concurrent or config.per_ip_per_minute)

    @classmethod
    def for_process(
        cls, client: redis.asyncio.Redis, config: ConnectionLimitsConfig, node: str
    ) -> RedisConnectionCounts:
        return cls(client, config, f"{node}:{os.getpid()}")

    def counted(self, client_ip: str) -> bool:
        """Whether this client is limited at all (not exempt, limits on)."""
        return self.active and _label(client_ip, self._exempt) is not None

    async def open(self, client_ip: str, now: float) -> str | None:
        label = _label(client_ip, self._exempt)
        if label is None or not self.active:
            return None
        minute = int(now // 60)
        verdict = await self._open(
            keys=[f"{PREFIX}{label}", f"{PREFIX}{label}:{minute}"],
            args=[
                self._holder,
                self._config.per_ip_concurrent,
                self._config.per_ip_per_minute,
                f"{PREFIX}lease:",
            ],
        )
        text = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        return text or None

    async def close(self, client_ip: str) -> None:
        label = _label(client_ip, self._exempt)
        if label is None:
            return
        await self._close(keys=[f"{PREFIX}{label}"], args=[self._holder])

    async def renew(self) -> None:
        await self._client.set(f"{PREFIX}lease:{self._holder}", str(time.time()), ex=self._lease)

    def start(self) -> None:
        """Keep this holder's lease alive (its counts count while it lives)."""
        self._lease_task = asyncio.ensure_future(self._keep_lease())

    async def stop(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
        with contextlib.suppress(Exception):  # the counts expire by themselves anyway
            await self._client.delete(f"{PREFIX}lease:{self._holder}")

    async def _keep_lease(self) -> None:
        while True:
            with contextlib.suppress(redis.exceptions.RedisError, OSError, TimeoutError):
                await self.renew()
            await asyncio.sleep(RENEW)


@lru_cache(maxsize=8192)
def _parse(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _label(
    client_ip: str, exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> str | None:
    """What the client is counted as (an IPv4 address, an IPv6 /64); None: exempt."""
    address = _parse(client_ip)
    if address is None:  # not an IP (a peer with no address): limited under its own name
        return client_ip.encode("utf-8", "backslashreplace").hex()
    if any(address in network for network in exempt):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)
