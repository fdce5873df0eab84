"""The test Redis (RELAYGATE_TEST_REDIS): tests fail, never skip, without it."""

from __future__ import annotations

import os

import redis

REDIS_URL = os.environ.get("RELAYGATE_TEST_REDIS", "redis://127.0.0.1:6379/9")


def flush_test_redis() -> None:
    """Empty the test database, so each test starts from nothing."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
