"""Pure rules of services/login.py: failure delays and when a live login stops holding."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.config import AuthThrottleConfig
from relaygate.services.login import (
    SUSPECT_SHARE,
    LoginService,
    failure_delay,
    login_problem,
)

RULES = AuthThrottleConfig(connection_delay_after=1, delay_seconds=1.0, max_delay=30.0)


@pytest.mark.parametrize(
    ("connection", "recent", "delay"),
    [(1, 1, 0.0), (2, 0, 1.0), (0, 2, 1.0), (3, 1, 2.0), (1, 4, 4.0), (40, 0, 30.0)],
)
def test_failure_delay_doubles_with_the_larger_count(
    connection: int, recent: int, delay: float
) -> None:
    assert failure_delay(RULES, connection, recent) == delay


def test_no_delays_when_turned_off() -> None:
    assert failure_delay(replace(RULES, connection_delay_after=0), 50, 50) == 0.0


ACCOUNT = Account(1, "a@example.com", "hash-1", False, ("a@example.com",), 0.0, 0.0)
CREDENTIAL = Credential(7, 1, "a@example.com", "app", None, None, None, None, 0.0, None, None)


@pytest.mark.parametrize(
    ("account", "credential_before", "credential", "problem"),
    [
        (ACCOUNT, None, None, None),
        (None, None, None, "account removed"),
        (replace(ACCOUNT, disabled=True), None, None, "account disabled"),
        (replace(ACCOUNT, password_hash="hash-2"), None, None, "password changed"),
        (replace(ACCOUNT, password_hash="hash-2"), CREDENTIAL, CREDENTIAL, None),
        (ACCOUNT, CREDENTIAL, None, "credential removed"),
        (ACCOUNT, CREDENTIAL, replace(CREDENTIAL, revoked_at=1.0), "credential revoked"),
        (ACCOUNT, CREDENTIAL, replace(CREDENTIAL, expires_at=1.0), "credential expired"),
        (ACCOUNT, CREDENTIAL, replace(CREDENTIAL, networks=("10.0.0.0/8",)), "network not allowed"),
    ],
)
def test_login_problem(
    account: Account | None,
    credential_before: Credential | None,
    credential: Credential | None,
    problem: str | None,
) -> None:
    assert login_problem(ACCOUNT, credential_before, account, credential, "192.0.2.1") == problem


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_suspect_hashing_rests_to_stay_within_its_share_of_a_core() -> None:
    service = LoginService.__new__(LoginService)  # only the suspect thread's own state
    service._rest_until = 0.0
    hashes: list[float] = []

    def verify(account: Account | None, password: str) -> str:
        hashes.append(time.monotonic())
        _burn(0.05)
        return "bad_password"

    service._verify = verify  # type: ignore[method-assign]
    started = time.monotonic()
    assert service._verify_resting(None, "guess") == "bad_password"
    first_reply = time.monotonic() - started
    assert service._verify_resting(None, "guess") == "bad_password"
    # The first answer is not held back; the next hash starts only after a rest
    # of 1/share - 1 times the CPU the previous one took.
    assert first_reply < 0.05 * 1.0 / SUSPECT_SHARE * 0.9
    assert hashes[1] - hashes[0] >= 0.05 / SUSPECT_SHARE * 0.95
