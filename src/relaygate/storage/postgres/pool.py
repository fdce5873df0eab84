"""Connecting to PostgreSQL: one pool per process, opened with a clear error.

Every problem a user can cause (a bad URL, a wrong password, a database that
is not there or not reachable, a server too old, a schema from a newer
relaygate) becomes a PostgresUnavailable with one line to print; the CLI and
``serve`` exit 2 with it, never with a traceback.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from relaygate.storage.postgres import schema

CONNECT_TIMEOUT = 5.0  # seconds to reach the server before saying it cannot be reached


class PostgresUnavailable(Exception):
    """The database cannot be used; the message is one line for the user."""


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or 5432)
    user = str(params.get("user") or "")
    database = str(params.get("dbname") or user)
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{database}"


def _problem(url: str, exc: BaseException) -> PostgresUnavailable:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return PostgresUnavailable(f"{describe(url)}: {text}")


async def connect(url: str) -> psycopg.AsyncConnection[object]:
    """One connection (autocommit), for migrations and one-off commands."""
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        text = " ".join(str(exc).split())
        raise PostgresUnavailable(f"[storage] url is not a valid PostgreSQL URL: {text}") from None
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
        )
    except psycopg.Error as exc:
        raise _problem(url, exc) from None


async def migrate(url: str) -> tuple[int, int]:
    """Create or upgrade the schema; (version before, after)."""
    connection = await connect(url)
    try:
        return await schema.migrate(connection)
    except schema.SchemaError as exc:
        raise PostgresUnavailable(f"{describe(url)}: {exc}") from None
    except psycopg.Error as exc:
        raise _problem(url, exc) from None
    finally:
        await connection.close()


async def check_schema(url: str) -> None:
    """Refuse a database whose schema is not this relaygate's (run migrate)."""
    connection = await connect(url)
    try:
        if connection.info.server_version < schema.MINIMUM_SERVER:
            raise PostgresUnavailable(
                f"{describe(url)}: PostgreSQL {connection.info.server_version // 10000}"
                " is too old; relaygate needs 13 or later"
            )
        version = await schema.current_version(connection)
    except psycopg.Error as exc:
        raise _problem(url, exc) from None
    finally:
        await connection.close()
    if version != schema.SCHEMA_VERSION:
        raise PostgresUnavailable(
            f"{describe(url)}: schema version {version}, this relaygate needs"
            f" {schema.SCHEMA_VERSION}; run `relaygate migrate`"
        )


async def open_pool(url: str, size: int, *, name: str = "relaygate") -> AsyncConnectionPool:
    """An open pool of ``size`` connections; fails fast when the server is not there.

    Connections are autocommit: a unit of work opens its own transaction
    (``async with connection.transaction()``), and a read needs none. When
    the server goes away later, the pool keeps trying to reconnect; callers
    see psycopg errors meanwhile and answer with temporary failures.
    """
    probe = await connect(url)  # its error names the reason; the pool's would not
    await probe.close()
    pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max(1, size),
        kwargs={"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT)},
        name=name,
        open=False,
        timeout=CONNECT_TIMEOUT,
    )
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
    except Exception as exc:
        await pool.close()
        raise _problem(url, exc) from None
    return pool
