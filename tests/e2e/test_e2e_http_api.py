"""The admin API's write side over real HTTP: accounts, app credentials,
limits, the queue, DKIM keys and tokens, checked against what SMTP clients then
see and what the CLI prints. Runs on both storage backends (Makefile)."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import ALICE, Server, ServerPool, api_call, free_ports, make_message, session

RCPT = "someone@example.net"


@pytest.fixture(scope="module")
def api(servers: ServerPool) -> Iterator[tuple[Server, str, str, str]]:
    http_port, refusing = free_ports(2)
    server = servers.create(
        "http-api-admin",
        users=[ALICE],
        sections={
            "http": {"address": f"127.0.0.1:{http_port}"},
            # Onward delivery to a port nobody listens on: mail waits in the queue.
            "delivery": {"mode": "smarthost", "retry_schedule": [3600]},
            "delivery.smarthost": {"host": "127.0.0.1", "port": refusing, "tls": "none"},
        },
    )
    writer = server.api_token("ops")
    reader = server.api_token("grafana", "--read-only")
    yield server, f"http://127.0.0.1:{http_port}", writer, reader


def _smtp_login(server: Server, user: str, secret: str) -> bool:
    try:
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.implicit_port, context=server.client_context(), timeout=20
        ) as client:
            client.login(user, secret)
            return True
    except smtplib.SMTPAuthenticationError:
        return False


def test_accounts_made_and_changed_over_the_api_log_in_over_smtp(
    api: tuple[Server, str, str, str],
) -> None:
    server, base, token, _ = api
    status, made = api_call(
        "POST",
        f"{base}/api/v1/accounts",
        token,
        {"address": "App@Shop.example", "senders": ["@shop.example"]},
    )
    assert status == 201, made
    account, password = made["account"], made["password"]
    assert account["address"] == "App@shop.example" and account["senders"] == ["@shop.example"]
    assert "password_hash" not in json.dumps(made).lower().replace('"password"', "")
    assert _smtp_login(server, "app@shop.example", password)
    status, body = api_call(
        "POST", f"{base}/api/v1/accounts", token, {"address": "app@shop.example"}
    )
    assert status == 409 and body["error"] == "account already exists: app@shop.example"
    # The CLI sees the same account.
    listed = json.loads(server.cli("user", "list", "--json").stdout)
    assert any(a["address"] == "App@shop.example" for a in listed)
    status, body = api_call(
        "PATCH", f"{base}/api/v1/accounts/app@shop.example", token, {"disabled": True}
    )
    assert status == 200 and body["disabled"] is True
    assert not _smtp_login(server, "app@shop.example", password)
    status, body = api_call(
        "PATCH",
        f"{base}/api/v1/accounts/app@shop.example",
        token,
        {"disabled": False, "password": "a-new-long-password", "admin": True},
    )
    assert status == 200 and body["admin"] is True and body["disabled"] is False
    assert _smtp_login(server, "app@shop.example", "a-new-long-password")
    # One refused value refuses the whole PATCH: nothing of it is stored.
    for refused in ({"password": ""}, {"senders": ["not a pattern"]}):
        status, body = api_call(
            "PATCH",
            f"{base}/api/v1/accounts/app@shop.example",
            token,
            {"senders": ["@other.example"], "admin": False, "disabled": True, **refused},
        )
        assert status == 400, body
        status, body = api_call("GET", f"{base}/api/v1/accounts/app@shop.example", token)
        assert body["senders"] == ["@shop.example"] and body["admin"] is True, body
        assert body["disabled"] is False
        assert _smtp_login(server, "app@shop.example", "a-new-long-password")
    status, body = api_call(
        "PATCH", f"{base}/api/v1/accounts/app@shop.example/limits", token, {"messages_per_hour": 5}
    )
    assert status == 200 and body["limits"] == {"messages_per_hour": 5}
    assert api_call("GET", f"{base}/api/v1/accounts/app@shop.example", token)[1]["limits"] == {
        "messages_per_hour": 5
    }
    assert api_call("DELETE", f"{base}/api/v1/accounts/app@shop.example", token)[0] == 204
    assert api_call("GET", f"{base}/api/v1/accounts/app@shop.example", token)[0] == 404
    assert not _smtp_login(server, "app@shop.example", "a-new-long-password")
    changes = [
        e
        for e in server.log_events("admin.change")
        if e.get("account", "").lower() == "app@shop.example"
    ]
    assert [e["action"] for e in changes] == [
        "account.create",
        "account.change",
        "account.change",
        "account.limits",
        "account.remove",
    ]
    assert all(e["by"] == "token:ops" for e in changes)
    assert server.secrets_in_log([password, "a-new-long-password"]) == []


def test_credentials_made_over_the_api_send_mail_and_stop_when_revoked(
    api: tuple[Server, str, str, str],
) -> None:
    server, base, token, reader = api
    url = f"{base}/api/v1/accounts/{ALICE.address}/credentials"
    status, made = api_call(
        "POST", url, token, {"name": "shop-backend", "networks": ["127.0.0.0/8"]}
    )
    assert status == 201, made
    secret = made["secret"]
    assert secret.startswith("rgc_") and made["credential"]["status"] == "active"
    with session(server, user=None) as client:
        client.login(ALICE.address, secret)
        client.send_mail(
            ALICE.address,
            [RCPT],
            make_message(from_addr=ALICE.address, to=[RCPT], subject="via app"),
        )
    listed = api_call("GET", url, reader)[1]["credentials"]
    assert [c["name"] for c in listed] == ["shop-backend"] and listed[0]["last_used_at"]
    assert "secret" not in json.dumps(listed)
    status, body = api_call("PATCH", f"{url}/shop-backend/limits", token, {"messages_per_day": 9})
    assert status == 200 and body["limits"] == {"messages_per_day": 9}
    status, body = api_call("DELETE", f"{url}/shop-backend", token)
    assert status == 200 and body["status"] == "revoked"
    assert not _smtp_login(server, ALICE.address, secret)
    assert api_call("DELETE", f"{url}/nothing-here", token)[0] == 404
    assert (
        api_call("GET", f"{base}/api/v1/accounts/nobody@example.com/credentials", token)[0] == 404
    )
    assert server.secrets_in_log([secret]) == []


def test_queue_retry_and_delete(api: tuple[Server, str, str, str]) -> None:
    server, base, token, _ = api
    with session(server, user=ALICE) as client:
        queued = client.send_mail(
            ALICE.address, [RCPT], make_message(from_addr=ALICE.address, to=[RCPT], subject="waits")
        )
    status, body = api_call("GET", f"{base}/api/v1/queue", token)
    assert status == 200 and any(e["id"] == queued for e in body["queue"])
    status, body = api_call("POST", f"{base}/api/v1/queue/{queued}/retry", token)
    assert status == 200 and body["rows"] == 1
    assert api_call("POST", f"{base}/api/v1/queue/retry", token)[0] == 200
    status, body = api_call("DELETE", f"{base}/api/v1/queue/{queued}", token)
    assert status == 200 and body["rows"] == 1
    assert all(
        e["id"] != queued for e in api_call("GET", f"{base}/api/v1/queue", token)[1]["queue"]
    )
    assert api_call("DELETE", f"{base}/api/v1/queue/{queued}", token)[0] == 404
    cli = server.cli("queue", "list", "--json").stdout
    assert queued not in cli


def test_dkim_keys_and_tokens(api: tuple[Server, str, str, str]) -> None:
    _, base, token, _ = api
    status, key = api_call(
        "POST", f"{base}/api/v1/dkim", token, {"domain": "Mail.Example", "algorithm": "ed25519"}
    )
    assert status == 201, key
    assert (
        key["domain"] == "mail.example"
        and key["dns_name"] == "relaygate-ed25519._domainkey.mail.example"
    )
    assert key["txt"].startswith("v=DKIM1; k=ed25519; p=")
    status, body = api_call("GET", f"{base}/api/v1/dkim/mail.example", token)
    assert status == 200 and body["keys"][0]["txt"] == key["txt"]
    assert body["keys"][0]["dns"] in ("missing", "unknown")  # nothing publishes it
    assert api_call("GET", f"{base}/api/v1/dkim/none.example", token)[0] == 404
    status, body = api_call("POST", f"{base}/api/v1/dkim", token, {"domain": "../etc"})
    assert status == 400 and body["error"].startswith("invalid domain")
    names = [t["name"] for t in api_call("GET", f"{base}/api/v1/tokens", token)[1]["tokens"]]
    assert {"ops", "grafana"} <= set(names)


WRITES = [
    ("POST", "/api/v1/accounts", {"address": "x@example.com"}),
    ("PATCH", f"/api/v1/accounts/{ALICE.address}", {"disabled": True}),
    ("DELETE", f"/api/v1/accounts/{ALICE.address}", None),
    ("PATCH", f"/api/v1/accounts/{ALICE.address}/limits", {"messages_per_hour": 1}),
    ("POST", f"/api/v1/accounts/{ALICE.address}/credentials", {"name": "x"}),
    ("DELETE", f"/api/v1/accounts/{ALICE.address}/credentials/x", None),
    ("PATCH", f"/api/v1/accounts/{ALICE.address}/credentials/x/limits", {"messages_per_day": 1}),
    ("POST", "/api/v1/queue/retry", None),
    ("POST", "/api/v1/queue/ID/retry", None),
    ("DELETE", "/api/v1/queue/ID", None),
    ("POST", "/api/v1/dkim", {"domain": "x.example"}),
]


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_a_read_only_token_writes_nothing(
    api: tuple[Server, str, str, str], method: str, path: str, body: Any
) -> None:
    server, base, _, reader = api
    status, answer = api_call(method, base + path, reader, body)
    assert status == 403 and answer["error"] == "token grafana is read-only"
    assert _smtp_login(server, ALICE.address, ALICE.password)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "the request body must be a JSON object"),
        (b"[1, 2]", "the request body must be a JSON object"),
        (b'{"address": 7}', "address must be a string"),
        (b'{"address": "a@example.com", "role": "root"}', "unknown field: role"),
        (b'{"address": "a@example.com", "senders": "x"}', "senders must be a list of strings"),
        (b'{"address": "a@example.com", "admin": "yes"}', "admin must be true or false"),
        (b'{"address": "not an address"}', "invalid address"),
        (b'{"address": "\\u00e9\\u0000@example.com"}', "invalid address"),
        (b"{}", "address is required"),
        (b"[" * 100_000 + b"]" * 100_000, "the request body must be a JSON object"),
    ],
)
def test_bad_bodies_are_400_with_a_reason(
    api: tuple[Server, str, str, str], body: bytes, error: str
) -> None:
    _, base, token, _ = api
    status, answer = api_call("POST", f"{base}/api/v1/accounts", token, raw=body)
    assert status == 400 and answer["error"].startswith(error), answer


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"messages_per_hour": -1}, "messages_per_hour must be a whole number from 0 to"),
        ({"messages_per_hour": True}, "messages_per_hour must be a whole number from 0 to"),
        ({"messages_per_hour": 1.5}, "messages_per_hour must be a whole number from 0 to"),
        ({"per_second": 1}, "unknown field: per_second"),
    ],
)
def test_bad_limits_are_400(api: tuple[Server, str, str, str], body: Any, error: str) -> None:
    _, base, token, _ = api
    status, answer = api_call(
        "PATCH", f"{base}/api/v1/accounts/{ALICE.address}/limits", token, body
    )
    assert status == 400 and answer["error"].startswith(error), answer
