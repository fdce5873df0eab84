"""Signed webhooks end to end (issue 9, section 5): a real relaygate delivers
mail through an SMTP sink and POSTs events to a receiver on 127.0.0.1 that
checks every signature the Standard Webhooks way. Retries (with
RELAYGATE_WEBHOOK_TIME_SCALE=600, so 30 s becomes 0.05 s), a SIGKILL with
events pending, the SSRF rule in the config and the API, and a receiver that
never answers while SMTP keeps accepting. Runs on both storage backends."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fakes.smtp_sink import SMTPSink

from .delivery_helpers import DeliveryServer, delivery_toml, new_server, submit
from .helpers import (
    ALICE,
    ServerPool,
    api_call,
    clean_env,
    free_ports,
    make_message,
    session,
    wait_until,
)
from .security_helpers import raw_login

SECRET = "whsec_" + base64.b64encode(b"relaygate-e2e-webhook-key-32byte").decode()
RCPT = "someone@example.net"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1: records every POST, checks its signature,
    answers ``status`` (or, with ``hang``, never answers)."""

    status: int = 200
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def start(self) -> tuple[ThreadingHTTPServer, str]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append(Received(headers, body, _verify(headers, body)))
                if receiver.hang:
                    receiver.release.wait(30)
                    return
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/hook"

    def of(self, kind: str, message_id: str) -> list[Received]:
        return [
            r
            for r in self.requests
            if r.event["type"] == kind and r.event["data"].get("message_id") == message_id
        ]


def _verify(headers: dict[str, str], body: bytes) -> bool:
    """The Standard Webhooks check, written out independently of relaygate."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(
        hmac.compare_digest(s.removeprefix("v1,"), expected)
        for s in headers["webhook-signature"].split()
    )


@dataclass
class Setup:
    server: DeliveryServer
    receiver: Receiver
    sink: SMTPSink
    base: str  # the API's URL
    token: str


@pytest.fixture(scope="module")
def setup(servers: ServerPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    receiver = Receiver()
    http_server, url = receiver.start()
    sink = SMTPSink("127.0.0.1", 0).start()
    secret_file = tmp_path_factory.mktemp("hook") / "webhook.secret"
    secret_file.write_text(SECRET + "\n")
    (port,) = free_ports(1)
    toml = delivery_toml(
        {"mode": "smarthost", "retry_schedule": [1]},
        smarthost={"host": "127.0.0.1", "port": sink.port, "tls": "none"},
    )
    toml += (
        f'\n[http]\naddress = "127.0.0.1:{port}"\nallow_private_targets = true\n'
        f'\n[[webhooks]]\nurl = "{url}"\nsecret_file = "{secret_file}"\n'
    )
    server = new_server(
        servers,
        "webhooks",
        extra_toml=toml,
        users=[ALICE],
        env={"RELAYGATE_WEBHOOK_TIME_SCALE": "600"},
    )
    token = server.api_token("hooks")
    yield Setup(server, receiver, sink, f"http://127.0.0.1:{port}", token)
    receiver.release.set()
    http_server.shutdown()
    sink.stop()


@pytest.fixture
def hooks(setup: Setup) -> Setup:
    setup.receiver.status, setup.receiver.hang = 200, False
    setup.receiver.release.set()
    setup.receiver.release = threading.Event()
    return setup


def _api(setup: Setup, method: str, path: str, data: Any = None) -> tuple[int, Any]:
    return api_call(method, setup.base + path, setup.token, data)


def test_accepted_and_delivered_arrive_signed_with_stable_ids(hooks: Setup) -> None:
    [queue_id] = submit(hooks.server, ALICE, [RCPT], "webhooks: accepted and delivered")
    wait_until(
        lambda: bool(hooks.receiver.of("message.delivered", queue_id)),
        30,
        what="message.delivered",
    )
    [accepted] = hooks.receiver.of("message.accepted", queue_id)
    [delivered] = hooks.receiver.of("message.delivered", queue_id)
    assert accepted.verified and delivered.verified
    assert accepted.headers["webhook-id"] != delivered.headers["webhook-id"]
    assert accepted.event["data"]["account"] == ALICE.address
    assert accepted.event["data"]["recipients"] == [RCPT]
    assert accepted.event["timestamp"].endswith("Z")
    assert delivered.event["data"]["recipients"] == [RCPT]
    assert delivered.event["data"]["remote_reply"].startswith("250")
    assert accepted.headers["content-type"] == "application/json"


def test_a_failing_receiver_is_retried_with_the_same_id(hooks: Setup) -> None:
    hooks.receiver.status = 500
    [queue_id] = submit(hooks.server, ALICE, [RCPT], "webhooks: retried")
    wait_until(lambda: len(hooks.receiver.of("message.accepted", queue_id)) >= 2, 30, what="retry")
    hooks.receiver.status = 204
    wait_until(lambda: len(hooks.receiver.of("message.accepted", queue_id)) >= 3, 30, what="3rd")
    tries = hooks.receiver.of("message.accepted", queue_id)
    ids = {r.headers["webhook-id"] for r in tries}
    assert len(ids) == 1 and all(r.verified for r in tries)
    status, listing = _api(hooks, "GET", "/api/v1/webhooks")
    assert status == 200
    [hook] = listing["webhooks"]
    assert hook["source"] == "config" and hook["events"] == "all" and "secret" not in hook

    def attempts() -> list[dict[str, Any]]:
        _, body = _api(hooks, "GET", f"/api/v1/webhooks/{hook['id']}/attempts?limit=200")
        return [a for a in body["attempts"] if a["webhook_id"] in ids]

    wait_until(lambda: len(attempts()) >= 3, 10, what="attempts in the API")
    seen = attempts()
    assert [a["status_code"] for a in seen][-2:] == [500, 500]
    assert seen[0]["status_code"] == 204 and seen[0]["outcome"] == "delivered"
    assert seen[-1]["outcome"] == "retry" and seen[-1]["error"] == "HTTP 500"
    assert all(a["duration_ms"] >= 0 for a in seen)


def test_events_pending_at_a_sigkill_are_sent_after_the_restart(hooks: Setup) -> None:
    hooks.receiver.status = 503
    [queue_id] = submit(hooks.server, ALICE, [RCPT], "webhooks: killed")
    wait_until(lambda: bool(hooks.receiver.of("message.accepted", queue_id)), 30, what="1st try")
    hooks.server.kill()
    hooks.receiver.status = 200
    before = len(hooks.receiver.of("message.accepted", queue_id))
    hooks.server.start()
    wait_until(
        lambda: (
            len(hooks.receiver.of("message.accepted", queue_id)) > before
            and hooks.receiver.of("message.accepted", queue_id)[-1].verified
        ),
        30,
        what="delivery after the restart",
    )
    ids = {r.headers["webhook-id"] for r in hooks.receiver.of("message.accepted", queue_id)}
    assert len(ids) == 1
    wait_until(lambda: bool(hooks.receiver.of("message.delivered", queue_id)), 30, what="delivered")


def test_a_receiver_that_never_answers_does_not_slow_smtp(hooks: Setup) -> None:
    hooks.receiver.hang = True
    started = time.monotonic()
    ids = submit(hooks.server, ALICE, [RCPT], "webhooks: hanging receiver", count=5)
    took = time.monotonic() - started
    assert len(ids) == 5
    wait_until(lambda: bool(hooks.receiver.of("message.accepted", ids[0])), 30, what="1st POST")
    started = time.monotonic()
    more = submit(hooks.server, ALICE, [RCPT], "webhooks: still hanging", count=5)
    assert len(more) == 5
    assert time.monotonic() - started < max(2.0, 3 * took)  # not 10 s per hung POST


def test_api_webhooks_add_test_change_remove(hooks: Setup) -> None:
    _, url = hooks.receiver.start()
    status, made = _api(
        hooks, "POST", "/api/v1/webhooks", {"url": url, "events": ["auth.throttled"]}
    )
    assert status == 201 and made["secret"].startswith("whsec_") and made["source"] == "api"
    status, shown = _api(hooks, "GET", f"/api/v1/webhooks/{made['id']}")
    assert status == 200 and "secret" not in shown and shown["events"] == ["auth.throttled"]
    status, queued = _api(hooks, "POST", f"/api/v1/webhooks/{made['id']}/test")
    assert status == 202
    wait_until(
        lambda: any(r.headers["webhook-id"] == queued["queued"] for r in hooks.receiver.requests),
        30,
        what="webhook.test",
    )
    [test] = [r for r in hooks.receiver.requests if r.headers["webhook-id"] == queued["queued"]]
    assert test.event["type"] == "webhook.test"
    key = base64.b64decode(made["secret"].removeprefix("whsec_"))
    signed = f"{queued['queued']}.{test.headers['webhook-timestamp']}.".encode() + test.body
    mac = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert test.headers["webhook-signature"] == "v1," + mac
    status, changed = _api(hooks, "PATCH", f"/api/v1/webhooks/{made['id']}", {"events": []})
    assert status == 200 and changed["events"] == "all"
    status, error = _api(hooks, "PATCH", f"/api/v1/webhooks/{made['id']}", {"events": ["x"]})
    assert status == 400 and "unknown event" in error["error"]
    _, listing = _api(hooks, "GET", "/api/v1/webhooks")
    config_id = next(h["id"] for h in listing["webhooks"] if h["source"] == "config")
    status, error = _api(hooks, "DELETE", f"/api/v1/webhooks/{config_id}")
    assert status == 409 and "config" in error["error"]
    status, _ = _api(hooks, "DELETE", f"/api/v1/webhooks/{made['id']}")
    assert status == 200
    status, _ = _api(hooks, "GET", f"/api/v1/webhooks/{made['id']}")
    assert status == 404
    changes = [e for e in hooks.server.log_events("admin.change") if "webhook" in e["action"]]
    assert {e["action"] for e in changes} >= {"webhook.add", "webhook.test", "webhook.remove"}
    assert all(made["secret"] not in line for line in hooks.server.log_text().splitlines())


def test_private_targets_are_refused_without_allow_private_targets(
    servers: ServerPool, tmp_path: Path
) -> None:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_text(SECRET)
    (port,) = free_ports(1)
    http = f'\n[http]\naddress = "127.0.0.1:{port}"\n'
    hook = f'\n[[webhooks]]\nurl = "http://[::ffff:127.0.0.1]:9/x"\nsecret_file = "{secret_file}"\n'
    server = new_server(servers, "webhooks-private", extra_toml=http + hook, start=False)
    done = subprocess.run(
        server.command("serve"),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "webhooks[0].url" in lines[0], done.stderr
    assert "loopback" in lines[0] and "allow_private_targets" in lines[0]
    assert "Traceback" not in done.stderr
    server.extra_toml = http
    server.write_config()
    server.start()
    token = server.api_token("t")
    setup = Setup(server, Receiver(), None, f"http://127.0.0.1:{port}", token)  # type: ignore[arg-type]
    for url in ("http://127.0.0.1:8080/", "http://10.0.0.1/", "http://[fe80::1]/", "ftp://x/"):
        status, error = _api(setup, "POST", "/api/v1/webhooks", {"url": url})
        assert status == 400, (url, error)
        assert error["error"]
    status, _ = _api(setup, "POST", "/api/v1/webhooks", {"url": "https://hooks.example.com/r"})
    assert status == 201


def test_limit_and_throttle_events_once_a_minute(
    servers: ServerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAYGATE_WEBHOOK_TIME_SCALE", "600")  # the server inherits it
    (port,) = free_ports(1)
    server = servers.create(
        "webhooks-account-events",
        users=[ALICE],
        sections={
            "http": {"address": f"127.0.0.1:{port}", "allow_private_targets": True},
            "auth_throttle": {"ip_per_minute": 2},
        },
    )
    token = server.api_token("t")
    receiver = Receiver()
    http_server, url = receiver.start()
    try:
        setup = Setup(server, receiver, None, f"http://127.0.0.1:{port}", token)  # type: ignore[arg-type]
        events = ["account.limit_reached", "auth.throttled"]
        status, made = _api(setup, "POST", "/api/v1/webhooks", {"url": url, "events": events})
        assert status == 201
        time.sleep(2.5)  # the workers re-read API-made webhooks every second (time scale)
        server.cli("user", "limits", ALICE.address, "--messages-per-hour", "1")
        with session(server, user=ALICE) as client:
            for n in range(4):
                message = make_message(from_addr=ALICE.address, to=[RCPT], subject=f"m{n}")
                try:
                    client.send_mail(ALICE.address, [RCPT], message)
                except Exception:
                    client.command("RSET")
        for n in range(5):
            reply = raw_login(server, ALICE.address, f"Wrong-{n}-pw")
        assert reply.status == "454 4.7.0"
        wait_until(
            lambda: {r.event["type"] for r in receiver.requests} == set(events),
            30,
            what="both events",
        )
        time.sleep(1.5)  # a second copy would have come by now
        kinds = [r.event["type"] for r in receiver.requests]
        assert sorted(kinds) == sorted(events), kinds  # one each: once a minute at most
        limit = next(r for r in receiver.requests if r.event["type"] == "account.limit_reached")
        assert limit.event["data"]["account"] == ALICE.address
        assert limit.event["data"]["reply"].startswith("451 4.7.1")
        throttled = next(r for r in receiver.requests if r.event["type"] == "auth.throttled")
        assert throttled.event["data"]["client_ip"] == "127.0.0.1"
        assert throttled.event["data"]["scope"] == "ip"
        key = base64.b64decode(made["secret"].removeprefix("whsec_"))
        for r in receiver.requests:
            signed = f"{r.headers['webhook-id']}.{r.headers['webhook-timestamp']}.".encode()
            mac = hmac.new(key, signed + r.body, hashlib.sha256).digest()
            assert r.headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    finally:
        http_server.shutdown()
