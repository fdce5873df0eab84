"""Webhook signing (Standard Webhooks), the SSRF rule, the retry schedule, payloads."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from relaygate.config import ConfigError, config_from_dict
from relaygate.webhooks import events as ev
from relaygate.webhooks import signing
from relaygate.webhooks.schedule import RETRY_DELAYS, retry_delay
from relaygate.webhooks.targets import TargetError, check_url, refusal

# The example secret of the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _reference(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    """The specification's algorithm, written out here independently."""
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, msg_id.encode() + b"." + str(ts).encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_signature_matches_the_reference_algorithm() -> None:
    body = b'{"test": 2432232314}'
    key = signing.secret_key(SPEC_SECRET)
    got = signing.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert got == _reference(SPEC_SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    # The signature the specification's own libraries give for this example.
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_carry_id_timestamp_and_signature() -> None:
    secret = signing.new_secret()
    body = ev.body("message.delivered", 0, {"message_id": "x"}).encode()
    headers = signing.headers(signing.secret_key(secret), "evt_1", 1700000000, body)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"] == _reference(secret, "evt_1", 1700000000, body)


@pytest.mark.parametrize(
    "secret", ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_YWJj"]
)
def test_bad_secrets_are_refused(secret: str) -> None:
    with pytest.raises(signing.SecretError):
        signing.secret_key(secret)


def test_new_secrets_are_whsec_with_a_32_byte_key() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    assert len(signing.secret_key(secret)) == 32
    assert signing.new_secret() != secret


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("100.127.255.254", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("198.18.0.1", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback (inside IPv6)"),
        ("::ffff:10.0.0.1", "private (inside IPv6)"),
        ("::ffff:169.254.1.1", "link-local (inside IPv6)"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("64:ff9b::7f00:1", "loopback (NAT64)"),
        ("2002:7f00:1::", "loopback (inside IPv6)"),
    ],
)
def test_non_public_addresses_are_refused(address: str, why: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "https://0.0.0.0/",
        "http://[::]/",
        "http://100.64.0.10/",
        "http://169.254.169.254/latest/meta-data",
        "http://[fc00::5]/",
        "http://[fe80::1]/",
    ],
)
def test_private_literal_hosts_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(TargetError, match="allow_private_targets"):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True)[0] in ("http", "https")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "file:///etc/passwd", "example.com", "http:///x", "http://u:p@h/"]
)
def test_only_http_urls_with_a_host(url: str) -> None:
    with pytest.raises(TargetError):
        check_url(url, allow_private=True)


def test_names_are_accepted_at_configuration_and_checked_when_sent() -> None:
    assert check_url("https://hooks.example.com/x", allow_private=False) == (
        "https",
        "hooks.example.com",
        443,
    )


def test_retry_schedule_has_eight_retries_over_about_a_day() -> None:
    delays = [retry_delay(n) for n in range(1, 10)]
    assert delays[:8] == list(RETRY_DELAYS)
    assert delays[8] is None
    assert retry_delay(0) is None
    assert 20 * 3600 <= sum(RETRY_DELAYS) <= 24 * 3600
    assert retry_delay(1, scale=30.0) == 1.0


def test_payload_shape_and_stable_ids() -> None:
    row = ev.AcceptedRow("Q1", 1700000000.0, "a@x", None, "192.0.2.1", "a@x", ("b@y",), "Hi", 10)
    first, second = ev.accepted(row), ev.accepted(row)
    assert first == second
    data = json.loads(first.body)
    assert data["type"] == "message.accepted"
    assert data["timestamp"] == "2023-11-14T22:13:20Z"
    assert data["data"]["recipients"] == ["b@y"]
    rows = [
        (5, "Q1", "a@x", "a@x", "y", 1.0, "delivered", "b@y", "mx", "250 ok"),
        (6, "Q1", "a@x", "a@x", "y", 1.0, "delivered", "c@y", "mx", "250 ok"),
        (7, "Q1", "a@x", "a@x", "z", 2.0, "failed", "d@z", "mx2", "550 no"),
    ]
    groups = ev.group_attempts(rows)
    assert [g.recipients for g in groups] == [("b@y", "c@y"), ("d@z",)]
    bounced = ev.outcome(groups[1])
    assert bounced is not None and bounced.type == "message.bounced"
    assert json.loads(bounced.body)["data"]["remote_reply"] == "550 no"
    assert bounced.id == "evt_Q1_bounced_7"


def test_endpoints_get_the_events_they_subscribe_to() -> None:
    everything = ev.Endpoint("a", "http://x/", (), "s", "api")
    some = ev.Endpoint("b", "http://x/", ("message.bounced",), "s", "api")
    e1 = ev.Event("1", "message.accepted", "{}")
    e2 = ev.Event("2", "message.bounced", "{}")
    test = ev.Event("3", ev.TEST, "{}")
    pairs = ev.fan_out([everything, some], [e1, e2, test])
    assert [(p[0], p[1].id) for p in pairs] == [("a", "1"), ("a", "2"), ("b", "2")]


def _problems(tmp_path: Path, hooks: list[dict[str, object]], allow: bool = False) -> list[str]:
    data: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path)},
        "listeners": [{"address": "127.0.0.1:2587", "tls": "starttls"}],
        "http": {"address": "127.0.0.1:8025", "allow_private_targets": allow},
        "webhooks": hooks,
    }
    try:
        config_from_dict(data, tmp_path)
    except ConfigError as exc:
        return exc.problems
    return []


def test_config_webhooks_are_checked_one_line_each(tmp_path: Path) -> None:
    good = tmp_path / "good.secret"
    good.write_text(signing.new_secret() + "\n")
    bad = tmp_path / "bad.secret"
    bad.write_text("not-a-secret\n")
    problems = _problems(
        tmp_path,
        [
            {"url": "http://10.0.0.1/x", "secret_file": str(good)},
            {"url": "https://h.example/x", "events": ["message.nope"], "secret_file": str(good)},
            {"url": "https://h.example/y"},
            {"url": "https://h.example/z", "secret_file": str(bad)},
            {"url": "gopher://h.example/", "secret_file": str(good)},
            {"url": "https://h.example/ok", "secret_file": str(good), "events": ["auth.throttled"]},
        ],
    )
    assert problems == [
        "webhooks[0].url: 10.0.0.1 is a private address; set [http] allow_private_targets"
        " = true to allow it",
        "webhooks[1].events: unknown event 'message.nope' (known: " + ", ".join(ev.EVENTS) + ")",
        "webhooks[2].secret_file: is required (a file holding whsec_<base64>)",
        f"webhooks[3].secret_file: {bad}: a webhook secret must look like whsec_<base64>",
        "webhooks[4].url: only http:// and https:// URLs are allowed",
    ]
    assert (
        _problems(tmp_path, [{"url": "http://127.0.0.1:9/", "secret_file": str(good)}], True) == []
    )
