"""Logins under concurrency and storage stalls (issue 7, items 3, 4 and 7).

- Item 3: the failed-login limit holds however many attempts arrive at once,
  across worker processes, for PLAIN and for SCRAM (the throttle reserves a
  slot before any secret is checked).
- Item 4: SCRAM decoy salts come from a server secret kept in the database, so
  an unknown name gets one salt in every worker and after a restart, like a
  real account does.
- Item 7: a database held locked by another process freezes nothing but the
  logins that need it, and those end with a clear reply, never a wedge.
"""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import scramp

from relaygate.storage.sqlite import connect_state

from .helpers import (
    ALICE,
    CAROL,
    RawSMTP,
    Server,
    ServerPool,
    TomlValue,
    b64,
    make_message,
    remember_credentials,
    session,
)
from .security_helpers import scram_exchange

T = TypeVar("T")
PARALLEL = 50
LIMIT = 10
NO_DELAYS: dict[str, TomlValue] = {
    "ip_per_minute": LIMIT,
    "ip_per_day": 0,
    "network_per_minute": 0,
    "network_per_day": 0,
    "account_per_hour": 0,
    "connection_delay_after": 0,
    "connection_close_after": 0,
}


def parallel(count: int, attempt: Callable[[threading.Barrier], T]) -> list[T]:
    """Run ``attempt(barrier)`` in ``count`` threads that all pass the barrier together."""
    barrier = threading.Barrier(count, timeout=30)
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(attempt, barrier) for _ in range(count)]
        return [f.result(timeout=90) for f in futures]


def test_parallel_plain_guesses_get_no_more_checks_than_the_limit(
    fresh_servers: ServerPool,
) -> None:
    server = fresh_servers.create(
        "parallel-plain", workers=2, users=[ALICE], sections={"auth_throttle": NO_DELAYS}
    )

    def attempt(barrier: threading.Barrier) -> str:
        with session(server, source="127.0.3.1") as client:
            barrier.wait()
            return client.auth_plain(ALICE.address, "Wrong-pw-1Aa").status

    statuses = Counter(parallel(PARALLEL, attempt))
    assert statuses == {"535 5.7.8": LIMIT, "454 4.7.0": PARALLEL - LIMIT}, statuses
    # Both workers took part (the limit holds across processes, not only within one).
    served = {e["session"] for e in server.log_events("auth.fail")}
    assert len(served) == LIMIT


def test_parallel_scram_exchanges_get_no_more_proofs_checked_than_the_limit(
    fresh_servers: ServerPool,
) -> None:
    server = fresh_servers.create(
        "parallel-scram", workers=2, users=[ALICE], sections={"auth_throttle": NO_DELAYS}
    )

    def attempt(barrier: threading.Barrier) -> list[int]:
        with session(server, source="127.0.4.1") as client:
            barrier.wait()
            return scram_exchange(client, "SCRAM-SHA-256", ALICE.address, "Wrong-pw-2Bb").codes

    runs = parallel(PARALLEL, attempt)
    proofs_checked = [codes for codes in runs if codes == [334, 535]]
    refused_first = [codes for codes in runs if codes == [454]]
    assert len(proofs_checked) == LIMIT, Counter(tuple(codes) for codes in runs)
    assert len(refused_first) == PARALLEL - LIMIT
    # And the right password from there is refused too, without its proof being checked.
    with session(server, source="127.0.4.1") as client:
        assert scram_exchange(client, "SCRAM-SHA-256", ALICE.address, ALICE.password).codes == [454]


def _salt(server: Server, user: str) -> bytes:
    with session(server) as client:
        client_first = scramp.ScramClient(["SCRAM-SHA-256"], user, "x").get_client_first()
        reply = client.command(f"AUTH SCRAM-SHA-256 {b64(client_first)}")
        assert reply.code == 334, str(reply)
        server_first = base64.b64decode(reply.text).decode()
        client.command("*")  # cancel: nothing more to learn
    attributes = dict(part.split("=", 1) for part in server_first.split(","))
    return base64.b64decode(attributes["s"])


def test_scram_salts_are_stable_for_every_name_across_workers_and_restarts(
    fresh_servers: ServerPool,
) -> None:
    server = fresh_servers.create("salts", workers=2, users=[ALICE, CAROL])
    names = [ALICE.address, CAROL.address, "nobody@example.com", "Nobody@Example.com"]
    first = {name: {_salt(server, name) for _ in range(8)} for name in names}
    assert all(len(salts) == 1 for salts in first.values()), first
    # Case does not matter, as for a real account.
    assert first["nobody@example.com"] == first["Nobody@Example.com"]
    # Decoys look like real salts.
    assert {len(next(iter(s))) for s in first.values()} == {len(next(iter(first[ALICE.address])))}
    server.stop()
    server.start()
    again = {name: {_salt(server, name) for _ in range(4)} for name in names}
    assert again == first


def test_a_locked_throttle_database_freezes_nothing_else(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create(
        "stalled-throttle",
        users=[ALICE],
        limits={"command_timeout": 2},
        sections={"auth_throttle": {**NO_DELAYS, "max_delay": 1.0}},
    )
    assert session_login(server, "Wrong-pw-3Cc") == "535 5.7.8"  # the state file exists now
    locker = connect_state(server.data_dir / "throttle.db")
    locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with session(server) as stuck, session(server) as other:
            remember_credentials(ALICE.address, "Wrong-pw-4Dd")
            stuck.send(
                f"AUTH PLAIN {b64(chr(0) + ALICE.address + chr(0) + 'Wrong-pw-4Dd')}\r\n".encode()
            )
            time.sleep(0.3)
            # The worker's event loop is free: another session is answered at once.
            for _ in range(5):
                started = time.monotonic()
                assert other.command("NOOP").code == 250
                assert time.monotonic() - started < 0.5
            # The stuck login ends with a clear reply and a closed connection.
            reply = stuck.reply(timeout=10)
            assert reply.status == "421 4.3.0", str(reply)
            assert stuck.wait_closed(5)
    finally:
        locker.rollback()
        locker.close()
    assert server.wait_for_event("timeout", lambda e: e.get("reason") == "decision")
    # Once the lock is gone, logins work again.
    assert session_login(server, ALICE.password) == "235 2.7.0"


@pytest.mark.sqlite_only
def test_a_locked_main_database_keeps_logins_and_ends_a_stuck_commit(
    fresh_servers: ServerPool,
) -> None:
    server = fresh_servers.create("stalled-main", users=[ALICE], limits={"command_timeout": 2})
    locker = sqlite3.connect(server.data_dir / "relaygate.db", timeout=1)
    locker.execute("BEGIN IMMEDIATE")
    try:
        # Reads go on beside a writer (WAL): logging in still works.
        with session(server, user=ALICE) as client:
            client.command(f"MAIL FROM:<{ALICE.address}>")
            client.command("RCPT TO:<rcpt@example.net>")
            assert client.command("DATA").code == 354
            client.send(
                make_message(from_addr=ALICE.address, to=["rcpt@example.net"], subject="stalled")
                + b".\r\n"
            )
            reply = client.reply(timeout=15)
            assert reply.status == "451 4.3.0", str(reply)
            assert client.wait_closed(5)
    finally:
        locker.rollback()
        locker.close()
    with session(server, user=ALICE) as client:
        client.command(f"MAIL FROM:<{ALICE.address}>")
        client.command("RCPT TO:<rcpt@example.net>")
        assert client.command("DATA").code == 354
        client.send(
            make_message(
                from_addr=ALICE.address, to=["rcpt@example.net"], subject="after the stall"
            )
            + b".\r\n"
        )
        assert client.reply(timeout=15).code == 250
    assert "after the stall" in server.subjects()


def session_login(server: Server, password: str) -> str:
    with RawSMTP.connect(server.implicit_port, tls=server.client_context()) as client:
        client.ehlo()
        return client.auth_plain(ALICE.address, password).status


def test_parallel_right_logins_queue_instead_of_being_refused(fresh_servers: ServerPool) -> None:
    """A web app opening 25 connections at once (first logins: every one needs its
    hash checked) is not throttled by its own attempts still in flight."""
    server = fresh_servers.create(
        "parallel-right", workers=2, users=[ALICE], sections={"auth_throttle": NO_DELAYS}
    )

    def attempt(barrier: threading.Barrier) -> str:
        with session(server, source="127.0.5.1") as client:
            barrier.wait()
            return client.auth_plain(ALICE.address, ALICE.password).status

    assert Counter(parallel(25, attempt)) == {"235 2.7.0": 25}
