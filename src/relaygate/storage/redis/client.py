"""One Redis client per process, with timeouts short enough that a Redis that
stalls costs a session about a second before the node falls back to its own
state (storage/redis/fallback.py)."""

from __future__ import annotations

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

TIMEOUT = 1.0  # seconds for a connection or a command


class RedisUnavailable(Exception):
    """Redis cannot be used; the text is one line for the user."""


def open_client(url: str) -> redis.asyncio.Redis:
    """A client (connections are made on first use). Raises RedisUnavailable for a
    URL redis-py cannot read."""
    try:
        return redis.asyncio.Redis.from_url(
            url,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            health_check_interval=30,
            # One more try on a fresh connection (a pooled one the network cut),
            # none after a timeout: a stalled Redis costs one TIMEOUT, not redis-py's
            # default of ten tries with back-off.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        )
    except (ValueError, redis.exceptions.RedisError) as exc:
        raise RedisUnavailable(f"{describe(url)}: {exc}") from None


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}://{user + '@' if user else ''}{host}"


async def check(url: str) -> None:
    """Connect and PING once (``serve`` at start). Raises RedisUnavailable."""
    client = open_client(url)
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RedisUnavailable(f"{describe(url)}: {reason}") from None
    finally:
        await client.aclose()
