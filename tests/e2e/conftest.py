"""Fixtures that run real relaygate servers.

- ``server``: one shared server for the whole run (workers = 1, the standard
  users alice/bob/carol, small size and recipient limits). Tests on it use
  their own subjects and never change its accounts, so they do not interfere.
- ``servers``: a pool for servers one module needs for itself (other limits,
  workers = 2); they stop when the module ends.
- ``fresh_servers``: a pool for one test that starts, kills or stops servers.

Every server gets its own config (data_dir, log file and two free ports on
127.0.0.1: STARTTLS and implicit TLS; cheap argon2 settings; failed-login
throttling and sending quotas off unless a test turns them on, see
``helpers.RELAXED_SECTIONS``) and its users are made with the CLI before it
starts. At teardown every server gets SIGTERM and must exit with status 0
within 15 s (it is killed otherwise), and its log must hold no password or
AUTH payload that any test sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import STANDARD_LIMITS, STANDARD_USERS, Server, ServerPool


def _finish(pool: ServerPool) -> None:
    problems = pool.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pool = ServerPool(tmp_path_factory.mktemp("e2e-shared"))
    yield pool.create("shared", limits=STANDARD_LIMITS, users=STANDARD_USERS)
    _finish(pool)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("e2e-module"))
    yield pool
    _finish(pool)


@pytest.fixture
def fresh_servers(tmp_path: Path) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path / "servers")
    yield pool
    _finish(pool)
