"""Two nodes on one PostgreSQL database and one Redis: what Redis carries (issue 8).

- a change made with the CLI of one node (a password, a disabled account)
  stops open sessions on the other node within a second (pub/sub);
- a Redis that cannot be used at start is one line and exit status 2;
- per-IP connection limits hold across the nodes (a client's third
  connection is refused by either node when it holds two);
- Redis going away while serving: logins are still throttled, by each node
  alone, with one ``shared.unavailable`` line, and ``shared.recovered`` when
  it is back (a TCP link in the test that can be cut).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import redis
from postgres_helpers import scratch_database

from .helpers import RawSMTP, Server, ServerPool, TomlValue, User, session, wait_until
from .link import link_to

ALICE = User("alice@example.com", "Alice-shared-pw-6Tz1")
REDIS_URL = os.environ.get("RELAYGATE_TEST_REDIS", "redis://127.0.0.1:6379/9")
REDIS_DB = 13  # no other test uses it


def _redis_url(port: int = 6379) -> str:
    return f"redis://127.0.0.1:{port}/{REDIS_DB}"


@pytest.fixture
def database() -> Iterator[str]:
    client = redis.Redis.from_url(_redis_url(), socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    with scratch_database() as url:
        yield url


def _node(
    pool: ServerPool, name: str, database: str, redis_url: str, **extra: dict[str, TomlValue]
) -> Server:
    sections: dict[str, dict[str, TomlValue]] = {
        "storage": {"url": database},
        "shared": {"redis_url": redis_url},
        **extra,
    }
    return pool.create(name, sections=sections, start=False, node_name=name)


def test_a_change_on_one_node_stops_open_sessions_on_the_other_within_a_second(
    database: str, fresh_servers: ServerPool
) -> None:
    a = _node(fresh_servers, "node-a", database, _redis_url())
    b = _node(fresh_servers, "node-b", database, _redis_url())
    a.cli("migrate")
    a.add_user(ALICE)
    a.start()
    b.start()
    with session(b, user=ALICE) as on_b:
        assert on_b.command("NOOP").code == 250
        a.set_password(ALICE.address, "Alice-changed-pw-2Wq5")
        changed = time.monotonic()
        time.sleep(1.0)
        reply = on_b.command(f"MAIL FROM:<{ALICE.address}>")
        assert reply.status == "530 5.7.0" and "password changed" in reply.text, str(reply)
        assert time.monotonic() - changed < 3
    new = User(ALICE.address, "Alice-changed-pw-2Wq5")
    with session(b, user=new) as on_b:
        a.cli("user", "disable", ALICE.address)
        time.sleep(1.0)
        reply = on_b.command(f"MAIL FROM:<{ALICE.address}>")
        assert reply.status == "530 5.7.0" and "account disabled" in reply.text, str(reply)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:1/0", "Connection refused"),
        ("redis://127.0.0.1:6379/99", "DB index is out of range"),
    ],
)
def test_a_redis_that_cannot_be_used_at_start_is_one_line_and_exit_2(
    database: str, fresh_servers: ServerPool, url: str, expected: str
) -> None:
    node = _node(fresh_servers, "node-x", database, url)
    node.cli("migrate")
    result = node.cli("serve", check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relaygate: shared.redis_url: "), lines
    assert expected in lines[0] or "111" in lines[0], lines
    assert "Traceback" not in result.stderr


def test_redis_away_logins_are_throttled_by_each_node_then_shared_again(
    database: str, fresh_servers: ServerPool
) -> None:
    rules: dict[str, TomlValue] = {
        "ip_per_minute": 3,
        "ip_per_day": 0,
        "network_per_minute": 0,
        "network_per_day": 0,
        "account_per_hour": 0,
        "connection_delay_after": 0,
        "connection_close_after": 0,
    }
    with link_to("127.0.0.1", 6379) as link:
        node = _node(
            fresh_servers,
            "node-r",
            database,
            _redis_url(link.port),
            auth_throttle=rules,
            connection_limits={"exempt": []},  # counted in Redis too, while it works
        )
        node.cli("migrate")
        node.add_user(ALICE)
        node.start()
        wrong = User(ALICE.address, "Wrong-pw-1")
        link.cut()
        statuses = []
        for _ in range(5):
            with session(node) as client:
                statuses.append(client.auth_plain(wrong.address, wrong.password).status)
        # Throttled all the same, on this node's own throttle.db.
        assert statuses == ["535 5.7.8"] * 3 + ["454 4.7.0"] * 2, statuses
        # One line per kind of shared state (once a minute at most), not per login.
        unavailable = [e["state"] for e in node.log_events("shared.unavailable")]
        assert unavailable.count("login_failures") == 1, unavailable
        assert unavailable.count("connection_counts") == 1, unavailable  # and let in
        assert set(unavailable) <= {"login_failures", "change_notices", "connection_counts"}
        time.sleep(2.5)  # the change relay tries again every second: it must not claim success
        assert node.log_events("shared.recovered") == [], node.log_events("shared.recovered")
        link.mend()
        time.sleep(5.5)  # RETRY: Redis is tried again
        with session(node) as client:
            # Redis decides again: it never saw the failures, so the right password is let in.
            assert client.auth_plain(ALICE.address, ALICE.password).status == "235 2.7.0"
        wait_until(
            lambda: any(
                e["state"] == "login_failures" for e in node.log_events("shared.recovered")
            ),
            10.0,
            what="shared.recovered",
        )
        recovered = [e["state"] for e in node.log_events("shared.recovered")]
        assert recovered.count("change_notices") == 1, recovered


def test_per_ip_connection_limits_hold_across_the_nodes(
    database: str, fresh_servers: ServerPool
) -> None:
    limits: dict[str, TomlValue] = {
        "per_ip_concurrent": 2,
        "per_ip_per_minute": 0,
        "exempt": ["127.0.0.1/32"],  # the readiness probes
    }
    a = _node(fresh_servers, "node-a", database, _redis_url(), connection_limits=limits)
    b = _node(fresh_servers, "node-b", database, _redis_url(), connection_limits=limits)
    a.cli("migrate")
    a.start()
    b.start()
    on_a = RawSMTP.connect(a.starttls_port, source="127.0.7.1")
    on_b = RawSMTP.connect(b.implicit_port, tls=b.client_context(), source="127.0.7.1")
    try:
        assert on_a.greeting.code == 220 and on_b.greeting.code == 220
        # Each node alone holds one: only the cluster's count refuses the third.
        for node in (a, b):
            with RawSMTP.connect(node.starttls_port, source="127.0.7.1") as third:
                assert third.greeting.status == "421 4.7.0", str(third.greeting)
                assert third.wait_closed(5)
        with RawSMTP.connect(a.starttls_port, source="127.0.8.1") as other:
            assert other.greeting.code == 220  # another client
    finally:
        on_b.close()

    def room_on_a() -> bool:
        with RawSMTP.connect(a.starttls_port, source="127.0.7.1") as client:
            return client.greeting.code == 220

    try:
        wait_until(room_on_a, 5, 0.1, "node-b's closed connection to be uncounted")
    finally:
        on_a.close()
    refused = [e for e in a.log_events("connect.refused") + b.log_events("connect.refused")]
    assert {(e["client_ip"], e["reason"]) for e in refused} == {("127.0.7.1", "ip_concurrent")}
