"""Account changes made with the CLI count in the RUNNING server at once.

Each check holds several connections open at once and adds more until every
worker process holds at least one (it asks /proc which process owns each
socket), so with workers = 2 both workers answer every check, and both have
the old password in their verified-credentials cache before it changes.

Also: AUTH timing does not tell unknown users from wrong passwords, and a
repeated correct login is served from the cache.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest

from .helpers import (
    ALICE,
    CAROL,
    RawSMTP,
    Server,
    ServerPool,
    User,
    make_message,
    remember_credentials,
    session,
)

CONNECTIONS = 6
MAX_CONNECTIONS = 40  # to reach every worker; the kernel picks which one accepts


@pytest.fixture(scope="module", params=[1, 2], ids=["workers1", "workers2"])
def live(request: pytest.FixtureRequest, servers: ServerPool) -> Server:
    workers: int = request.param
    return servers.create(f"live-{workers}", workers=workers)


class Probe:
    """Logs in over simultaneous connections that reach every worker process."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def _connections(self) -> list[RawSMTP]:
        """At least CONNECTIONS open connections, and at least one on each worker."""
        context = self.server.client_context()
        clients: list[RawSMTP] = []
        seen: set[int] = set()
        try:
            for _ in range(MAX_CONNECTIONS):
                client = RawSMTP.connect(self.server.implicit_port, tls=context)
                clients.append(client)
                worker = self.server.worker_for(client.local_port)
                if worker is not None:
                    seen.add(worker)
                if len(clients) >= CONNECTIONS and len(seen) >= self.server.workers:
                    return clients
        except BaseException:
            for client in clients:
                client.close()
            raise
        for client in clients:
            client.close()
        raise AssertionError(
            f"{MAX_CONNECTIONS} connections reached {len(seen)} of"
            f" {self.server.workers} worker processes"
        )

    def auth(
        self, user: str, password: str, then: Callable[[RawSMTP], str] | None = None
    ) -> list[str]:
        """The AUTH reply status (and ``then``'s result, if logged in) of each connection."""
        remember_credentials(user, password)
        clients = self._connections()
        results = []
        try:
            for client in clients:
                client.ehlo()
                status = client.auth_plain(user, password).status
                if then is not None and status.startswith("235"):
                    status += " " + then(client)
                results.append(status)
        finally:
            for client in clients:
                client.close()
        return results


def _all(results: list[str], status: str) -> None:
    assert len(results) >= CONNECTIONS
    assert results == [status] * len(results), results


def _new_user(server: Server, name: str, password: str) -> User:
    user = User(f"{name}-w{server.workers}@example.com", password)
    server.add_user(user)  # the server is running: the CLI writes the database directly
    return user


def test_new_user_can_log_in_at_once(live: Server) -> None:
    probe = Probe(live)
    _all(probe.auth(f"newbie-w{live.workers}@example.com", "Newbie-pw-7Ue4"), "535 5.7.8")
    user = _new_user(live, "newbie", "Newbie-pw-7Ue4")
    _all(probe.auth(user.address, user.password), "235 2.7.0")


def test_passwd_applies_at_once_and_flushes_the_cache(live: Server) -> None:
    probe = Probe(live)
    user = _new_user(live, "passwd", "Old-pw-4Kd9wQz")
    # Twice over, so every worker has the old password in its cache.
    _all(probe.auth(user.address, user.password), "235 2.7.0")
    _all(probe.auth(user.address, user.password), "235 2.7.0")
    live.set_password(user.address, "New-pw-6Hs2eRv")
    _all(probe.auth(user.address, user.password), "535 5.7.8")
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"):  # no stale SCRAM keys either
        with session(live) as client:
            reply = client.auth_scram(mechanism, user.address, user.password)
            assert reply.status == "535 5.7.8", (mechanism, str(reply))
    _all(probe.auth(user.address, "New-pw-6Hs2eRv"), "235 2.7.0")
    _all(probe.auth(user.address, user.password), "535 5.7.8")
    # And back: the old password works again once it is the current one.
    live.set_password(user.address, user.password)
    _all(probe.auth(user.address, "New-pw-6Hs2eRv"), "535 5.7.8")
    _all(probe.auth(user.address, user.password), "235 2.7.0")


def test_disable_and_enable_apply_at_once(live: Server) -> None:
    probe = Probe(live)
    user = _new_user(live, "toggle", "Toggle-pw-1Ab8nM")
    _all(probe.auth(user.address, user.password), "235 2.7.0")
    live.cli("user", "disable", user.address)
    _all(probe.auth(user.address, user.password), "535 5.7.8")
    live.cli("user", "enable", user.address)
    _all(probe.auth(user.address, user.password), "235 2.7.0")


def test_remove_applies_at_once(live: Server) -> None:
    probe = Probe(live)
    user = _new_user(live, "removed", "Removed-pw-9Pl3cX")
    _all(probe.auth(user.address, user.password), "235 2.7.0")
    live.cli("user", "remove", user.address)
    _all(probe.auth(user.address, user.password), "535 5.7.8")


def test_senders_apply_at_once(live: Server) -> None:
    probe = Probe(live)
    user = _new_user(live, "senders", "Senders-pw-5Tr2jW")
    other = f"other-w{live.workers}@elsewhere.test"

    def mail_from(client: RawSMTP) -> str:
        return client.command(f"MAIL FROM:<{other}>").status

    _all(probe.auth(user.address, user.password, mail_from), "235 2.7.0 553 5.7.1")
    live.cli("user", "senders", user.address, user.address, "@elsewhere.test")
    _all(probe.auth(user.address, user.password, mail_from), "235 2.7.0 250 2.1.0")

    # The new pattern is good for the From: header too, and the message is stored.
    subject = f"sent as a new sender, workers={live.workers}"
    with session(live, user=user) as client:
        client.send_mail(
            other,
            ["rcpt@example.net"],
            make_message(from_addr=other, to=["rcpt@example.net"], subject=subject),
        )
    assert subject in live.subjects()

    live.cli("user", "senders", user.address, user.address)
    _all(probe.auth(user.address, user.password, mail_from), "235 2.7.0 553 5.7.1")


# ------------------------------------------------------------------ timing


def _auth_seconds(server: Server, user: str, password: str) -> float:
    """How long one AUTH takes on a fresh connection, seen from the client."""
    with session(server) as client:
        started = time.perf_counter()
        reply = client.auth_plain(user, password)
        elapsed = time.perf_counter() - started
    assert reply.code in (235, 535), str(reply)
    return elapsed


def _similar(a: float, b: float) -> bool:
    return abs(a - b) <= max(0.5 * max(a, b), 0.015)


def test_auth_timing_does_not_reveal_accounts(server: Server) -> None:
    samples: dict[str, list[float]] = {"unknown": [], "wrong": [], "disabled": []}
    attempts = {
        "unknown": ("nobody-timing@example.com", "Whatever-pw-3Zx8"),
        "wrong": (ALICE.address, "Wrong-pw-3Zx8"),
        "disabled": (CAROL.address, CAROL.password),
    }
    for user, password in attempts.values():  # warm up each path once
        _auth_seconds(server, user, password)
    for _ in range(15):  # interleaved, so drift in machine load hits all alike
        for name, (user, password) in attempts.items():
            samples[name].append(_auth_seconds(server, user, password))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    assert _similar(medians["unknown"], medians["wrong"]), medians
    assert _similar(medians["disabled"], medians["wrong"]), medians

    # A correct login that the cache has seen skips the slow hash.
    mark = server.log_mark()
    _auth_seconds(server, ALICE.address, ALICE.password)
    cached = statistics.median(
        _auth_seconds(server, ALICE.address, ALICE.password) for _ in range(9)
    )
    assert cached < medians["wrong"] / 2, (cached, medians)
    hits = server.log_events("auth.ok", since=mark)
    assert [e.get("cached") for e in hits[-9:]] == ["True"] * 9, hits
