"""storage.api.LoginFailures on the node-local backend (throttle.db) and on Redis:
the same sequence of attempts gets the same verdicts from both (issue 8).

Redis is the test server of RELAYGATE_TEST_REDIS (flushed per test); these
tests fail, never skip, without it.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis_helpers import REDIS_URL, flush_test_redis

from relaygate import logs
from relaygate.config import AuthThrottleConfig
from relaygate.storage.api import LoginFailures
from relaygate.storage.redis.client import open_client
from relaygate.storage.redis.fallback import FallbackLoginFailures, SharedHealth
from relaygate.storage.redis.login_failures import RedisLoginFailures
from relaygate.storage.sqlite import connect_state
from relaygate.storage.sqlite_accounts import same
from relaygate.storage.sqlite_throttle import SQLiteLoginFailures
from relaygate.storage.thread import DatabaseThread
from relaygate.throttle import Reservation, Verdict, Wait

T0 = 1_900_000_000.0
OFF = AuthThrottleConfig(
    ip_per_minute=0,
    ip_per_day=0,
    network_per_minute=0,
    network_per_day=0,
    account_per_hour=0,
)


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis":
        flush_test_redis()
    yield str(request.param)


@asynccontextmanager
async def _failures(kind: str, tmp: Path, config: AuthThrottleConfig) -> AsyncIterator[Any]:
    if kind == "sqlite":
        thread = DatabaseThread(
            lambda: connect_state(tmp / "throttle.db"), asyncio.get_running_loop(), "t"
        )
        try:
            yield SQLiteLoginFailures(thread, config, same)
        finally:
            await asyncio.to_thread(thread.close)
        return
    client = open_client(REDIS_URL)
    try:
        yield RedisLoginFailures(client, config)
    finally:
        await client.aclose()


def _run(kind: str, tmp: Path, config: AuthThrottleConfig, work: Any) -> Any:
    async def go() -> Any:
        async with _failures(kind, tmp, config) as failures:
            return await work(failures)

    return asyncio.run(go())


async def _guess(f: LoginFailures, ip: str, user: str, now: float) -> Verdict | Wait | str:
    result = await f.reserve(ip, user, now)
    if isinstance(result, Reservation):
        await f.fail(result)
        return "checked"
    return result


def test_the_ip_rule_and_when_it_lifts(kind: str, tmp_path: Path) -> None:
    config = AuthThrottleConfig(**{**OFF.__dict__, "ip_per_minute": 3})

    async def work(f: LoginFailures) -> None:
        for n in range(3):
            assert await _guess(f, "192.0.2.7", f"u{n}@x", T0 + n) == "checked"
        verdict = await f.reserve("192.0.2.7", "other@x", T0 + 10)
        assert isinstance(verdict, Verdict) and verdict.scope == "ip"
        assert verdict.retry_after == pytest.approx(50.0)  # the oldest leaves at T0 + 60
        assert await f.check("192.0.2.7", "other@x", T0 + 10) == verdict
        assert await f.check("192.0.2.8", "other@x", T0 + 10) is None  # its neighbour: fine
        assert await f.check("192.0.2.7", "other@x", T0 + 60.5) is None  # one left the window
        reservation = await f.reserve("192.0.2.7", "other@x", T0 + 60.5)
        assert isinstance(reservation, Reservation) and reservation.recent == 3

    _run(kind, tmp_path, config, work)


def test_attempts_being_checked_count_and_make_others_wait(kind: str, tmp_path: Path) -> None:
    config = AuthThrottleConfig(**{**OFF.__dict__, "ip_per_minute": 3})

    async def work(f: LoginFailures) -> None:
        assert await _guess(f, "192.0.2.7", "a@x", T0) == "checked"
        held = [await f.reserve("192.0.2.7", "a@x", T0 + 1) for _ in range(2)]
        assert isinstance(held[0], Reservation) and isinstance(held[1], Reservation)
        assert isinstance(await f.reserve("192.0.2.7", "a@x", T0 + 2), Wait)
        await f.release(held[0])  # right password: no failure
        third = await f.reserve("192.0.2.7", "a@x", T0 + 3)
        assert isinstance(third, Reservation)
        await f.fail(held[1])
        await f.fail(third)
        refused = await f.reserve("192.0.2.7", "a@x", T0 + 4)
        assert isinstance(refused, Verdict) and refused.retry_after == pytest.approx(56.0)

    _run(kind, tmp_path, config, work)


def test_the_network_rule_catches_many_addresses_of_one_network(kind: str, tmp_path: Path) -> None:
    config = AuthThrottleConfig(**{**OFF.__dict__, "ip_per_minute": 3, "network_per_minute": 4})

    async def work(f: LoginFailures) -> None:
        for n in range(4):
            assert await _guess(f, f"198.51.100.{n + 1}", "a@x", T0 + n) == "checked"
        verdict = await f.reserve("198.51.100.200", "a@x", T0 + 5)
        assert isinstance(verdict, Verdict) and verdict.scope == "network"
        assert await f.check("198.51.101.1", "a@x", T0 + 5) is None
        # IPv6: one /64 is one network.
        for n in range(4):
            await _guess(f, f"2001:db8:1:2::{n + 1}", "a@x", T0 + n)
        v6 = await f.check("2001:db8:1:2:ffff::9", "a@x", T0 + 5)
        assert isinstance(v6, Verdict) and v6.scope == "network"

    _run(kind, tmp_path, config, work)


def test_the_account_rule_spares_the_owners_known_network(kind: str, tmp_path: Path) -> None:
    config = AuthThrottleConfig(**{**OFF.__dict__, "account_per_hour": 3})

    async def work(f: LoginFailures) -> None:
        await f.record_success("203.0.113.5", "Alice@Example.com", T0)
        for n in range(3):
            assert await _guess(f, f"192.0.{n}.9", "alice@example.com", T0 + n) == "checked"
        stranger = await f.reserve("192.0.9.9", "ALICE@example.com", T0 + 10)
        assert isinstance(stranger, Verdict) and stranger.scope == "account"
        assert stranger.retry_after == pytest.approx(3590.0)
        owner = await f.reserve("203.0.113.77", "alice@example.com", T0 + 10)
        assert isinstance(owner, Reservation)
        await f.release(owner)
        assert await f.check("192.0.9.9", "bob@example.com", T0 + 10) is None

    _run(kind, tmp_path, config, work)


def test_fifty_guesses_at_once_get_ten_secrets_checked(kind: str, tmp_path: Path) -> None:
    """Parallel attempts, on several connections to the backend, never get more
    secrets checked than the limit allows."""
    config = AuthThrottleConfig(**{**OFF.__dict__, "ip_per_minute": 10})

    async def work(first: LoginFailures) -> None:
        async with (
            _failures(kind, tmp_path, config) as second,
            _failures(kind, tmp_path, config) as third,
        ):
            backends = [first, second, third]
            results = await asyncio.gather(
                *(backends[n % 3].reserve("192.0.2.50", "a@x", T0) for n in range(50))
            )
            checked = [r for r in results if isinstance(r, Reservation)]
            assert len(checked) == 10
            assert all(isinstance(r, Wait | Verdict) for r in results if r not in checked)
            for r in checked:
                await first.fail(r)
            assert isinstance(await third.reserve("192.0.2.50", "a@x", T0 + 1), Verdict)

    _run(kind, tmp_path, config, work)


def test_redis_away_the_node_throttles_on_its_own_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = io.StringIO()
    monkeypatch.setattr(logs._sink, "stream", log)
    config = AuthThrottleConfig(**{**OFF.__dict__, "ip_per_minute": 2})

    async def go() -> None:
        gone = redis.asyncio.Redis.from_url(
            "redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5
        )
        async with _failures("sqlite", tmp_path, config) as local:
            health = SharedHealth("login_failures")
            f = FallbackLoginFailures(RedisLoginFailures(gone, config), local, health)
            assert await _guess(f, "192.0.2.7", "a@x", T0) == "checked"
            assert await _guess(f, "192.0.2.7", "a@x", T0 + 1) == "checked"
            verdict = await f.reserve("192.0.2.7", "a@x", T0 + 2)
            assert isinstance(verdict, Verdict) and verdict.scope == "ip"
        await gone.aclose()

    asyncio.run(go())
    lines = [line for line in log.getvalue().splitlines() if "event=shared." in line]
    assert len(lines) == 1 and "shared.unavailable" in lines[0], lines
