"""One node on PostgreSQL, end to end: `relaygate migrate`, accounts made with the
CLI, mail submitted over STARTTLS + AUTH and read back with the CLI, from this
node and from another data_dir on the same database; and every way the
database can be wrong is one line and exit status 2.

Each test gets a database of its own on RELAYGATE_TEST_POSTGRES (the tests
fail, never skip, when PostgreSQL is not there).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from postgres_helpers import scratch_database

from fakes.smtp_sink import SMTPSink
from relaygate.storage.postgres.schema import SCHEMA_VERSION

from .delivery_helpers import loopback_address
from .helpers import (
    PROCESS_TIMEOUT,
    Server,
    ServerPool,
    TomlValue,
    User,
    b64,
    clean_env,
    make_message,
    session,
    wait_until,
)
from .link import Link, link_to
from .security_helpers import new_credential

ALICE = User("alice@example.com", "Alice-pg-pw-7Hq2")
RCPT = "someone@example.net"


@pytest.fixture
def database() -> Iterator[str]:
    with scratch_database() as url:
        yield url


def _storage(url: str) -> dict[str, dict[str, TomlValue]]:
    return {"storage": {"url": url}}


def test_migrate_then_serve_and_the_cli_sees_the_whole_database(
    database: str, fresh_servers: ServerPool
) -> None:
    node = fresh_servers.create(
        "pg-a", sections=_storage(database), start=False, node_name="node-a"
    )
    first = node.cli("migrate")
    assert f"schema 0 -> {SCHEMA_VERSION}" in first.stdout, first.stdout
    again = node.cli("migrate")
    assert f"schema {SCHEMA_VERSION}, up to date" in again.stdout
    node.add_user(ALICE)
    node.start()

    with session(node, user=ALICE) as client:
        queue_id = client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject="stored in postgres"),
        )

    # The row is in PostgreSQL, tagged with the node that took it.
    with psycopg.connect(database) as db:
        row = db.execute(
            "SELECT account, status, node FROM messages WHERE id = %s", (queue_id,)
        ).fetchone()
    assert row == (ALICE.address, "captured", "node-a")

    # Another data_dir (another machine's CLI) on the same database sees it.
    other = fresh_servers.create("pg-b", sections=_storage(database), start=False)
    listed = json.loads(other.cli("messages", "list", "--json").stdout)
    assert [m["id"] for m in listed] == [queue_id]
    shown = other.cli("messages", "show", queue_id).stdout
    assert "Subject: stored in postgres" in shown
    users = json.loads(other.cli("user", "list", "--json").stdout)
    assert [u["address"] for u in users] == [ALICE.address]


def test_a_password_changed_on_another_node_is_refused_at_the_next_login(
    database: str, fresh_servers: ServerPool
) -> None:
    node = fresh_servers.create("pg-pw", sections=_storage(database), start=False)
    node.cli("migrate")
    node.add_user(ALICE)
    node.start()
    with session(node, user=ALICE):
        pass
    elsewhere = fresh_servers.create("pg-admin", sections=_storage(database), start=False)
    elsewhere.set_password(ALICE.address, "Alice-new-pw-3Kd8")
    with pytest.raises(AssertionError, match="535"), session(node, user=ALICE):
        pass
    with session(node, user=User(ALICE.address, "Alice-new-pw-3Kd8")):
        pass


def _run(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "--config", str(server.config_path), *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=clean_env(),
        cwd=server.directory,
        check=False,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://relaygate@127.0.0.1:1/relaygate", "Connection refused"),
        ("postgresql://postgres@127.0.0.1:5432/relaygate_no_such_db", "does not exist"),
        ("postgresql://127.0.0.1:notaport/x", "invalid integer value"),
    ],
)
def test_a_database_that_cannot_be_used_is_one_line_and_exit_1_or_2(
    url: str, expected: str, tmp_path: Path
) -> None:
    server = Server(tmp_path / "bad", sections=_storage(url))
    for args in (("serve",), ("migrate",), ("user", "list"), ("messages", "list")):
        result = _run(server, *args)
        # serve: a start-up problem (2, like every one); a command: a runtime error (1).
        assert result.returncode == (2 if args == ("serve",) else 1), (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert lines[0].startswith("relaygate: ")


def test_commands_on_a_database_without_the_schema_say_to_migrate(
    database: str, tmp_path: Path
) -> None:
    server = Server(tmp_path / "nomigrate", sections=_storage(database))
    result = _run(server, "user", "list")
    assert result.returncode == 1
    assert "run `relaygate migrate`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_second_node_without_redis_is_refused_naming_the_key(
    database: str, fresh_servers: ServerPool
) -> None:
    first = fresh_servers.create("pg-one", sections=_storage(database), node_name="one")
    assert first.process is not None
    second = Server(fresh_servers.base / "pg-two", sections=_storage(database), node_name="two")
    result = _run(second, "serve")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "[shared] redis_url is required" in lines[0] and "one" in lines[0]


def test_storage_copy_moves_one_box_to_postgres_and_logins_keep_working(
    database: str, fresh_servers: ServerPool
) -> None:
    box = fresh_servers.create("box", users=[ALICE])
    secret = new_credential(box, ALICE.address, "shop")
    box.cli("user", "limits", ALICE.address, "--messages-per-day", "500")
    box.cli("dkim", "generate", "example.com")
    box.cli("token", "add", "ci", "--read-only")
    with session(box, user=ALICE) as client:
        queue_id = client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject="before the move"),
        )
    refused = box.cli("storage", "copy", "--to", database, check=False)
    assert refused.returncode == 2 and "stop it first" in refused.stderr
    box.stop()

    copied = box.cli("storage", "copy", "--to", database)
    assert "accounts: 1" in copied.stdout and "credentials: 1" in copied.stdout
    assert "messages: 1" in copied.stdout and "dkim keys: 1" in copied.stdout
    assert "api tokens: 1" in copied.stdout
    again = box.cli("storage", "copy", "--to", database, check=False)
    assert again.returncode == 2 and "is not empty" in again.stderr

    node = fresh_servers.create(
        "after", sections=_storage(database), node_name="after-move", start=True
    )
    # The password and the app credential (a keyed hash: the key moved too) still work.
    with session(node, user=ALICE):
        pass
    with session(node, user=User(ALICE.address, secret)) as client:
        client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject="after the move"),
        )
    listed = json.loads(node.cli("messages", "list", "--json").stdout)
    assert {m["subject"] for m in listed} == {"before the move", "after the move"}
    assert "Subject: before the move" in node.cli("messages", "show", queue_id).stdout
    users = json.loads(node.cli("user", "list", "--json").stdout)
    assert users[0]["limits"]["messages_per_day"] == 500
    tokens = json.loads(node.cli("token", "list", "--json").stdout)
    assert [(t["name"], t["read_only"]) for t in tokens] == [("ci", True)]

    nodes = json.loads(node.cli("nodes", "--json").stdout)
    assert [(n["name"], n["alive"]) for n in nodes] == [("after-move", True)]
    assert "after-move" in node.cli("nodes").stdout


def _through(url: str, link: Link) -> str:
    """``url`` with its host and port replaced by the link's."""
    rest = url.split("://", 1)[1]
    user, _, location = rest.rpartition("@")
    name = location.split("/", 1)[1]
    return f"postgresql://{user + '@' if user else ''}127.0.0.1:{link.port}/{name}"


def test_database_gone_temporary_failures_then_recovery_without_a_restart(
    database: str, fresh_servers: ServerPool
) -> None:
    with link_to("127.0.0.1", 5432) as link:
        node = fresh_servers.create(
            "pg-fault", sections=_storage(_through(database, link)), start=False
        )
        node.cli("migrate")
        node.add_user(ALICE)
        node.start()
        message = make_message(from_addr=ALICE.address, to=[RCPT], subject="through the link")
        with session(node, user=ALICE) as client:
            client.send_mail(ALICE.address, [RCPT], message)
            link.cut()
            # A transaction under way: nothing half-accepted, a 451 to retry later.
            client.transaction(ALICE.address, [RCPT])
            reply = client.data(message)
            assert reply.status == "451 4.3.0", str(reply)
        # A login that needs the database: 454 4.7.0 (temporary), not 535.
        with session(node) as client:
            reply = client.command("AUTH PLAIN " + b64(f"\0{ALICE.address}\0{ALICE.password}"))
            assert reply.status == "454 4.7.0", str(reply)
        link.mend()

        def sends() -> bool:
            try:
                with session(node, user=ALICE) as client:
                    client.send_mail(ALICE.address, [RCPT], message)
            except AssertionError:
                return False
            return True

        wait_until(sends, timeout=20, what="mail accepted again after the database came back")
        assert node.process is not None and node.process.poll() is None
        # Stored exactly twice: before the cut and after the mend.
        with psycopg.connect(database) as db:
            row = db.execute(
                "SELECT count(*) FROM messages WHERE subject = 'through the link'"
            ).fetchone()
        assert row == (2,)
        assert node.log_events("message.error") and node.log_events("auth.error")


def test_dkim_keys_made_on_one_node_are_every_node_s(database: str, tmp_path: Path) -> None:
    one = Server(tmp_path / "dkim-one", sections=_storage(database))
    two = Server(tmp_path / "dkim-two", sections=_storage(database))
    one.cli("migrate")
    made = one.cli("dkim", "generate", "Example.COM")
    assert "database: example.com/" in made.stdout and "v=DKIM1; k=rsa" in made.stdout
    one.cli("dkim", "generate", "example.com", "--algorithm", "ed25519")
    again = one.cli("dkim", "generate", "example.com", check=False)
    assert again.returncode == 2 and "already" in again.stderr
    listed = json.loads(two.cli("dkim", "list", "--json").stdout)
    assert sorted(k["algorithm"] for k in listed) == ["ed25519-sha256", "rsa-sha256"]
    assert all(k["domain"] == "example.com" for k in listed)
    assert not (two.data_dir / "dkim").exists()  # nothing on the node's disk


def test_hostile_header_bytes_are_stored_and_never_fail_a_shared_commit(
    database: str, fresh_servers: ServerPool
) -> None:
    """PostgreSQL text cannot hold NUL (nor JSON a lone surrogate): a Subject
    carrying one, raw or as an encoded word, or bytes that are not UTF-8, must
    still be accepted and shown, and must not fail the commit it shares with
    other sessions' messages."""
    node = fresh_servers.create("pg-hostile", sections=_storage(database), start=False)
    node.cli("migrate")
    node.add_user(ALICE)
    node.start()
    subjects = [
        b"raw \x00 nul",
        b"=?utf-8?q?encoded_=00_nul?=",
        b"=?utf-8?b?" + __import__("base64").b64encode(b"bad \xff\xfe utf8") + b"?=",
        b"latin1 \xe9t\xe9 \xff",
        b"=?unknown-charset?q?x=00?=",
    ]
    ids = []
    for n, subject in enumerate(subjects):
        message = (
            b"From: " + ALICE.address.encode() + b"\r\nTo: " + RCPT.encode() + b"\r\n"
            b"Subject: " + subject + b"\r\n\r\nbody " + str(n).encode() + b"\r\n"
        )
        with session(node, user=ALICE) as client:
            ids.append(client.send_mail(ALICE.address, [RCPT], message))
    listed = {m["id"]: m for m in json.loads(node.cli("messages", "list", "--json").stdout)}
    assert set(listed) == set(ids)
    for queue_id in ids:
        assert "\x00" not in listed[queue_id]["subject"]
    assert listed[ids[0]]["subject"] == "raw \ufffd nul"
    assert listed[ids[1]]["subject"] == "encoded \ufffd nul"
    shown = node.cli("messages", "show", ids[0]).stdout  # the body as it came
    assert "body 0" in shown


def test_delivery_and_the_queue_commands_on_postgresql(
    database: str, fresh_servers: ServerPool
) -> None:
    """A node on PostgreSQL delivers through its smarthost; a message the smarthost
    defers shows in `queue list` run from another data_dir (another machine),
    which can retry and delete it; nothing is kept in a SQLite file."""
    with SMTPSink(loopback_address(), 0) as sink:
        sections: dict[str, dict[str, TomlValue]] = {
            **_storage(database),
            "delivery": {"mode": "smarthost", "retry_schedule": [600]},
            "delivery.smarthost": {"host": sink.host, "port": sink.port, "tls": "none"},
        }
        node = fresh_servers.create("pg-deliver", sections=sections, start=False)
        node.cli("migrate")
        node.add_user(ALICE)
        node.start()
        with session(node, user=ALICE) as client:
            delivered = client.send_mail(
                ALICE.address,
                [RCPT],
                make_message(from_addr=ALICE.address, to=[RCPT], subject="first"),
            )
        sink.wait_for_messages(1, timeout=15)
        sink.reply_to("RCPT", "451 4.2.0 mailbox busy", times=None)
        with session(node, user=ALICE) as client:
            deferred = client.send_mail(
                ALICE.address, [RCPT], make_message(from_addr=ALICE.address, to=[RCPT], subject="2")
            )
        other = fresh_servers.create("pg-queue-cli", sections=_storage(database), start=False)

        def queued() -> list[dict[str, object]]:
            return list(json.loads(other.cli("queue", "list", "--json").stdout))

        wait_until(
            lambda: (
                [(r["id"], r["status"], r["attempts"]) for r in queued()]
                == [(deferred, "queued", 1)]
            ),
            15.0,
            what="the deferred message in the queue",
        )
        [row] = queued()
        assert row["last_reply"] == "451 4.2.0 mailbox busy" and row["node"] is None
        shown = other.cli("queue", "show", deferred).stdout
        assert "status: queued" in shown and "451 4.2.0 mailbox busy" in shown
        assert json.loads(other.cli("messages", "list", "--json").stdout)[-1]["id"] == delivered
        sink.reset_behaviour()
        assert "1 delivery(ies) will be tried now" in other.cli("queue", "retry", deferred).stdout
        sink.wait_for_messages(2, timeout=15)
        wait_until(lambda: queued() == [], 15.0, what="the queue to empty")
        statuses = {
            m["id"]: m["status"] for m in json.loads(other.cli("messages", "list", "--json").stdout)
        }
        assert statuses == {delivered: "delivered", deferred: "delivered"}
        gone = other.cli("queue", "delete", deferred, check=False)
        assert gone.returncode == 1 and gone.stderr.strip().endswith(
            f"nothing queued for {deferred}"
        )
    assert not (node.data_dir / "relaygate.db").exists()
    assert not (other.data_dir / "relaygate.db").exists()
