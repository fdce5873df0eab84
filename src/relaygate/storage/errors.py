"""What a storage backend raises when it cannot answer (a lock held too long, a
database or Redis gone): callers turn these into temporary failures (451, 454)."""

from __future__ import annotations

import sqlite3

import psycopg
import redis.exceptions

STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.Error,
    psycopg.Error,
    redis.exceptions.RedisError,
    OSError,
)
