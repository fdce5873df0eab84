"""Failed-login windows in Redis (storage.api.LoginFailures), shared by every node.

The rules are throttle.py's, to the letter (the contract tests hold both
backends to the same verdicts); only the storage differs. Each window is a
sorted set scored by time: failures of a client IP, of its network, of a user
name; attempts being checked (pending) likewise, with PENDING_TTL; an
account's known networks are a hash. ``reserve`` and ``check`` are one Lua
script each call, so checking every rule and counting the attempt is atomic
across all workers of all nodes: 50 parallel guesses against a limit of 10
get 10 secrets checked wherever they land. Keys expire with their windows,
so there is nothing to prune.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio

from relaygate.config import AuthThrottleConfig
from relaygate.throttle import (
    DAY,
    HOUR,
    PENDING_TTL,
    WAIT,
    Reservation,
    ThrottleScope,
    Verdict,
    Wait,
    address_and_network,
    username_key,
)

PREFIX = "relaygate:auth:"

# KEYS: failures ip, network, account; pending ip, network, account; known
# networks of the account; the id sequence. ARGV: now, mode, the five limits,
# known_network_days, network, PENDING_TTL.
_DECIDE = """
local now = tonumber(ARGV[1])
local mode = ARGV[2]
local ip_min, ip_day = tonumber(ARGV[3]), tonumber(ARGV[4])
local net_min, net_day = tonumber(ARGV[5]), tonumber(ARGV[6])
local acct_hour, known_days = tonumber(ARGV[7]), tonumber(ARGV[8])
local network, pending_ttl = ARGV[9], tonumber(ARGV[10])
local MIN, HOUR, DAY = 60, 3600, 86400

local function window(key, span)
  local lo = '(' .. string.format('%.6f', now - span)
  local n = redis.call('ZCOUNT', key, lo, '+inf')
  if n == 0 then return 0, nil end
  local first = redis.call('ZRANGEBYSCORE', key, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  return n, tonumber(first[2])
end

local network_rules = ip_min > 0 or ip_day > 0 or net_min > 0 or net_day > 0
local counts = {0, 0, 0, 0}
local recent = 0
if network_rules then
  local c1, o1 = window(KEYS[1], MIN)
  local c2, o2 = window(KEYS[1], DAY)
  local c3, o3 = window(KEYS[2], MIN)
  local c4, o4 = window(KEYS[2], DAY)
  counts = {c1, c2, c3, c4}
  recent = c1
  local rules = {
    {ip_min, c1, o1, MIN, 'ip'}, {ip_day, c2, o2, DAY, 'ip'},
    {net_min, c3, o3, MIN, 'network'}, {net_day, c4, o4, DAY, 'network'},
  }
  local scope = nil
  local retry = 0
  for _, r in ipairs(rules) do
    if r[1] > 0 and r[2] >= r[1] and r[3] ~= nil then
      scope = scope or r[5]
      retry = math.max(retry, r[3] + r[4] - now)
    end
  end
  if scope ~= nil then return {'v', scope, string.format('%.6f', retry), recent} end
end

local account, exempt = 0, true
if acct_hour > 0 then
  local oldest
  account, oldest = window(KEYS[3], HOUR)
  local known = redis.call('HGET', KEYS[7], network)
  exempt = known ~= false and tonumber(known) > now - known_days * DAY
  if account >= acct_hour and not exempt then
    return {'v', 'account', string.format('%.6f', oldest + HOUR - now), recent}
  end
end
if mode == 'check' then return {'ok', '', '0', recent} end

local fresh = string.format('%.6f', now - pending_ttl)
for i = 4, 6 do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', fresh) end
if network_rules then
  local pending_ip = redis.call('ZCARD', KEYS[4])
  local pending_net = redis.call('ZCARD', KEYS[5])
  if pending_net > 0 then
    local over = {{ip_min, counts[1], pending_ip}, {ip_day, counts[2], pending_ip},
                  {net_min, counts[3], pending_net}, {net_day, counts[4], pending_net}}
    for _, r in ipairs(over) do
      if r[1] > 0 and r[2] + r[3] >= r[1] then return {'w', '', '0', recent} end
    end
  end
end
if acct_hour > 0 and not exempt then
  if account + redis.call('ZCARD', KEYS[6]) >= acct_hour then return {'w', '', '0', recent} end
end

local id = redis.call('INCR', KEYS[8])
for i = 4, 6 do
  redis.call('ZADD', KEYS[i], now, id)
  redis.call('EXPIRE', KEYS[i], math.ceil(pending_ttl) + 10)
end
return {'r', tostring(id), '0', recent + 1}
"""

# KEYS: failures ip, network, account; pending ip, network, account. ARGV: id, ts, now.
_FAIL = """
local removed = redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
if removed == 0 then return 0 end
local now = tonumber(ARGV[3])
local spans = {86400, 86400, 3600}
for i = 1, 3 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%.6f', now - spans[i]))
  redis.call('EXPIRE', KEYS[i], spans[i] + 60)
end
return 1
"""

_RECENT_LIMIT = 10_000


def _keys(ip: str, network: str, account: str) -> list[str]:
    return [
        f"{PREFIX}f:ip:{ip}",
        f"{PREFIX}f:net:{network}",
        f"{PREFIX}f:acct:{account}",
        f"{PREFIX}p:ip:{ip}",
        f"{PREFIX}p:net:{network}",
        f"{PREFIX}p:acct:{account}",
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLoginFailures:
    def __init__(self, client: redis.asyncio.Redis, config: AuthThrottleConfig) -> None:
        self._client = client
        self._config = config
        self._decide = client.register_script(_DECIDE)
        self._fail = client.register_script(_FAIL)
        self._recent: dict[tuple[str, str], float] = {}  # record_success, once an hour

    async def _run(
        self, client_ip: str, username: str, now: float, mode: str
    ) -> tuple[Verdict | Reservation | Wait | None, tuple[str, str, str]]:
        ip, network = address_and_network(client_ip)
        account = username_key(username)
        c = self._config
        keys = [*_keys(ip, network, account), f"{PREFIX}known:{account}", f"{PREFIX}seq"]
        args: list[str | int | float] = [
            repr(now),
            mode,
            c.ip_per_minute,
            c.ip_per_day,
            c.network_per_minute,
            c.network_per_day,
            c.account_per_hour,
            c.known_network_days,
            network,
            PENDING_TTL,
        ]
        kind, value, retry, recent = await self._decide(keys=keys, args=args)
        kind = _text(kind)
        where = (ip, network, account)
        if kind == "v":
            scope: ThrottleScope = _text(value)  # type: ignore[assignment]
            return Verdict(scope, float(_text(retry))), where
        if kind == "w":
            return WAIT, where
        if kind == "r":
            return Reservation(int(_text(value)), int(recent), (ip, network, account, now)), where
        return None, where

    async def check(self, client_ip: str, username: str, now: float) -> Verdict | None:
        result, _ = await self._run(client_ip, username, now, "check")
        return result if isinstance(result, Verdict) else None

    async def reserve(
        self, client_ip: str, username: str, now: float
    ) -> Verdict | Reservation | Wait:
        result, _ = await self._run(client_ip, username, now, "reserve")
        assert result is not None  # reserve always decides
        return result

    async def release(self, reservation: Reservation) -> None:
        assert reservation.shared is not None
        ip, network, account, _ = reservation.shared
        _, _, _, p_ip, p_net, p_acct = _keys(ip, network, account)
        async with self._client.pipeline(transaction=True) as pipe:
            for key in (p_ip, p_net, p_acct):
                pipe.zrem(key, str(reservation.rowid))
            await pipe.execute()

    async def fail(self, reservation: Reservation) -> None:
        assert reservation.shared is not None
        ip, network, account, ts = reservation.shared
        await self._fail(
            keys=_keys(ip, network, account), args=[str(reservation.rowid), repr(ts), repr(ts)]
        )

    async def record_success(self, client_ip: str, account: str, now: float) -> None:
        network = address_and_network(client_ip)[1]
        key = (username_key(account), network)
        last = self._recent.get(key)
        if last is not None and now - last < HOUR:
            return
        name = f"{PREFIX}known:{key[0]}"
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(name, network, repr(now))
            pipe.expire(name, int(self._config.known_network_days * DAY) + 60)
            await pipe.execute()
        if len(self._recent) >= _RECENT_LIMIT:
            self._recent.clear()
        self._recent[key] = now

    async def prune(self, now: float) -> None:
        """Keys expire with their windows; only the memo is trimmed."""
        self._recent = {k: t for k, t in self._recent.items() if time.time() - t < HOUR}
