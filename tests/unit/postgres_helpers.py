"""A PostgreSQL database of its own for a test, dropped afterwards.

The server comes from RELAYGATE_TEST_POSTGRES (default: the local one, trust
auth). Tests that need it fail, never skip, when it is not there: CI starts
it (.ci/run).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict

ADMIN_URL = os.environ.get(
    "RELAYGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new empty database; yields its URL."""
    name = "relaygate_test_" + secrets.token_hex(6)
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise AssertionError(
            f"PostgreSQL is needed at {ADMIN_URL} (RELAYGATE_TEST_POSTGRES): {exc}"
        ) from None
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(ADMIN_URL)
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host") or "127.0.0.1"
    port = params.get("port") or 5432
    try:
        yield f"postgresql://{user}{host}:{port}/{name}"  # the form [storage] url takes
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
