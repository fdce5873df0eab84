"""storage/postgres/schema.py on a real PostgreSQL: idempotent, safe in parallel, versioned."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from postgres_helpers import scratch_database

from relaygate.storage.postgres.schema import SCHEMA_VERSION, SchemaError, migrate


async def _migrate(url: str) -> tuple[int, int]:
    async with await psycopg.AsyncConnection.connect(url) as connection:
        return await migrate(connection)


def test_migrate_creates_then_does_nothing() -> None:
    with scratch_database() as url:
        assert asyncio.run(_migrate(url)) == (0, SCHEMA_VERSION)
        assert asyncio.run(_migrate(url)) == (SCHEMA_VERSION, SCHEMA_VERSION)
        with psycopg.connect(url) as db:
            tables = {row[0] for row in db.execute("SELECT tablename FROM pg_tables")}
        assert {"messages", "message_bodies", "delivery_attempts"} <= tables


def test_nodes_migrating_at_once_apply_each_step_once() -> None:
    async def together(url: str) -> list[tuple[int, int]]:
        return list(await asyncio.gather(*(_migrate(url) for _ in range(4))))

    with scratch_database() as url:
        results = asyncio.run(together(url))
        assert sorted(results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3
        with psycopg.connect(url) as db:
            assert db.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)


def test_a_newer_schema_is_refused_with_a_clear_error() -> None:
    with scratch_database() as url:
        asyncio.run(_migrate(url))
        with psycopg.connect(url) as db:
            db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
        with pytest.raises(SchemaError, match="newer than this relaygate"):
            asyncio.run(_migrate(url))
