"""Pure rules of services/login.py: failure delays and when a live login stops holding."""

from __future__ import annotations

from dataclasses import replace

import pytest

from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.config import AuthThrottleConfig
from relaygate.services.login import failure_delay, login_problem

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
