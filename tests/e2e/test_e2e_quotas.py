"""Sending limits end to end: set with the CLI on a running server, counted per fixed
UTC hour and day in the database, refused with 451 4.7.1 at MAIL or RCPT.

"Accepted again after the window": windows are fixed UTC hours and days
(``send_counters`` rows keyed "h2026112914" / "d20261129"), so waiting for the
next one is out of the question in a test. Instead the test re-labels the
current window's counter row as the previous window's, with sqlite3 on the
server's database: exactly the state the server sees once the clock enters a
new window (last window's row still there, none yet for the new one). The
next MAIL must then be accepted, by the same running server.

Each test uses its own account; tests wait out the last seconds of an hour so
no window ends half-way through one.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from typing import Any, cast

import pytest

from .helpers import Reply, Server, ServerPool, User, make_message, session
from .security_helpers import (
    avoid_window_edge,
    counters,
    move_window,
    new_credential,
    utc_window_keys,
)

# The tests move counter rows between windows in the server's SQLite file.
pytestmark = pytest.mark.sqlite_only

RCPT = "rcpt@example.net"
QUOTA = "451 4.7.1"
HOURLY = User("hourly@example.com", "Hourly-pw-2Df5gH8j")
DAILY = User("daily@example.com", "Daily-pw-6Jk9lZ3x")
RCPTS = User("rcpts@example.com", "Rcpts-pw-1Cv4bN7m")
NEW = User("new@example.com", "New-pw-5Qw8eR2t")
CRED = User("cred@example.com", "Cred-pw-9Yu3iO6p")
RESTART = User("restart@example.com", "Restart-pw-4As7dF0g")


@pytest.fixture(scope="module")
def quota_server(servers: ServerPool) -> Server:
    return servers.create("quotas", users=[HOURLY, DAILY, RCPTS, NEW, CRED])


@pytest.fixture(autouse=True)
def _whole_hour() -> None:
    avoid_window_edge(3600, 30)


def _send(server: Server, user: User, subject: str, rcpts: list[str] | None = None) -> str:
    to = rcpts or [RCPT]
    with session(server, user=user) as client:
        return client.send_mail(
            user.address, to, make_message(from_addr=user.address, to=to, subject=subject)
        )


def _mail(server: Server, user: User, password: str | None = None) -> Reply:
    with session(server) as client:
        client.login(user.address, password or user.password)
        return client.command(f"MAIL FROM:<{user.address}>")


def _next_boundary(period: int) -> str:
    return time.strftime("%H:%M", time.gmtime((time.time() // period + 1) * period))


def _previous(key: str) -> str:
    """The window key before ``key`` ("h2026112914" -> "h2026112913")."""
    if key.startswith("h"):
        start = calendar.timegm(time.strptime(key[1:], "%Y%m%d%H"))
        return utc_window_keys(start - 3600)[0]
    start = calendar.timegm(time.strptime(key[1:], "%Y%m%d"))
    return utc_window_keys(start - 86400)[1]


# ------------------------------------------------------------------ messages per hour / day


@pytest.mark.parametrize(
    ("user", "option", "window", "label"),
    [
        (HOURLY, "--messages-per-hour", "hour", "Hourly message limit"),
        (DAILY, "--messages-per-day", "day", "Daily message limit"),
    ],
    ids=["hour", "day"],
)
def test_message_limit_then_next_window(
    quota_server: Server, user: User, option: str, window: str, label: str
) -> None:
    server = quota_server
    server.cli("user", "limits", user.address, option, "3")  # the server is running
    limits = server.cli("user", "limits", user.address).stdout
    assert re.search(r"messages_per_(hour|day): 3", limits), limits
    mark = server.log_mark()
    with session(server, user=user) as client:
        for n in range(3):  # one connection, three transactions
            client.send_mail(
                user.address,
                [RCPT],
                make_message(from_addr=user.address, to=[RCPT], subject=f"{window} {n}"),
            )
        refused = client.command(f"MAIL FROM:<{user.address}>")
    assert refused.status == QUOTA, str(refused)
    resets = _next_boundary(3600 if window == "hour" else 86400)
    assert refused.text == f"{label} (3) reached for {user.address}, resets at {resets} UTC", (
        refused.text
    )
    assert _mail(server, user).status == QUOTA  # a new connection does not help
    event = server.wait_for_event("mail.refused", lambda e: e["user"] == user.address, mark)
    assert (event["reason"], event["reply"]) == ("quota", QUOTA)
    assert label in event["text"]

    scope = f"account:{user.address}"
    hour_key, day_key = utc_window_keys(time.time())
    current = hour_key if window == "hour" else day_key
    assert counters(server, scope) == {hour_key: (3, 3, 1), day_key: (3, 3, 1)}
    # The window ends (simulated, see the module docstring): accepted again.
    move_window(server, scope, current, _previous(current))
    assert _mail(server, user).status == "250 2.1.0"
    _send(server, user, f"{window} after the window")
    assert counters(server, scope)[current][0] == 1


def test_previous_window_key() -> None:
    assert _previous("h2026112900") == "h2026112823"
    assert _previous("h2026030115") == "h2026030114"
    assert _previous("d20260301") == "d20260228"
    assert _previous("d20270101") == "d20261231"


# ------------------------------------------------------------------ recipients


def test_recipients_per_day_refused_at_rcpt(quota_server: Server) -> None:
    server = quota_server
    server.cli("user", "limits", RCPTS.address, "--recipients-per-day", "3")
    mark = server.log_mark()
    to = ["r1@example.net", "r2@example.net", "r3@example.net"]
    with session(server, user=RCPTS) as client:
        client.transaction(RCPTS.address, to)
        refused = client.command("RCPT TO:<r4@example.net>")
        assert refused.status == QUOTA, str(refused)
        assert refused.text.startswith(f"Daily recipient limit (3) reached for {RCPTS.address}")
        assert refused.text.endswith(" resets at 00:00 UTC")
        # The transaction goes on with the three accepted recipients.
        reply = client.data(make_message(from_addr=RCPTS.address, to=to, subject="three"))
        assert reply.status == "250 2.0.0", str(reply)
        # Nothing more can go out today: said at MAIL already.
        assert client.command(f"MAIL FROM:<{RCPTS.address}>").status == QUOTA
    event = server.wait_for_event("rcpt.refused", lambda e: e["user"] == RCPTS.address, mark)
    assert (event["rcpt"], event["reply"]) == ("r4@example.net", QUOTA)


def test_new_recipients_per_day_refused_at_rcpt(quota_server: Server) -> None:
    server = quota_server
    server.cli("user", "limits", NEW.address, "--new-recipients-per-day", "2")
    with session(server, user=NEW) as client:
        client.transaction(NEW.address, ["a@example.net", "b@example.net"])
        refused = client.command("RCPT TO:<c@example.net>")
        assert refused.status == QUOTA, str(refused)
        assert "Daily new-recipient limit (2)" in refused.text, str(refused)
        to = ["a@example.net", "b@example.net"]
        assert client.data(make_message(from_addr=NEW.address, to=to, subject="ab")).code == 250
        # Known recipients still go through; new ones do not.
        assert client.command(f"MAIL FROM:<{NEW.address}>").status == "250 2.1.0"
        assert client.command("RCPT TO:<d@example.net>").status == QUOTA
        assert client.command("RCPT TO:<A@example.net>").status == "250 2.1.5"
    day = utc_window_keys(time.time())[1]
    assert counters(server, f"account:{NEW.address}")[day] == (1, 2, 2)


# ------------------------------------------------------------------ credentials


def test_credential_limit_applies_to_that_credential_only(quota_server: Server) -> None:
    server = quota_server
    secret = new_credential(server, CRED.address, "batch")
    other = new_credential(server, CRED.address, "interactive")
    server.cli("credential", "limits", CRED.address, "batch", "--messages-per-hour", "1")
    listed = cast(
        list[dict[str, Any]],
        json.loads(server.cli("credential", "list", CRED.address, "--json").stdout),
    )
    batch_id = next(c["id"] for c in listed if c["name"] == "batch")

    batch = User(CRED.address, secret)
    _send(server, batch, "sent by batch")
    refused = _mail(server, CRED, secret)
    assert refused.status == QUOTA, str(refused)
    assert f'for credential "batch" of {CRED.address}' in refused.text, str(refused)
    # The password and the other credential are not held by batch's limit.
    assert _mail(server, CRED).status == "250 2.1.0"
    assert _mail(server, CRED, other).status == "250 2.1.0"
    _send(server, CRED, "sent with the password")
    _send(server, User(CRED.address, other), "sent by interactive")
    assert _mail(server, CRED, secret).status == QUOTA

    hour = utc_window_keys(time.time())[0]
    assert counters(server, f"credential:{batch_id}")[hour][0] == 1
    assert counters(server, f"account:{CRED.address}")[hour][0] == 3  # all three count here
    # An account limit binds its credentials as well.
    server.cli("user", "limits", CRED.address, "--messages-per-hour", "3")
    assert _mail(server, CRED, other).status == QUOTA
    assert _mail(server, CRED).status == QUOTA


# ------------------------------------------------------------------ restart


def test_counters_survive_a_restart(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("restart", users=[RESTART])
    server.cli("user", "limits", RESTART.address, "--messages-per-hour", "2")
    for n in range(2):
        _send(server, RESTART, f"before restart {n}")
    assert _mail(server, RESTART).status == QUOTA
    assert server.stop() == 0
    server.start()
    refused = _mail(server, RESTART)
    assert refused.status == QUOTA, str(refused)
    assert "Hourly message limit (2)" in refused.text
    # Raising the limit with the CLI lets mail through at once.
    server.cli("user", "limits", RESTART.address, "--messages-per-hour", "3")
    _send(server, RESTART, "after raising the limit")
    assert _mail(server, RESTART).status == QUOTA
