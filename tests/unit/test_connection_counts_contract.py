"""storage.api.ConnectionCounts on one machine (server/connlimit.py, the mmap
every worker shares) and across nodes (Redis): the same connections get the
same verdicts from both (issue 8). Redis-only: counts held by a node that died
stop counting when its lease runs out.

Redis is the test server of RELAYGATE_TEST_REDIS (flushed per test); these
tests fail, never skip, without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
from redis_helpers import REDIS_URL, flush_test_redis

from relaygate.config import ConnectionLimitsConfig
from relaygate.server.connlimit import ConnectionLimiter
from relaygate.storage.api import ConnectionCounts
from relaygate.storage.redis.client import open_client
from relaygate.storage.redis.connections import RedisConnectionCounts

T0 = 1_800_000_000.0  # the start of a minute


class LocalCounts:
    """The machine's limiter seen through the async interface."""

    def __init__(self, limiter: ConnectionLimiter) -> None:
        self._limiter = limiter

    async def open(self, client_ip: str, now: float) -> str | None:
        return self._limiter.open(client_ip, now)

    async def close(self, client_ip: str) -> None:
        self._limiter.close(client_ip)


@pytest.fixture(params=["local", "redis"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis":
        flush_test_redis()
    yield str(request.param)


@asynccontextmanager
async def _two_nodes(
    kind: str, config: ConnectionLimitsConfig
) -> AsyncIterator[tuple[ConnectionCounts, ConnectionCounts]]:
    """Two places connections arrive: two workers of one machine, or two nodes."""
    if kind == "local":
        limiter = ConnectionLimiter(config)
        yield LocalCounts(limiter), LocalCounts(limiter)
        return
    client = open_client(REDIS_URL)
    a = RedisConnectionCounts(client, config, "node-a:1")
    b = RedisConnectionCounts(client, config, "node-b:2")
    try:
        await a.renew()
        await b.renew()
        yield a, b
    finally:
        await client.aclose()


def _run(
    kind: str,
    config: ConnectionLimitsConfig,
    work: Callable[[ConnectionCounts, ConnectionCounts], Awaitable[Any]],
) -> Any:
    async def go() -> Any:
        async with _two_nodes(kind, config) as (a, b):
            return await work(a, b)

    return asyncio.run(go())


NO_EXEMPT = ConnectionLimitsConfig(per_ip_concurrent=0, per_ip_per_minute=0, exempt=())


def test_concurrent_connections_are_counted_wherever_they_arrive(kind: str) -> None:
    config = ConnectionLimitsConfig(per_ip_concurrent=3, per_ip_per_minute=0, exempt=())

    async def work(a: ConnectionCounts, b: ConnectionCounts) -> None:
        assert [await a.open("192.0.2.1", T0), await b.open("192.0.2.1", T0)] == [None, None]
        assert await a.open("192.0.2.1", T0) is None
        assert await b.open("192.0.2.1", T0) == "concurrent"
        assert await a.open("192.0.2.1", T0) == "concurrent"  # the refused are not counted
        assert await b.open("192.0.2.2", T0) is None  # another client
        await a.close("192.0.2.1")
        assert await b.open("192.0.2.1", T0 + 1) is None
        assert await a.open("192.0.2.1", T0 + 1) == "concurrent"

    _run(kind, config, work)


def test_connections_per_minute_are_counted_wherever_they_arrive(kind: str) -> None:
    config = ConnectionLimitsConfig(per_ip_concurrent=0, per_ip_per_minute=4, exempt=())

    async def work(a: ConnectionCounts, b: ConnectionCounts) -> None:
        for node in (a, b, a, b):
            assert await node.open("192.0.2.1", T0 + 10) is None
            await node.close("192.0.2.1")
        assert await a.open("192.0.2.1", T0 + 59.9) == "rate"
        assert await b.open("192.0.2.1", T0 + 59.9) == "rate"
        assert await b.open("192.0.2.1", T0 + 60) is None  # a new minute

    _run(kind, config, work)


def test_exempt_networks_are_never_refused(kind: str) -> None:
    config = ConnectionLimitsConfig(
        per_ip_concurrent=1, per_ip_per_minute=1, exempt=("10.0.0.0/8", "::1/128")
    )

    async def work(a: ConnectionCounts, b: ConnectionCounts) -> None:
        for ip in ("10.1.2.3", "::ffff:10.1.2.3", "::1"):
            assert [await a.open(ip, T0), await b.open(ip, T0), await a.open(ip, T0)] == [None] * 3
        assert await a.open("192.0.2.9", T0) is None
        assert await b.open("192.0.2.9", T0) == "concurrent"

    _run(kind, config, work)


def test_ipv6_clients_count_per_slash_64(kind: str) -> None:
    config = ConnectionLimitsConfig(per_ip_concurrent=2, per_ip_per_minute=0, exempt=())

    async def work(a: ConnectionCounts, b: ConnectionCounts) -> None:
        assert await a.open("2001:db8:1:2::10", T0) is None
        assert await b.open("2001:db8:1:2:ffff::1", T0) is None
        assert await a.open("2001:db8:1:2::99", T0) == "concurrent"  # same /64
        assert await b.open("2001:db8:1:3::10", T0) is None  # the next /64
        assert await a.open("::ffff:192.0.2.7", T0) is None  # mapped IPv4 is IPv4
        assert await b.open("192.0.2.7", T0) is None
        assert await a.open("192.0.2.7", T0) == "concurrent"

    _run(kind, config, work)


def test_a_peer_without_an_address_is_limited_under_its_own_name(kind: str) -> None:
    async def work(a: ConnectionCounts, b: ConnectionCounts) -> None:
        assert await a.open("?", T0) is None
        assert await b.open("?", T0) == "concurrent"
        assert await b.open("192.0.2.1", T0) is None

    _run(kind, ConnectionLimitsConfig(1, 0, exempt=()), work)


# ------------------------------------------------------------------ Redis only


def test_the_counts_of_a_node_that_died_stop_counting_when_its_lease_runs_out() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    client.flushdb()
    config = ConnectionLimitsConfig(per_ip_concurrent=2, per_ip_per_minute=0, exempt=())

    async def go() -> None:
        shared = open_client(REDIS_URL)
        try:
            dying = RedisConnectionCounts(shared, config, "node-a:1", lease=1)
            alive = RedisConnectionCounts(shared, config, "node-b:2", lease=30)
            await dying.renew()
            await alive.renew()
            assert await dying.open("192.0.2.1", T0) is None
            assert await dying.open("192.0.2.1", T0) is None
            assert await alive.open("192.0.2.1", T0) == "concurrent"
            # node-a is killed: it never closes, never renews.
            await asyncio.sleep(1.3)
            assert await alive.open("192.0.2.1", T0 + 2) is None
            assert await alive.open("192.0.2.1", T0 + 2) is None
            assert await alive.open("192.0.2.1", T0 + 2) == "concurrent"
        finally:
            await shared.aclose()

    try:
        asyncio.run(go())
        # Nothing left behind without an expiry.
        for key in client.scan_iter("relaygate:conn:*"):
            assert client.ttl(key) > 0, key
    finally:
        client.close()


def test_a_node_that_stops_cleanly_gives_its_counts_back_at_once() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    client.flushdb()
    config = ConnectionLimitsConfig(per_ip_concurrent=1, per_ip_per_minute=0, exempt=())

    async def go() -> None:
        shared = open_client(REDIS_URL)
        try:
            stopping = RedisConnectionCounts(shared, config, "node-a:1")
            other = RedisConnectionCounts(shared, config, "node-b:2")
            stopping.start()
            await other.renew()
            await asyncio.sleep(0.05)
            assert await stopping.open("192.0.2.1", T0) is None
            assert await other.open("192.0.2.1", T0) == "concurrent"
            await stopping.stop()
            assert await other.open("192.0.2.1", T0) is None
        finally:
            await shared.aclose()

    try:
        asyncio.run(go())
    finally:
        client.close()
