"""The relaygate command, run in-process with a throwaway config and database."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from relaygate.accounts.credentials import CredentialStore, looks_like_credential
from relaygate.accounts.passwords import PasswordHasher
from relaygate.accounts.store import Account, AccountStore
from relaygate.cli import main
from relaygate.config import ENV_VAR, PasswordHashConfig
from relaygate.storage.sqlite import connect
from relaygate.times import rfc3339

CONFIG = """
[server]
hostname = "mx.test"
data_dir = "data"

[password_hash]
memory_kib = 8192
time_cost = 1
"""

HASHER = PasswordHasher(PasswordHashConfig(memory_kib=8192, time_cost=1))
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No stray $RELAYGATE_CONFIG, and a quickstart run would write under tmp_path.
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "relaygate.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture
def cfg(config_file: Path) -> list[str]:
    # The database exists, as after `relaygate serve` or any command that writes
    # (commands that only read refuse to make one: test_e2e_reload).
    connect(config_file.parent / "data" / "relaygate.db").close()
    return ["--config", str(config_file)]


@pytest.fixture
def db(config_file: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(config_file.parent / "data" / "relaygate.db")
    yield connection
    connection.close()


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    if stdin is not None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "stdin", io.StringIO(stdin))
            status = main(list(argv))
    else:
        status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def account(db: sqlite3.Connection, address: str) -> Account:
    found = AccountStore(db).get(address)
    assert found is not None
    return found


# ------------------------------------------------------------------ accounts


def test_user_add_generates_and_prints_password(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    status, out, err = run(capsys, *cfg, "user", "add", "Alice@Example.com")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "added Alice@example.com, may send as: Alice@example.com"
    assert lines[1].startswith("password: ")
    password = lines[1].removeprefix("password: ")
    assert len(password) == 24  # token_urlsafe(18)
    stored = account(db, "alice@example.com")
    assert HASHER.verify(stored.password_hash, password)
    assert "$m=8192,t=1," in stored.password_hash  # the configured cost was used


def test_user_add_password_from_stdin(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    status, out, _ = run(
        capsys,
        *cfg,
        "user",
        "add",
        "bob@example.com",
        "--password-stdin",
        "--sender",
        "@Example.org",
        "--sender",
        "bob@example.com",
        stdin="s3cret pass\r\nsecond line ignored\n",
    )
    assert status == 0
    assert "password" not in out  # nothing to show: the admin chose it
    stored = account(db, "bob@example.com")
    assert HASHER.verify(stored.password_hash, "s3cret pass")
    assert stored.senders == ("@example.org", "bob@example.com")


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_user_add_refuses_empty_password(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection, stdin: str
) -> None:
    status, out, err = run(
        capsys, *cfg, "user", "add", "bob@example.com", "--password-stdin", stdin=stdin
    )
    assert (status, out) == (2, "")
    assert err == "relaygate: no password on standard input (the first line is empty)\n"
    assert AccountStore(db).get("bob@example.com") is None


def test_user_admin_flag(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, _ = run(capsys, *cfg, "user", "add", "root@example.com", "--admin")
    assert status == 0 and out.startswith("added root@example.com (admin), may send as:")
    assert run(capsys, *cfg, "user", "add", "app@example.com")[0] == 0
    listed = json.loads(run(capsys, *cfg, "user", "list", "--json")[1])
    assert {a["address"]: a["admin"] for a in listed} == {
        "app@example.com": False,
        "root@example.com": True,
    }
    status, out, _ = run(capsys, *cfg, "user", "admin", "APP@example.com", "on")
    assert (status, out) == (
        0,
        "app@example.com is an admin: it sees and manages everything in the web UI\n",
    )
    assert "enabled, admin" in run(capsys, *cfg, "user", "list")[1]
    status, out, _ = run(capsys, *cfg, "user", "admin", "root@example.com", "off")
    assert out.startswith("root@example.com is not an admin")
    status, out, err = run(capsys, *cfg, "user", "admin", "nobody@example.com", "on")
    assert (status, out, err) == (1, "", "relaygate: no such account: nobody@example.com\n")
    with pytest.raises(SystemExit) as exited:
        run(capsys, *cfg, "user", "admin", "root@example.com", "maybe")
    assert exited.value.code == 2


def test_user_add_twice(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    assert run(capsys, *cfg, "user", "add", "alice@example.com")[0] == 0
    status, out, err = run(capsys, *cfg, "user", "add", "ALICE@example.com")
    assert (status, out) == (1, "")
    assert err == "relaygate: account already exists: ALICE@example.com\n"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["user", "add", "alice"], "relaygate: invalid address: 'alice': "),
        (
            ["user", "add", "a@example.com", "--sender", "example.com"],
            "relaygate: invalid sender pattern: 'example.com': ",
        ),
    ],
)
def test_user_add_bad_input(
    capsys: pytest.CaptureFixture[str], cfg: list[str], argv: list[str], error: str
) -> None:
    status, out, err = run(capsys, *cfg, *argv)
    assert (status, out) == (2, "")
    assert err.startswith(error)
    assert err.count("\n") == 1


def test_config_option_after_subcommand_and_from_environment(
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    db: sqlite3.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(capsys, "user", "add", "a@example.com", "--config", str(config_file))[0] == 0
    assert run(capsys, "user", "--config", str(config_file), "add", "b@example.com")[0] == 0
    monkeypatch.setenv(ENV_VAR, str(config_file))
    assert run(capsys, "user", "add", "c@example.com")[0] == 0
    assert AccountStore(db).count() == 3


def test_user_passwd(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    old_hash = account(db, "alice@example.com").password_hash

    status, out, _ = run(capsys, *cfg, "user", "passwd", "ALICE@example.com")
    assert status == 0
    assert out.splitlines()[0] == "password changed for alice@example.com"
    generated = out.splitlines()[1].removeprefix("password: ")
    new_hash = account(db, "alice@example.com").password_hash
    assert new_hash != old_hash
    assert HASHER.verify(new_hash, generated)

    status, out, _ = run(
        capsys, *cfg, "user", "passwd", "alice@example.com", "--password-stdin", stdin="chosen\n"
    )
    assert (status, out) == (0, "password changed for alice@example.com\n")
    assert HASHER.verify(account(db, "alice@example.com").password_hash, "chosen")


def test_user_passwd_unknown_account(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, err = run(capsys, *cfg, "user", "passwd", "nobody@example.com")
    assert (status, out) == (1, "")  # and no password printed for nobody
    assert err == "relaygate: no such account: nobody@example.com\n"


def test_disable_enable_remove(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    assert run(capsys, *cfg, "user", "disable", "alice@example.com") == (
        0,
        "disabled alice@example.com\n",
        "",
    )
    assert account(db, "alice@example.com").disabled
    assert run(capsys, *cfg, "user", "enable", "alice@example.com")[0] == 0
    assert not account(db, "alice@example.com").disabled
    assert run(capsys, *cfg, "user", "remove", "alice@example.com")[0] == 0
    assert AccountStore(db).get("alice@example.com") is None
    for action in ("disable", "enable", "remove"):
        status, _, err = run(capsys, *cfg, "user", action, "alice@example.com")
        assert (status, err) == (1, "relaygate: no such account: alice@example.com\n")


def test_user_senders(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    status, out, _ = run(
        capsys, *cfg, "user", "senders", "alice@example.com", "@Example.com", "a@example.org"
    )
    assert (status, out) == (0, "alice@example.com may send as: @example.com, a@example.org\n")
    assert account(db, "alice@example.com").senders == ("@example.com", "a@example.org")
    status, _, err = run(capsys, *cfg, "user", "senders", "alice@example.com", "nope")
    assert status == 2
    assert err.startswith("relaygate: invalid sender pattern: 'nope'")
    with pytest.raises(SystemExit) as caught:  # at least one pattern, says argparse
        main([*cfg, "user", "senders", "alice@example.com"])
    assert caught.value.code == 2


def test_user_list(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    assert run(capsys, *cfg, "user", "list")[1].startswith("no accounts yet")
    assert run(capsys, *cfg, "user", "list", "--json")[1] == "[]\n"

    run(capsys, *cfg, "user", "add", "bob@example.com", "--sender", "@example.com")
    run(capsys, *cfg, "user", "add", "alice@example.com")
    run(capsys, *cfg, "user", "disable", "bob@example.com")

    status, out, _ = run(capsys, *cfg, "user", "list")
    assert status == 0
    header, alice, bob = out.splitlines()
    assert header.split() == ["ADDRESS", "STATUS", "SENDERS", "LIMITS", "CREATED"]
    assert re.fullmatch(
        rf"alice@example\.com +enabled +alice@example\.com +default +{ISO_TIME}", alice
    )
    assert re.fullmatch(rf"bob@example\.com +disabled +@example\.com +default +{ISO_TIME}", bob)

    run(capsys, *cfg, "user", "limits", "bob@example.com", "--messages-per-day", "0")
    run(capsys, *cfg, "user", "limits", "bob@example.com", "--messages-per-hour", "9")
    status, out, _ = run(capsys, *cfg, "user", "list")
    assert "messages_per_hour=9, messages_per_day=unlimited" in out.splitlines()[2]

    status, out, _ = run(capsys, *cfg, "user", "list", "--json")
    listed = json.loads(out)
    assert [(a["address"], a["disabled"], a["senders"], a["limits"]) for a in listed] == [
        ("alice@example.com", False, ["alice@example.com"], None),
        (
            "bob@example.com",
            True,
            ["@example.com"],
            {"messages_per_hour": 9, "messages_per_day": 0},
        ),
    ]
    assert "argon2" not in out
    assert all("password_hash" not in a for a in listed)


def test_user_passwd_refuses_a_credential_shaped_password(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    before = account(db, "alice@example.com").password_hash
    shaped = "rgc_" + "x" * 43
    for argv in (["passwd", "alice@example.com"], ["add", "bob@example.com"]):
        status, out, err = run(capsys, *cfg, "user", *argv, "--password-stdin", stdin=shaped)
        assert (status, out) == (2, "")
        assert err == (
            "relaygate: that password has the shape of an app credential"
            " (rgc_ and 43 characters); choose another\n"
        )
    assert account(db, "alice@example.com").password_hash == before
    assert AccountStore(db).get("bob@example.com") is None


# -------------------------------------------------------------------- limits


def test_user_limits(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    none = "alice@example.com: no limit overrides; the server's defaults apply\n"
    assert run(capsys, *cfg, "user", "limits", "ALICE@example.com") == (0, none, "")

    status, out, _ = run(
        capsys,
        *cfg,
        "user",
        "limits",
        "alice@example.com",
        "--messages-per-day",
        "500",
        "--new-recipients-per-day",
        "0",
    )
    assert (status, out) == (
        0,
        "alice@example.com: limit overrides:\n"
        "  messages_per_day: 500\n"
        "  new_recipients_per_day: unlimited\n",
    )
    status, out, _ = run(
        capsys, *cfg, "user", "limits", "alice@example.com", "--messages-per-hour", "20"
    )
    assert status == 0
    assert out.splitlines()[1:] == [
        "  messages_per_hour: 20",
        "  messages_per_day: 500",
        "  new_recipients_per_day: unlimited",
    ]
    (stored,) = db.execute("SELECT limits FROM accounts").fetchone()
    assert json.loads(stored) == {
        "messages_per_hour": 20,
        "messages_per_day": 500,
        "new_recipients_per_day": 0,
    }
    assert run(capsys, *cfg, "user", "limits", "alice@example.com")[1] == out  # show only

    status, out, _ = run(
        capsys, *cfg, "user", "limits", "alice@example.com", "--clear", "--recipients-per-day", "3"
    )
    assert out == "alice@example.com: limit overrides:\n  recipients_per_day: 3\n"
    assert run(capsys, *cfg, "user", "limits", "alice@example.com", "--clear")[1] == none
    assert db.execute("SELECT limits FROM accounts").fetchone() == (None,)


def test_user_limits_errors(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, err = run(capsys, *cfg, "user", "limits", "ghost@example.com")
    assert (status, out, err) == (1, "", "relaygate: no such account: ghost@example.com\n")
    status, _, err = run(
        capsys, *cfg, "user", "limits", "ghost@example.com", "--messages-per-day", "1"
    )
    assert (status, err) == (1, "relaygate: no such account: ghost@example.com\n")
    for value in ("-1", "lots", "1000000001"):
        with pytest.raises(SystemExit) as caught:
            main([*cfg, "user", "limits", "a@example.com", "--messages-per-day", value])
        assert caught.value.code == 2
        assert "must be a whole number from 0 (unlimited)" in capsys.readouterr().err


# --------------------------------------------------------------- credentials


def add_credential(
    capsys: pytest.CaptureFixture[str], cfg: list[str], *argv: str
) -> tuple[list[str], str]:
    status, out, err = run(capsys, *cfg, "credential", "add", *argv)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    (secret_line,) = [line for line in lines if line.startswith("secret (shown only now): ")]
    return lines, secret_line.removeprefix("secret (shown only now): ")


def test_credential_add_prints_secret_once(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "Alice@Example.com")
    lines, secret = add_credential(capsys, cfg, "alice@example.com", "--name", "web")
    assert looks_like_credential(secret)
    assert lines == [
        "added credential 'web' for Alice@example.com",
        f"secret (shown only now): {secret}",
        "  store it now: it cannot be shown again, only revoked and replaced",
        "log in with AUTH PLAIN or LOGIN: user name Alice@example.com, password the secret",
        "may send as: account's",
        "networks: any",
        "expires: never",
    ]
    found = CredentialStore(db).find(secret)
    assert found is not None
    assert (found.account_address, found.name, found.senders, found.networks) == (
        "Alice@example.com",
        "web",
        None,
        None,
    )
    _, out, _ = run(capsys, *cfg, "credential", "list", "alice@example.com", "--json")
    assert secret not in out


def test_credential_add_with_options(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "shop@example.org", "--sender", "@example.org")
    lines, secret = add_credential(
        capsys,
        cfg,
        "shop@example.org",
        "--name",
        "orders",
        "--sender",
        "orders@example.org",
        "--sender",
        "@Example.org",
        "--network",
        "192.0.2.9/24",
        "--network",
        "2001:db8::/32",
        "--expires",
        "2999-12-31",
    )
    assert "may send as: @example.org, orders@example.org" in lines
    assert "networks: 192.0.2.0/24, 2001:db8::/32" in lines
    found = CredentialStore(db).find(secret)
    assert found is not None
    assert found.expires_at == datetime(3000, 1, 1, tzinfo=UTC).timestamp()
    assert found.senders == ("@example.org", "orders@example.org")
    assert found.networks == ("192.0.2.0/24", "2001:db8::/32")


@pytest.mark.parametrize(
    ("expires", "expected"),
    [
        ("2999-06-30", datetime(2999, 7, 1, tzinfo=UTC)),  # through that day, UTC
        ("29990630", datetime(2999, 7, 1, tzinfo=UTC)),
        ("2999-06-30T18:00:00Z", datetime(2999, 6, 30, 18, tzinfo=UTC)),
        (
            "2999-06-30T18:00:00+02:00",
            datetime(2999, 6, 30, 18, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_credential_expires(
    capsys: pytest.CaptureFixture[str],
    cfg: list[str],
    db: sqlite3.Connection,
    expires: str,
    expected: datetime,
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    _, secret = add_credential(
        capsys, cfg, "alice@example.com", "--name", "web", "--expires", expires
    )
    found = CredentialStore(db).find(secret)
    assert found is not None and found.expires_at == expected.timestamp()


def test_credential_expiring_today_is_accepted(
    capsys: pytest.CaptureFixture[str], cfg: list[str]
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    today = datetime.now(UTC).date().isoformat()
    add_credential(capsys, cfg, "alice@example.com", "--name", "web", "--expires", today)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["ghost@example.com", "--name", "web"],
            "no such account: ghost@example.com",
        ),
        (
            ["alice@example.com", "--name", "a b"],
            "invalid credential name: 'a b': use 1-64 letters, digits, dots, hyphens or"
            " underscores",
        ),
        (
            ["alice@example.com", "--name", "web", "--sender", "@example.com"],
            "sender pattern '@example.com' is not allowed for alice@example.com"
            " (it may send as: alice@example.com); a credential can only narrow its"
            " account's senders",
        ),
        (
            ["alice@example.com", "--name", "web", "--sender", "nope"],
            "invalid sender pattern: 'nope': it must look like local@domain"
            " (use an address or @domain)",
        ),
        (
            ["alice@example.com", "--name", "web", "--network", "10.0.0.0/40"],
            "invalid network: '10.0.0.0/40': use an address or CIDR such as 192.0.2.0/24"
            " or 2001:db8::/32",
        ),
        (
            ["alice@example.com", "--name", "web", "--expires", "2020-01-01"],
            "invalid expiry: '2020-01-01' is in the past",
        ),
        (
            ["alice@example.com", "--name", "web", "--expires", "2020-01-01T00:00:00Z"],
            "invalid expiry: '2020-01-01T00:00:00Z' is in the past",
        ),
        (
            ["alice@example.com", "--name", "web", "--expires", "2999-01-01T10:00"],
            "invalid expiry: '2999-01-01T10:00': give the time zone, such as Z or +01:00",
        ),
        (
            ["alice@example.com", "--name", "web", "--expires", "next week"],
            "invalid expiry: 'next week': use YYYY-MM-DD (valid through that day, UTC) or an"
            " ISO 8601 time with zone, such as 2026-12-31T18:00:00+01:00",
        ),
        (
            ["alice@example.com", "--name", "web", "--expires", "2999-02-30"],
            "invalid expiry: '2999-02-30': use YYYY-MM-DD (valid through that day, UTC) or an"
            " ISO 8601 time with zone, such as 2026-12-31T18:00:00+01:00",
        ),
        (
            ["alice@example.com", "--name", "web", "--expires", "9999-12-31"],
            "invalid expiry: '9999-12-31': too far in the future",
        ),
        (
            ["alice@example.com", "--name", "web", "--expires", "9999-12-31T23:00:00-05:00"],
            "invalid expiry: '9999-12-31T23:00:00-05:00': too far in the future",
        ),
    ],
)
def test_credential_add_errors(
    capsys: pytest.CaptureFixture[str],
    cfg: list[str],
    db: sqlite3.Connection,
    argv: list[str],
    error: str,
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    status, out, err = run(capsys, *cfg, "credential", "add", *argv)
    expected = 1 if error.startswith("no such") else 2  # the data's state, or the request
    assert (status, out, err) == (expected, "", f"relaygate: {error}\n")
    assert db.execute("SELECT count(*) FROM credentials").fetchone() == (0,)


def test_credential_add_duplicate(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    add_credential(capsys, cfg, "alice@example.com", "--name", "web")
    status, out, err = run(capsys, *cfg, "credential", "add", "alice@example.com", "--name", "WEB")
    assert (status, out) == (1, "")
    assert err == "relaygate: credential 'web' already exists for alice@example.com\n"


def test_credential_list_and_revoke(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    status, out, _ = run(capsys, *cfg, "credential", "list", "alice@example.com")
    assert (status, out) == (
        0,
        "no credentials for alice@example.com; add one with:"
        " relaygate credential add alice@example.com --name NAME\n",
    )
    assert run(capsys, *cfg, "credential", "list", "alice@example.com", "--json")[1] == "[]\n"

    _, web = add_credential(capsys, cfg, "alice@example.com", "--name", "web")
    _, old = add_credential(
        capsys,
        cfg,
        "alice@example.com",
        "--name",
        "cron",
        "--expires",
        "2999-01-01",
        "--network",
        "192.0.2.0/24",
        "--sender",
        "alice@example.com",
    )
    store = CredentialStore(db)
    cron = store.find(old)
    assert cron is not None
    store.touch(cron.id, 1_800_000_000.0)
    db.execute("UPDATE credentials SET expires_at = 1 WHERE name = 'cron'")  # now expired
    add_credential(capsys, cfg, "alice@example.com", "--name", "gone")
    status, out, err = run(capsys, *cfg, "credential", "revoke", "alice@example.com", "GONE")
    assert (status, out, err) == (0, "revoked credential 'gone' of alice@example.com\n", "")

    status, out, _ = run(capsys, *cfg, "credential", "list", "ALICE@example.com")
    assert status == 0
    header, cron_row, gone_row, web_row = out.splitlines()
    assert header.split() == [
        "NAME",
        "STATUS",
        "SENDERS",
        "NETWORKS",
        "EXPIRES",
        "CREATED",
        "LAST",
        "USED",
    ]
    assert re.fullmatch(
        rf"cron +expired +alice@example\.com +192\.0\.2\.0/24 +{ISO_TIME} +{ISO_TIME}"
        rf" +{ISO_TIME}",
        cron_row,
    )
    assert re.fullmatch(rf"gone +revoked +account's +any +never +{ISO_TIME} +never", gone_row)
    assert re.fullmatch(rf"web +active +account's +any +never +{ISO_TIME} +never", web_row)

    status, out, _ = run(capsys, *cfg, "credential", "list", "alice@example.com", "--json")
    listed = json.loads(out)
    assert [(c["name"], c["status"]) for c in listed] == [
        ("cron", "expired"),
        ("gone", "revoked"),
        ("web", "active"),
    ]
    assert listed[0] == {
        "id": cron.id,
        "account": "alice@example.com",
        "name": "cron",
        "status": "expired",
        "senders": ["alice@example.com"],
        "networks": ["192.0.2.0/24"],
        "limits": None,
        "expires_at": "1970-01-01T00:00:01Z",
        "created_at": rfc3339(cron.created_at),
        "last_used_at": "2027-01-15T08:00:00Z",
        "revoked_at": None,
    }
    assert listed[1]["revoked_at"] is not None
    assert listed[2]["senders"] is None and listed[2]["networks"] is None
    hashes = [bytes(h).hex() for (h,) in db.execute("SELECT secret_hash FROM credentials")]
    assert "hash" not in out and not any(h in out for h in hashes)
    assert web not in out and old not in out

    status, out, err = run(capsys, *cfg, "credential", "revoke", "alice@example.com", "gone")
    assert (status, out) == (2, "")
    assert err == "relaygate: credential 'gone' of alice@example.com is already revoked\n"
    status, out, err = run(capsys, *cfg, "credential", "revoke", "alice@example.com", "nope")
    assert (status, err) == (1, "relaygate: no such credential: 'nope' of alice@example.com\n")
    status, out, err = run(capsys, *cfg, "credential", "list", "ghost@example.com")
    assert (status, err) == (1, "relaygate: no such account: ghost@example.com\n")


def test_credential_limits(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    run(capsys, *cfg, "user", "add", "alice@example.com")
    add_credential(capsys, cfg, "alice@example.com", "--name", "web")
    none = (
        "credential 'web' of alice@example.com: no limit overrides;"
        " only the account's limits apply\n"
    )
    assert run(capsys, *cfg, "credential", "limits", "alice@example.com", "WEB") == (0, none, "")
    status, out, _ = run(
        capsys,
        *cfg,
        "credential",
        "limits",
        "alice@example.com",
        "web",
        "--messages-per-hour",
        "5",
        "--recipients-per-day",
        "0",
    )
    assert (status, out) == (
        0,
        "credential 'web' of alice@example.com: limit overrides:\n"
        "  messages_per_hour: 5\n"
        "  recipients_per_day: unlimited\n",
    )
    (stored,) = db.execute("SELECT limits FROM credentials").fetchone()
    assert json.loads(stored) == {"messages_per_hour": 5, "recipients_per_day": 0}
    _, out, _ = run(capsys, *cfg, "credential", "list", "alice@example.com", "--json")
    assert json.loads(out)[0]["limits"] == {"messages_per_hour": 5, "recipients_per_day": 0}
    assert run(capsys, *cfg, "credential", "limits", "alice@example.com", "web", "--clear")[1] == (
        none
    )
    status, _, err = run(capsys, *cfg, "credential", "limits", "alice@example.com", "nope")
    assert (status, err) == (1, "relaygate: no such credential: 'nope' of alice@example.com\n")


# ------------------------------------------------------------------ messages


def add_message(
    db: sqlite3.Connection,
    message_id: str,
    created_at: float,
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    subject: str = "hi",
) -> None:
    db.execute(
        "INSERT INTO messages (id, account, client_ip, mail_from, rcpt_to, subject, size,"
        " status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message_id,
            "alice@example.com",
            "192.0.2.7",
            "alice@example.com",
            json.dumps(["x@example.net", "y@example.net"]),
            subject,
            len(body),
            "captured",
            created_at,
        ),
    )
    db.execute("INSERT INTO message_bodies (id, body) VALUES (?, ?)", (message_id, body))


def test_messages_list(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    assert run(capsys, *cfg, "messages", "list")[1] == "no messages captured yet\n"
    add_message(db, "OLD1", 1_700_000_000.0)
    add_message(db, "NEW2", 1_700_000_100.0, subject="evil \x1b[2J subject")
    add_message(db, "MID3", 1_700_000_050.0)

    status, out, _ = run(capsys, *cfg, "messages", "list")
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "CREATED", "USER", "FROM", "TO", "SUBJECT", "SIZE", "STATUS"]
    assert [row.split()[0] for row in rows] == ["NEW2", "MID3", "OLD1"]
    assert "x@example.net, y@example.net" in rows[0]
    assert "\x1b" not in out and "evil \\x1b[2J subject" in rows[0]
    assert re.search(ISO_TIME, rows[0])

    status, out, _ = run(capsys, *cfg, "messages", "list", "--limit", "1", "--json")
    (only,) = json.loads(out)
    assert only["id"] == "NEW2"
    assert only["rcpt_to"] == ["x@example.net", "y@example.net"]
    assert only["created_at"] == "2023-11-14T22:15:00Z"
    assert only["body_removed_at"] is None
    assert only["status"] == "captured"


def test_messages_list_filters(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    add_message(db, "OLD1", 1_700_000_000.0, subject="invoice 7")  # 2023-11-14T22:13:20Z
    add_message(db, "NEW2", 1_700_100_000.0, subject="welcome")
    db.execute("UPDATE messages SET status = 'delivered' WHERE id = 'NEW2'")

    def ids(*options: str) -> list[str]:
        status, out, err = run(capsys, *cfg, "messages", "list", "--json", *options)
        assert status == 0, err
        return [m["id"] for m in json.loads(out)]

    assert ids("--search", "INVOICE") == ["OLD1"]
    assert ids("--status", "delivered") == ["NEW2"]
    assert ids("--account", "ALICE@example.com") == ["NEW2", "OLD1"]
    assert ids("--account", "bob@example.com") == []
    assert ids("--since", "2023-11-15") == ["NEW2"]
    assert ids("--until", "2023-11-14T22:13:21Z") == ["OLD1"]
    status, out, err = run(capsys, *cfg, "messages", "list", "--since", "last week")
    assert (status, out) == (2, "")
    assert err.startswith("relaygate: invalid --since: 'last week': use YYYY-MM-DD")


@pytest.mark.parametrize("limit", ["0", "-3", "many"])
def test_messages_list_bad_limit(
    capsys: pytest.CaptureFixture[str], cfg: list[str], limit: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        main([*cfg, "messages", "list", "--limit", limit])
    assert caught.value.code == 2
    assert "must be a whole number >= 1" in capsys.readouterr().err


def test_messages_show(
    capsys: pytest.CaptureFixture[str], cfg: list[str], db: sqlite3.Connection
) -> None:
    add_message(db, "ABC", 1_700_000_000.0, body=b"Subject: hi\r\n\r\ncaf\xc3\xa9 \xff\r\n")
    status, out, _ = run(capsys, *cfg, "messages", "show", "ABC")
    assert status == 0
    fields, text = out.split("\n\n", 1)
    assert fields.splitlines()[0] == "id: ABC"
    assert "user: alice@example.com" in fields
    assert "client ip: 192.0.2.7" in fields
    assert "to: x@example.net, y@example.net" in fields
    assert re.search(rf"^created: {ISO_TIME}$", fields, re.MULTILINE)
    assert text == "Subject: hi\n\ncafé \ufffd\n"


def test_messages_show_raw(
    capsysbinary: pytest.CaptureFixture[bytes], cfg: list[str], db: sqlite3.Connection
) -> None:
    body = b"Subject: raw\r\n\r\n\xff\x00 bytes\r\n.\r\n"
    add_message(db, "RAW", 1_700_000_000.0, body=body)
    assert main([*cfg, "messages", "show", "RAW", "--raw"]) == 0
    assert capsysbinary.readouterr().out == body


def test_messages_show_unknown(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, err = run(capsys, *cfg, "messages", "show", "NOPE")
    assert (status, out, err) == (1, "", "relaygate: no such message: NOPE\n")


# -------------------------------------------------------------------- errors


def test_bad_config_one_line_per_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('typo = 1\n[[listeners]]\naddress = "x"\ntls = "maybe"\n')
    status, out, err = run(capsys, "--config", str(path), "user", "list")
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        f"relaygate: {path}: typo: unknown setting",
        f"relaygate: {path}: listeners[0].address: must be host:port or [v6]:port (got 'x')",
    ]


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    status, _, err = run(capsys, "--config", str(path), "user", "list")
    assert (status, err) == (2, f"relaygate: {path}: cannot read: No such file or directory\n")


def test_unusable_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the data directory should be")
    path = tmp_path / "relaygate.toml"
    path.write_text('[server]\ndata_dir = "blocker"\n')
    status, out, err = run(capsys, "--config", str(path), "token", "add", "x")
    assert (status, out) == (1, "")
    assert err.startswith(f"relaygate: {tmp_path / 'blocker' / 'relaygate.db'}: ")
    assert err.count("\n") == 1


def test_quickstart_uses_current_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Quickstart: ./relaygate-data; a command that only reads finds none and makes none,
    status, _, err = run(capsys, "messages", "list")
    assert status == 1
    assert err.startswith(f"relaygate: no relaygate data in {tmp_path / 'relaygate-data'} ")
    assert not (tmp_path / "relaygate-data").exists()
    # while one that writes makes it there.
    assert run(capsys, "token", "add", "ci")[0] == 0
    assert (tmp_path / "relaygate-data" / "relaygate.db").exists()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["user"], ["frobnicate"], ["user", "add"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    assert "usage: relaygate" in capsys.readouterr().err


# ------------------------------------------------- the real installed command


def commands() -> list[list[str]]:
    found = [[sys.executable, "-m", "relaygate"]]
    script = Path(sys.executable).parent / "relaygate"
    if script.exists():
        found.append([str(script)])
    return found


@pytest.fixture(params=commands(), ids=lambda command: Path(command[-1]).name)
def command(request: pytest.FixtureRequest) -> list[str]:
    value: list[str] = request.param
    return value


def run_process(command: list[str], *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run(
        [*command, *argv], check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def test_process_bad_config(command: list[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\n")
    result = run_process(command, "--config", str(path), "user", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"relaygate: {path}: TOML syntax error: ")


def test_process_passwd_unknown_account(
    command: list[str], config_file: Path, tmp_path: Path
) -> None:
    result = run_process(
        command, "user", "passwd", "ghost@example.com", "--config", str(config_file), cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr == "relaygate: no such account: ghost@example.com\n"


def test_process_credential_error(command: list[str], config_file: Path, tmp_path: Path) -> None:
    result = run_process(
        command,
        "--config",
        str(config_file),
        "credential",
        "add",
        "ghost@example.com",
        "--name",
        "web",
        "--expires",
        "2001-01-01",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr == "relaygate: invalid expiry: '2001-01-01' is in the past\n"
    result = run_process(
        command,
        "--config",
        str(config_file),
        "credential",
        "add",
        "ghost@example.com",
        "--name",
        "web",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr == "relaygate: no such account: ghost@example.com\n"


def test_process_add_then_list(command: list[str], config_file: Path, tmp_path: Path) -> None:
    added = run_process(
        command, "--config", str(config_file), "user", "add", "a@b.example", cwd=tmp_path
    )
    assert added.returncode == 0, added.stderr
    listed = run_process(
        command, "--config", str(config_file), "user", "list", "--json", cwd=tmp_path
    )
    assert listed.returncode == 0, listed.stderr
    assert [a["address"] for a in json.loads(listed.stdout)] == ["a@b.example"]
    with closing(connect(tmp_path / "data" / "relaygate.db")) as db:
        assert AccountStore(db).count() == 1


# ------------------------------------------------------------------ migrate


def test_migrate_creates_then_reports_up_to_date_and_names_a_broken_file(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    cfg = ["--config", str(config_file)]
    path = config_file.parent / "data" / "relaygate.db"
    status, out, err = run(capsys, *cfg, "migrate")
    assert (status, err) == (0, "")
    version = int(out.rsplit("-> ", 1)[1])
    assert out == f"{path}: schema 0 -> {version}\n"
    assert run(capsys, *cfg, "migrate") == (0, f"{path}: schema {version}, up to date\n", "")
    path.write_bytes(b"not a database at all" * 100)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    status, out, err = run(capsys, *cfg, "migrate")
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and str(path) in err and "not a database" in err


# ------------------------------------------------------------------ HTTP API tokens


def test_token_add_list_revoke(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, err = run(capsys, *cfg, "token", "add", "grafana", "--read-only")
    assert (status, err) == (0, "")
    first = out.splitlines()[0]
    assert re.fullmatch(r"token grafana \(read-only\): rgt_[A-Za-z0-9_-]{43}", first), first
    status, out, err = run(capsys, *cfg, "token", "add", "deploy")
    assert status == 0 and "(read-write)" in out
    status, out, err = run(capsys, *cfg, "token", "add", "deploy")
    assert (status, out) == (1, "")
    assert err.strip() == "relaygate: a token named 'deploy' exists already"
    status, out, err = run(capsys, *cfg, "token", "list", "--json")
    listed = json.loads(out)
    assert [(t["name"], t["read_only"], t["last_used"]) for t in listed] == [
        ("deploy", False, None),
        ("grafana", True, None),
    ]
    assert "rgt_" not in out  # secrets are never shown again
    status, out, err = run(capsys, *cfg, "token", "list")
    assert out.splitlines()[0].split() == ["NAME", "ACCESS", "CREATED", "LAST", "USED"]
    assert re.search(rf"grafana +read-only +{ISO_TIME} +never", out), out
    assert run(capsys, *cfg, "token", "revoke", "grafana")[:2] == (0, "token grafana revoked\n")
    status, out, err = run(capsys, *cfg, "token", "revoke", "grafana")
    assert (status, err.strip()) == (1, "relaygate: no token named 'grafana'")
    status, out, err = run(capsys, *cfg, "token", "add", "bad name")
    assert status == 2 and "invalid token name" in err and "Traceback" not in err
