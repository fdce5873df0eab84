"""End to end: the compromised-account defence holds, alerts, releases, purges.

A real relaygate delivers through a smarthost (an SMTP sink on 127.0.0.1), so
what leaves is observable, with small ``[defence]`` thresholds: volume floor
12, new-network burst 5, remote refusals 3 at a rate over 0.5. Each test
uses an account of its own (counts are per account). A login "from another
network" binds the client to another loopback address (127.77.0.5: another
/24). A webhook receiver on 127.0.0.1 takes ``account.held``.

Runs on SQLite and, with RELAYGATE_E2E_STORAGE=postgresql, on PostgreSQL.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from postgres_helpers import scratch_database

from fakes.smtp_sink import SMTPSink
from relaygate.quotas import window_keys

from .delivery_helpers import DeliveryServer, delivery_toml, new_server
from .helpers import ServerPool, User, api_call, free_ports, make_message, session, wait_until

OTHER_NETWORK = "127.77.0.5"  # another /24 than 127.0.0.1
FLOOR = 12
BURST = 5
ADMIN = User("admin@example.test", "Admin-defence-pw-8Rt2")


@dataclass
class Hooks:
    events: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> tuple[ThreadingHTTPServer, str]:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                hooks.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/hook"

    def held(self, account: str) -> list[dict[str, Any]]:
        return self.about("account.held", account)

    def about(self, event_type: str, account: str) -> list[dict[str, Any]]:
        return [
            e for e in self.events if e["type"] == event_type and e["data"]["account"] == account
        ]


@dataclass
class Setup:
    server: DeliveryServer
    sink: SMTPSink
    hooks: Hooks
    base: str  # the HTTP API and UI
    token: str


@pytest.fixture(scope="module")
def setup(servers: ServerPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    hooks = Hooks()
    http_server, url = hooks.start()
    sink = SMTPSink("127.0.0.1", 0).start()
    secret = tmp_path_factory.mktemp("defence") / "webhook.secret"
    secret.write_text("whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVowMTIzNDU=" + "\n")
    (port,) = free_ports(1)
    toml = delivery_toml(
        {"mode": "smarthost", "retry_schedule": [60]},
        smarthost={"host": "127.0.0.1", "port": sink.port, "tls": "none"},
    )
    toml += (
        f'\n[http]\naddress = "127.0.0.1:{port}"\nallow_private_targets = true\n'
        f'\n[[webhooks]]\nurl = "{url}"\nsecret_file = "{secret}"\n'
        'events = ["account.held", "account.released", "account.purged"]\n'
    )
    server = new_server(
        servers,
        "defence",
        extra_toml=toml,
        env={"RELAYGATE_WEBHOOK_TIME_SCALE": "600"},
        start=False,
    )
    server.sections["defence"] = {
        "volume_factor": 3,
        "volume_floor": FLOOR,
        "new_recipient_min": 0,
        "new_network_burst": BURST,
        "remote_reject_rate": 0.5,
        "remote_reject_min": 3,
        "refresh_seconds": 0.5,
    }
    server.write_config()
    server.add_user(ADMIN)
    server.cli("user", "admin", ADMIN.address, "on")
    server.start()
    token = server.api_token("defence")
    yield Setup(server, sink, hooks, f"http://127.0.0.1:{port}", token)
    http_server.shutdown()
    sink.stop()


def _user(setup: Setup, name: str) -> User:
    user = User(f"{name}@example.test", f"Defence-{name}-pw-5Kq9")
    setup.server.add_user(user)
    return user


def _send(
    setup: Setup, user: User, count: int, *, source: str | None = None, rcpt: str | None = None
) -> list[str]:
    """``count`` messages on one session; each must get 250. Their queue ids."""
    ids = []
    with session(setup.server, user=user, source=source) as client:
        for n in range(count):
            to = [rcpt or f"friend{n % 3}@example.net"]
            message = make_message(from_addr=user.address, to=to, subject=f"{user.address} {n}")
            ids.append(client.send_mail(user.address, to, message))
        client.command("QUIT")
    return ids


def _delivered(setup: Setup, user: User) -> Counter[str]:
    """Message-IDs the sink got from this account, with how often."""
    return Counter(
        str(m.message()["Message-ID"]) for m in setup.sink.messages if m.mail_from == user.address
    )


def _statuses(setup: Setup, user: User) -> dict[str, str]:
    listed = setup.server.quick_json("messages", "list", "--json", "--account", user.address)
    return {m["id"]: m["status"] for m in listed}


def _held_list(setup: Setup) -> dict[str, dict[str, Any]]:
    return {h["account"]: h for h in setup.server.quick_json("held", "list", "--json")}


def _settled(setup: Setup, user: User, ids: list[str]) -> dict[str, str]:
    """Wait until no message of ``ids`` is queued or being sent; their statuses."""

    def done() -> bool:
        statuses = _statuses(setup, user)
        return all(statuses.get(i) not in (None, "queued", "sending") for i in ids)

    wait_until(done, 30, what=f"{user.address}'s messages to settle")
    return _statuses(setup, user)


def _api(setup: Setup, method: str, path: str, data: Any = None) -> tuple[int, Any]:
    return api_call(method, setup.base + path, setup.token, data)


def _seed_baseline(setup: Setup, user: User, per_hour: int) -> None:
    """A steady account's 14 days: ``per_hour`` messages in every past hour (the
    hourly counters acceptance writes), written into the storage directly."""
    now = time.time()
    rows = [
        (f"account:{user.address}", window_keys(now - h * 3600)[0], per_hour, per_hour, 0)
        for h in range(1, 14 * 24)
    ]
    url = setup.server.scratch_database
    if url is None:
        db = sqlite3.connect(setup.server.data_dir / "relaygate.db")
        with db:
            db.executemany("INSERT INTO send_counters VALUES (?, ?, ?, ?, ?)", rows)
        db.close()
        return
    with psycopg.connect(url) as pg:
        pg.cursor().executemany(
            'INSERT INTO send_counters (scope, "window", messages, recipients, new_recipients)'
            " VALUES (%s, %s, %s, %s, %s)",
            rows,
        )


# ------------------------------------------------------------------ tests


def test_a_steady_account_within_its_baseline_is_never_held(setup: Setup) -> None:
    user = _user(setup, "steady")
    _seed_baseline(setup, user, 10)  # threshold: max(3 x 10, 12) = 30 an hour
    ids = _send(setup, user, 20)
    statuses = _settled(setup, user, ids)
    assert set(statuses.values()) == {"delivered"}, statuses
    assert len(_delivered(setup, user)) == 20
    assert user.address not in _held_list(setup)
    assert not setup.hooks.held(user.address)


def test_a_burst_from_a_new_network_is_held_and_release_delivers_it_once(setup: Setup) -> None:
    user = _user(setup, "roamer")
    [first] = _send(setup, user, 1)  # its usual network
    ids = _send(setup, user, 15, source=OTHER_NETWORK)  # every one answered 250
    statuses = _settled(setup, user, [first, *ids])
    held = [i for i in [first, *ids] if statuses[i] == "held"]
    delivered = _delivered(setup, user)
    # Held within the configured burst: at most BURST messages went out (those still
    # queued when the trigger fired were held with the rest).
    assert len(delivered) <= BURST, statuses
    assert len(held) == 16 - len(delivered)
    entry = _held_list(setup)[user.address]
    assert entry["held"] and entry["reason"] == "new_network"
    assert entry["held_messages"] == len(held)
    wait_until(lambda: bool(setup.hooks.held(user.address)), 30, what="account.held webhook")
    [event] = setup.hooks.held(user.address)
    assert event["data"]["reason"] == "new_network"
    assert "from a new network 127.77.0.0/24 >" in event["data"]["detail"]  # which one
    # `held show` (and the API) lists where and with what the account logged in.
    shown = json.loads(setup.server.cli("held", "show", user.address, "--json").stdout)
    assert shown["held"]["reason"] == "new_network" and shown["account"] == user.address
    networks = {n["network"]: n["new"] for n in shown["networks"]}
    assert networks == {"127.77.0.0/24": True, "127.0.0.0/24": False}, shown
    assert shown["networks"][0]["network"] == "127.77.0.0/24"  # most recent first
    assert [c["client"] for c in shown["clients"]] == ["client.test"]  # the tests' EHLO
    status, body = _api(setup, "GET", f"/api/v1/held/{user.address}")
    assert status == 200 and body["networks"] == shown["networks"]
    text = setup.server.cli("held", "show", user.address).stdout
    assert "127.77.0.0/24  first " in text and text.count("  new") == 1, text
    assert event["data"]["counts"]["messages"] == BURST + 1
    [line] = [e for e in setup.server.log_events("account.held") if e["account"] == user.address]
    assert line["reason"] == "new_network"
    logged = {e["queue_id"] for e in setup.server.log_events("message.accepted") if e.get("held")}
    # From the trigger on, every message is logged held at once (those still queued
    # then were held afterwards, without the mark).
    assert len(logged & set(ids)) == 15 - (BURST - 1) and logged & set(ids) <= set(held)

    # A restart keeps held mail held.
    setup.server.stop()
    setup.server.start()
    time.sleep(2)
    assert _delivered(setup, user) == delivered
    assert [i for i, s in _statuses(setup, user).items() if s == "held"] != []

    out = setup.server.cli("held", "release", user.address, "--json").stdout
    released = json.loads(out)["released"]
    assert sorted(released) == sorted(held)
    wait_until(lambda: len(_delivered(setup, user)) == 16, 30, what="the held mail")
    time.sleep(2)  # nothing comes twice
    assert set(_delivered(setup, user).values()) == {1}
    assert set(_statuses(setup, user).values()) == {"delivered"}
    assert user.address not in _held_list(setup)
    # Released, the burst is expected: more mail flows at once.
    more = _send(setup, user, 3, source=OTHER_NETWORK)
    assert {_settled(setup, user, more)[i] for i in more} == {"delivered"}
    again = setup.server.cli("held", "release", user.address, check=False)
    assert again.returncode == 1 and "no such held account" in again.stderr
    # The CLI's release reached the config's webhook, once (the refused second did not).
    wait_until(
        lambda: bool(setup.hooks.about("account.released", user.address)), 30, what="the webhook"
    )
    time.sleep(1)
    [event] = setup.hooks.about("account.released", user.address)
    assert event["data"]["messages"] == len(held)
    assert event["data"]["expected_until"].endswith("Z")


def test_volume_over_the_floor_is_held_and_purge_delivers_none(setup: Setup) -> None:
    user = _user(setup, "leaky")
    ids = _send(setup, user, 20)
    statuses = _settled(setup, user, ids)
    held = [i for i in ids if statuses[i] == "held"]
    sent = len(_delivered(setup, user))
    assert sent <= FLOOR and len(held) == 20 - sent  # queued ones were held with the rest
    assert _held_list(setup)[user.address]["reason"] == "volume"
    # The queue shows the held mail as held, with no try planned; retry says why not.
    status, body = _api(setup, "GET", "/api/v1/queue")
    waiting = {e["id"]: e for e in body["queue"] if e["id"] in held}
    assert status == 200 and sorted(waiting) == sorted(held)
    assert {(e["status"], e["next_attempt"]) for e in waiting.values()} == {("held", None)}
    retry = setup.server.cli("queue", "retry", held[0], check=False)
    assert retry.returncode == 1 and "is held: relaygate held release" in retry.stderr
    status, body = _api(setup, "POST", f"/api/v1/held/{user.address}/purge")
    assert status == 200 and sorted(body["purged"]) == sorted(held)
    time.sleep(2)
    assert len(_delivered(setup, user)) == sent
    assert not [m for m in setup.sink.messages if m.mail_from == ""]  # no bounce
    assert sorted(i for i, s in _statuses(setup, user).items() if s == "purged") == sorted(held)
    status, body = _api(setup, "GET", "/api/v1/held")
    assert status == 200 and user.address not in {h["account"] for h in body["held"]}
    assert _api(setup, "POST", f"/api/v1/held/{user.address}/purge")[0] == 404
    wait_until(
        lambda: bool(setup.hooks.about("account.purged", user.address)), 30, what="the webhook"
    )
    [event] = setup.hooks.about("account.purged", user.address)
    assert event["data"] == {"account": user.address, "messages": len(held)}
    assert not setup.hooks.about("account.released", user.address)
    assert _api(setup, "POST", "/api/v1/held/a%0d%0ab/release")[0] == 400


def test_parallel_sessions_during_the_trigger_leak_nothing(setup: Setup) -> None:
    user = _user(setup, "crowd")
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(_send(setup, user, 8))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(results) == 4
    ids = [i for r in results for i in r]
    wait_until(lambda: user.address in _held_list(setup), 30, what="the hold")

    def quiet() -> bool:
        statuses = _statuses(setup, user)
        sent = sum(1 for i in ids if statuses[i] == "delivered")
        return "sending" not in statuses.values() and len(_delivered(setup, user)) == sent

    wait_until(quiet, 30, what="deliveries in progress to finish")
    time.sleep(2)
    statuses = _statuses(setup, user)
    sent = [i for i in ids if statuses[i] == "delivered"]
    # Held, or queued by a commit that landed just after the hold: the queue never
    # claims a held account's rows either way.
    waiting = sorted(i for i in ids if statuses[i] in ("held", "queued"))
    assert len(sent) + len(waiting) == 32, statuses
    assert len(_delivered(setup, user)) == len(sent)  # nothing held went out
    assert len(sent) <= FLOOR + 4  # the floor, and at most one in flight per session
    assert _held_list(setup)[user.address]["held_messages"] == len(waiting)
    purged = json.loads(setup.server.cli("held", "purge", user.address, "--json").stdout)
    assert sorted(purged["purged"]) == waiting
    time.sleep(1)
    assert len(_delivered(setup, user)) == len(sent)


def test_many_recipients_refused_by_the_remote_server_hold_the_account(setup: Setup) -> None:
    user = _user(setup, "spammer")
    for n in range(3):
        setup.sink.reject_recipient(f"gone{n}@example.net", "550 5.1.1 No such user")
    for n in range(3):
        _send(setup, user, 1, rcpt=f"gone{n}@example.net")
    wait_until(lambda: user.address in _held_list(setup), 30, what="the remote_rejects hold")
    assert _held_list(setup)[user.address]["reason"] == "remote_rejects"
    time.sleep(1)  # the worker sees the hold (refresh_seconds 0.5)
    [later] = _send(setup, user, 1, rcpt="friend@example.net")
    time.sleep(2)
    assert _statuses(setup, user)[later] == "held"
    assert not [
        m
        for m in setup.sink.messages
        if "friend@example.net" in m.rcpt_to and m.mail_from == user.address
    ]
    setup.server.cli("held", "purge", user.address)


def test_the_ui_lists_held_accounts_and_releases_with_its_csrf_token(setup: Setup) -> None:
    user = _user(setup, "uiheld")
    ids = _send(setup, user, FLOOR + 1)
    statuses = _settled(setup, user, ids)
    held = [i for i in ids if statuses[i] == "held"]
    assert held
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    login = urllib.parse.urlencode({"address": ADMIN.address, "password": ADMIN.password})
    opener.open(setup.base + "/login", login.encode(), timeout=20).read()
    page = opener.open(setup.base + "/held", timeout=20).read().decode()
    assert user.address in page and "volume" in page
    row = re.search(rf'<tr data-account="{re.escape(user.address)}">(.*?)</tr>', page, re.S)
    assert row is not None and "127.0.0.0/24" in row.group(1)
    assert "EHLO:</span> client.test" in row.group(1)
    # The dashboard counts held mail apart from the waiting queue, with a link here
    # (other tests' accounts may hold mail too).
    dashboard = opener.open(setup.base + "/", timeout=20).read().decode()
    linked = re.search(r'href="/held" data-testid="queue-held">(\d+) held<', dashboard)
    assert linked is not None and int(linked.group(1)) >= len(held), dashboard
    queue = opener.open(setup.base + "/queue", timeout=20).read().decode()
    row = re.search(rf'<tr data-id="{held[0]}">(.*?)</tr>', queue, re.S)
    assert row is not None and "on release" in row.group(1)
    assert 'value="retry"' not in row.group(1) and 'value="delete"' in row.group(1)
    query = urllib.parse.urlencode({"q": user.address, "status": "held"})
    listed = opener.open(f"{setup.base}/messages?{query}", timeout=20).read().decode()
    assert all(i in listed for i in held)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    form = {"action": "release", "account": user.address}
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(setup.base + "/held/action", urllib.parse.urlencode(form).encode(), 20)
    assert refused.value.code == 403
    assert user.address in _held_list(setup)
    form["csrf"] = csrf.group(1)
    after = opener.open(setup.base + "/held/action", urllib.parse.urlencode(form).encode(), 20)
    assert f"{len(held)} message(s) released" in after.read().decode()
    wait_until(lambda: len(_delivered(setup, user)) == FLOOR + 1, 30, what="the released mail")
    assert set(_statuses(setup, user).values()) == {"delivered"}


def test_held_commands_report_bad_input_in_one_line(setup: Setup) -> None:
    unknown = setup.server.cli("held", "show", "nobody@example.com", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "relaygate: no such account: nobody@example.com"
    assert _api(setup, "GET", "/api/v1/held/nobody@example.com")[0] == 404
    assert _api(setup, "GET", "/api/v1/held/a%0d%0ab")[0] == 400
    steady = json.loads(setup.server.cli("held", "show", ADMIN.address, "--json").stdout)
    assert steady["held"] is None
    bad = setup.server.cli("held", "release", "not an address", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    unknown = setup.server.cli("held", "expect", "nobody@example.test", check=False)
    assert unknown.returncode == 1 and "no such account" in unknown.stderr
    user = _user(setup, "newsletter")
    wrong = setup.server.cli("held", "expect", user.address, "--for", "soon", check=False)
    assert wrong.returncode == 2 and "--for" in wrong.stderr
    out = setup.server.cli("held", "expect", user.address, "--for", "2h", "--messages", "50")
    assert "50 messages an hour expected" in out.stdout
    ids = _send(setup, user, FLOOR + 8)  # over the floor, within 3 x 50
    assert set(_settled(setup, user, ids).values()) == {"delivered"}


@pytest.mark.sqlite_only
def test_storage_copy_moves_held_mail_and_holds_to_postgres(
    setup: Setup, servers: ServerPool
) -> None:
    toml = delivery_toml(
        {"mode": "smarthost", "retry_schedule": [60]},
        smarthost={"host": "127.0.0.1", "port": setup.sink.port, "tls": "none"},
    )
    rules = {"volume_floor": 3, "new_recipient_min": 0, "refresh_seconds": 0.5}
    box = new_server(servers, "defence-box", extra_toml=toml, start=False)
    box.sections["defence"] = dict(rules)
    box.write_config()
    user = User("mover@example.test", "Defence-mover-pw-3Jd7")
    box.add_user(user)
    box.start()
    with session(box, user=user) as client:
        ids = [
            client.send_mail(
                user.address,
                ["friend@example.net"],
                make_message(from_addr=user.address, to=["friend@example.net"], subject=str(n)),
            )
            for n in range(6)
        ]

    def statuses() -> dict[str, str]:
        out = box.cli("messages", "list", "--json").stdout
        return {m["id"]: m["status"] for m in json.loads(out)}

    wait_until(lambda: "queued" not in statuses().values(), 30, what="settled")
    held = sorted(i for i, s in statuses().items() if s == "held")
    assert held and set(ids) >= set(held)
    box.stop()
    with scratch_database() as url:
        copied = box.cli("storage", "copy", "--to", url).stdout
        assert "held or expected accounts: 1" in copied, copied
        assert "networks and clients seen: 2" in copied, copied
        node = new_server(servers, "defence-node", extra_toml=toml, start=False)
        node.sections["storage"] = {"url": url}
        node.sections["defence"] = dict(rules)
        node.write_config()
        node.start()
        try:
            [entry] = json.loads(node.cli("held", "list", "--json").stdout)
            assert entry["account"] == user.address and entry["held_messages"] == len(held)
            time.sleep(1)  # the copied hold keeps the queue away from them
            assert len(_delivered(setup, user)) == 6 - len(held)
            released = json.loads(node.cli("held", "release", user.address, "--json").stdout)
            assert sorted(released["released"]) == held
            wait_until(lambda: len(_delivered(setup, user)) == 6, 30, what="released mail")
        finally:
            node.stop()


def test_two_workers_a_hold_by_one_stops_what_the_other_still_accepts(
    setup: Setup, servers: ServerPool
) -> None:
    toml = delivery_toml(
        {"mode": "smarthost", "retry_schedule": [60]},
        smarthost={"host": "127.0.0.1", "port": setup.sink.port, "tls": "none"},
    )
    # A long refresh: a worker that did not make the hold keeps accepting as queued
    # for a while; the queue must still never claim those.
    server = DeliveryServer(servers.base / "defence-workers", extra_toml=toml, workers=2)
    servers.servers.append(server)
    server.sections["defence"] = {"volume_floor": 3, "new_recipient_min": 0, "refresh_seconds": 30}
    server.write_config()
    user = User("twoworkers@example.test", "Defence-workers-pw-6Wm1")
    server.add_user(user)
    server.start()
    ids: list[str] = []
    for n in range(12):  # one connection each: the kernel spreads them over both workers
        with session(server, user=user) as client:
            to = ["friend@example.net"]
            message = make_message(from_addr=user.address, to=to, subject=f"w{n}")
            ids.append(client.send_mail(user.address, to, message))

    def statuses() -> dict[str, str]:
        out = server.cli("messages", "list", "--json").stdout
        return {m["id"]: m["status"] for m in json.loads(out)}

    wait_until(lambda: "sending" not in statuses().values(), 30, what="settled")
    time.sleep(2)
    final = statuses()
    delivered = [i for i in ids if final[i] == "delivered"]
    assert len(_delivered(setup, user)) == len(delivered) <= 3 * 2  # each worker's own count
    assert user.address in {
        h["account"] for h in json.loads(server.cli("held", "list", "--json").stdout)
    }
    waiting = sorted(i for i in ids if final[i] != "delivered")
    assert set(final[i] for i in waiting) <= {"held", "queued"}
    purged = json.loads(server.cli("held", "purge", user.address, "--json").stdout)["purged"]
    assert sorted(purged) == waiting  # held, and queued by the worker that had not seen it
    time.sleep(1)
    assert len(_delivered(setup, user)) == len(delivered)


def test_the_api_checks_tokens_and_input_of_the_held_routes(setup: Setup) -> None:
    user = _user(setup, "apiexpect")
    out = setup.server.cli("token", "add", "defence-reader", "--read-only").stdout
    reader = Setup(
        setup.server, setup.sink, setup.hooks, setup.base, out.splitlines()[0].split()[-1]
    )
    assert _api(reader, "GET", "/api/v1/held")[0] == 200
    assert _api(reader, "POST", f"/api/v1/held/{user.address}/release")[0] == 403
    assert _api(reader, "POST", f"/api/v1/held/{user.address}/expect", {})[0] == 403
    path = f"/api/v1/held/{user.address}/expect"
    for body in ({"for": "soon"}, {"for": 5}, {"messages": -1}, {"messages": True}, {"x": 1}):
        status, answer = _api(setup, "POST", path, body)
        assert status == 400 and "\\n" not in answer["error"], (body, answer)
    assert _api(setup, "POST", "/api/v1/held/nobody@example.test/expect", {})[0] == 404
    status, answer = _api(setup, "POST", path, {"for": "3h", "messages": 40})
    assert status == 200 and answer["messages"] == 40 and answer["until"].endswith("Z")
    changes = [e for e in setup.server.log_events("admin.change") if e["action"] == "held.expect"]
    assert changes and changes[-1]["by"] == "token:defence"
