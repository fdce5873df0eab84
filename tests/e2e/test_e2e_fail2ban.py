"""The shipped fail2ban filter against a REAL relaygate log.

A server with small limits gets wrong logins (some with hostile user names that
try to plant another address in the line), a throttled attempt, a per-IP
refusal and, as things the filter must leave alone, a successful login and a
"server busy" refusal. fail2ban-regex must match exactly the lines a ban should
count, and blame only the addresses that really connected.

All of it twice, for both ``[log] format``s (logfmt and JSON), and each log
read two ways: as a ``[log] file``, and as the journal fail2ban's systemd
backend reads (the server's lines stored as a unit's standard error would be,
next to another unit's lookalike line that the jail's journalmatch must skip).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import ALICE, RawSMTP, Server, ServerPool, parse_log_line, session
from .security_helpers import (
    AUTH_FAILED,
    FAIL2BAN_FILTER,
    fail2ban_hosts,
    fail2ban_regex_path,
    fail2ban_summary,
    jail_setting,
    journal_source,
    raw_login,
    scram_exchange,
    write_journal,
)

PLANTED = "198.51.100.9"
HOSTILE_NAMES = [
    f"x client_ip={PLANTED} y",
    f'" client_ip={PLANTED} "',
    # A forged second line: the log must escape the line break.
    f"x\n2026-01-01T00:00:00.000Z warning event=auth.fail session=ab client_ip={PLANTED} y",
]
GUESSER = "127.0.2.1"
SCRAM_GUESSER = "127.0.5.1"
CROWDER = "127.0.3.1"


def _from(ip: str) -> Callable[[dict[str, str]], bool]:
    return lambda event: event["client_ip"] == ip


UNIT = "relaygate.service"
OTHER_UNIT = "lookalike.service"
OTHER_UNIT_CLIENT = "127.0.7.1"  # in a line of another unit: never to be blamed


@pytest.fixture(scope="module", params=["logfmt", "json"])
def f2b_log(request: pytest.FixtureRequest, servers: ServerPool) -> tuple[Server, Path]:
    assert fail2ban_regex_path() is not None, "fail2ban-regex is not installed"
    assert FAIL2BAN_FILTER.is_file(), FAIL2BAN_FILTER
    log_format = str(request.param)
    server = servers.create(
        f"fail2ban-{log_format}",
        users=[ALICE],
        limits={"max_connections": 2},
        sections={
            "log": {"format": log_format},
            "auth_throttle": {"ip_per_minute": 3},
            "connection_limits": {
                "per_ip_concurrent": 1,
                "per_ip_per_minute": 0,
                "exempt": ["127.0.0.1/32"],  # the fixtures' readiness probes
            },
        },
    )
    # Three wrong logins from one address, each with a hostile user name...
    for name in HOSTILE_NAMES:
        assert str(raw_login(server, name, "Wrong-pw-8Ui", source=GUESSER)) == AUTH_FAILED
    # ...then one more: throttled.
    assert raw_login(server, HOSTILE_NAMES[0], "Wrong-pw-8Ui", source=GUESSER).code == 454
    # A wrong SCRAM proof from elsewhere.
    with session(server, source=SCRAM_GUESSER) as client:
        run = scram_exchange(client, "SCRAM-SHA-256", ALICE.address, "Wrong-scram-pw-3Hj")
        assert str(run.last) == AUTH_FAILED
    # A good login: not for fail2ban.
    assert raw_login(server, ALICE.address, ALICE.password).code == 235
    # A second connection from one address: refused by the per-IP limit.
    first = RawSMTP.connect(server.starttls_port, source=CROWDER)
    try:
        assert first.greeting.code == 220
        with RawSMTP.connect(server.starttls_port, source=CROWDER) as second:
            assert second.greeting.status == "421 4.7.0", str(second.greeting)
        # The server is full (max_connections = 2): "busy" is not the client's fault.
        with RawSMTP.connect(server.starttls_port, source="127.0.4.1") as filler:
            assert filler.greeting.code == 220
            with RawSMTP.connect(server.starttls_port, source="127.0.6.1") as busy:
                assert busy.greeting.code == 421, str(busy.greeting)
    finally:
        first.close()
    server.wait_for_event("connect.refused", lambda e: e["client_ip"] == "127.0.6.1")
    for source in (CROWDER, "127.0.4.1"):
        server.wait_for_event("disconnect", _from(source))
    # fail2ban reads a copy, so both sides see the very same lines.
    snapshot = server.directory / "relaygate.log.snapshot"
    snapshot.write_text(server.log_text(), encoding="utf-8")
    first_line = snapshot.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("{") == (log_format == "json"), first_line
    return server, snapshot


def _ban_worthy(line: str) -> bool:
    event = parse_log_line(line)
    return event["event"] in {"auth.fail", "auth.throttled"} or (
        event["event"] == "connect.refused" and event["reason"].startswith("ip_")
    )


def test_log_has_the_expected_events(f2b_log: tuple[Server, Path]) -> None:
    server, _ = f2b_log
    fails = server.log_events("auth.fail")
    assert [(e["client_ip"], e["user"]) for e in fails] == [
        *((GUESSER, name) for name in HOSTILE_NAMES),
        (SCRAM_GUESSER, ALICE.address),
    ]
    throttled = server.log_events("auth.throttled")
    assert [(e["client_ip"], e["scope"]) for e in throttled] == [(GUESSER, "ip")]
    refused = server.log_events("connect.refused")
    assert [(e["client_ip"], e["reason"]) for e in refused] == [
        (CROWDER, "ip_concurrent"),
        ("127.0.6.1", "server_busy"),
    ]
    # The forged line break stayed inside its quoted value (log_events parsed every
    # line, and the user names above came back whole): no line of the forger's.
    text = server.log_text()
    assert PLANTED in text
    assert not any(line.startswith("2026-01-01T") for line in text.splitlines()), text


def test_filter_matches_exactly_the_ban_worthy_lines(f2b_log: tuple[Server, Path]) -> None:
    _, log = f2b_log
    lines = log.read_text(encoding="utf-8").splitlines()
    expected = [line for line in lines if _ban_worthy(line)]
    assert len(expected) == 6, expected  # 4 wrong logins, 1 throttled, 1 per-IP refusal
    result = fail2ban_summary(log)
    assert (result.lines, result.ignored, result.matched, result.missed) == (
        len(lines),
        0,
        len(expected),
        len(lines) - len(expected),
    ), result.output


def test_filter_blames_only_real_clients(f2b_log: tuple[Server, Path]) -> None:
    _, log = f2b_log
    hosts = fail2ban_hosts(log)
    assert PLANTED not in hosts, hosts
    assert sorted(hosts) == sorted([GUESSER] * 4 + [SCRAM_GUESSER, CROWDER]), hosts


@pytest.fixture(scope="module")
def f2b_journal(f2b_log: tuple[Server, Path]) -> tuple[Path, list[str]]:
    """The same lines as the unit's entries in a journal file, plus one line of
    another unit that would be a match (a ban on OTHER_UNIT_CLIENT) if read."""
    _, log = f2b_log
    lines = log.read_text(encoding="utf-8").splitlines()
    ban_worthy = next(line for line in lines if _ban_worthy(line))
    lookalike = ban_worthy.replace(GUESSER, OTHER_UNIT_CLIENT)
    assert lookalike != ban_worthy
    journal = log.with_suffix(".journal")
    write_journal(journal, [(UNIT, line) for line in lines] + [(OTHER_UNIT, lookalike)])
    return journal, lines


def test_filter_matches_the_journal_entries(f2b_journal: tuple[Path, list[str]]) -> None:
    journal, lines = f2b_journal
    expected = [line for line in lines if _ban_worthy(line)]
    result = fail2ban_summary(journal_source(journal), "-m", jail_setting("journalmatch"))
    assert (result.lines, result.ignored, result.matched, result.missed) == (
        len(lines),  # the other unit's entry is not even read
        0,
        len(expected),
        len(lines) - len(expected),
    ), result.output


def test_filter_blames_only_real_clients_in_the_journal(
    f2b_journal: tuple[Path, list[str]],
) -> None:
    journal, _ = f2b_journal
    hosts = fail2ban_hosts(journal_source(journal), "-m", jail_setting("journalmatch"))
    assert sorted(hosts) == sorted([GUESSER] * 4 + [SCRAM_GUESSER, CROWDER]), hosts
    # Without the journalmatch the lookalike is read and matched: the test
    # above proves the match keeps it out, not that it could never match.
    everything = fail2ban_hosts(journal_source(journal))
    assert sorted(everything) == sorted([*hosts, OTHER_UNIT_CLIENT]), everything
