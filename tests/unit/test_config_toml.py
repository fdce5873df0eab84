"""config_toml: the settings in effect as TOML that loads back to the same config,
with passwords masked, and only the changes with --changed."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from relaygate.config import ENV_VAR, Config, load_config
from relaygate.config_toml import (
    changed_only,
    default_config,
    format_key,
    format_value,
    mask_secrets,
    mask_url,
    render_show,
    sections,
)

SECRET = "Pg-pass-7Hq2"
REDIS_SECRET = "Redis-pass-9Kx4"


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def show(config: Config, *, changed: bool = False) -> str:
    found = sections(config)
    if changed:
        found = changed_only(found, sections(default_config(config)))
    return render_show(mask_secrets(found))


def rich_config(directory: Path) -> Path:
    """A file that sets something in every table, with relative paths."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("cert.pem", "key.pem", "token"):
        (directory / name).write_text("x\n")
    (directory / "smarthost.pw").write_text("file-secret-never-shown\n")
    (directory / "hook.secret").write_text("whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" + "\n")
    path = directory / "relaygate.toml"
    path.write_text(
        f"""
[server]
hostname = "mail.example.com"
data_dir = "data"
workers = 3
node_name = "mx-b"

[[listeners]]
address = "0.0.0.0:587"

[[listeners]]
address = "[::1]:465"
tls = "implicit"
proxy_protocol = true
proxy_trusted = ["10.1.2.3/8", "::1"]

[tls]
cert_file = "cert.pem"
key_file = "key.pem"

[delivery]
mode = "smarthost"
resolvers = ["127.0.0.1:5353", "[::1]:53", "192.0.2.1"]
retry_schedule = [30, 90.5]
max_age = 86400
delay_warning_after = 0

[delivery.smarthost]
host = "smtp.example.net"
port = 465
tls = "implicit"
username = "relay\\"user"
password_file = "smarthost.pw"

[[delivery.routes]]
domain = "Example.ORG"
host = "relay.example.org"
verify_certificate = false

[delivery.tls_policy]
"example.net" = "required"
"b.example" = "opportunistic"

[limits]
max_recipients = 5
command_timeout = 7.5

[log]
level = "debug"
file = "logs/relaygate.log"

[sending_limits]
messages_per_hour = 7

[connection_limits]
exempt = []

[storage]
url = "postgresql://relaygate:{SECRET}@db.example.internal:5432/relaygate"

[shared]
redis_url = "redis://:{REDIS_SECRET}@127.0.0.1:6379/0?password={REDIS_SECRET}"

[http]
address = "[::1]:8025"
public_url = "https://admin.example.com/"
metrics_token_file = "token"

[[webhooks]]
url = "https://hooks.example.com/r?a=1"
events = ["message.bounced"]
secret_file = "hook.secret"
""",
        encoding="utf-8",
    )
    return path


def unmasked(loaded: Config, original: Config) -> Config:
    """``loaded`` with the masked URLs and the file it came from of ``original``."""
    return dataclasses.replace(
        loaded, storage=original.storage, shared=original.shared, source=original.source
    )


def test_show_round_trips_from_another_directory(tmp_path: Path) -> None:
    original = load_config(rich_config(tmp_path / "etc"))
    text = show(original)
    again = tmp_path / "elsewhere" / "shown.toml"
    again.parent.mkdir()
    again.write_text(text, encoding="utf-8")
    loaded = load_config(again)
    assert unmasked(loaded, original) == original  # paths were made absolute
    assert show(loaded) == text  # and showing it again changes nothing


def test_show_masks_passwords_and_never_reads_password_files(tmp_path: Path) -> None:
    text = show(load_config(rich_config(tmp_path)))
    data = tomllib.loads(text)
    assert data["storage"]["url"] == "postgresql://relaygate:***@db.example.internal:5432/relaygate"
    assert data["shared"]["redis_url"] == "redis://:***@127.0.0.1:6379/0?password=***"
    assert data["delivery"]["smarthost"]["password_file"] == str(tmp_path / "smarthost.pw")
    for secret in (SECRET, REDIS_SECRET, "file-secret-never-shown", "QUJDREVG"):
        assert secret not in text


def test_show_uses_the_loaders_keys(tmp_path: Path) -> None:
    data = tomllib.loads(show(load_config(rich_config(tmp_path))))
    assert data["server"]["data_dir"] == str(tmp_path / "data")
    assert [x["address"] for x in data["listeners"]] == ["0.0.0.0:587", "[::1]:465"]
    assert data["listeners"][1]["proxy_trusted"] == ["10.0.0.0/8", "::1/128"]
    assert data["delivery"]["resolvers"] == ["127.0.0.1:5353", "[::1]:53", "192.0.2.1:53"]
    assert data["delivery"]["tls_policy"] == {
        "example.net": "required",
        "b.example": "opportunistic",
    }
    route = data["delivery"]["routes"][0]
    assert (route["domain"], route["host"], route["port"]) == (
        "example.org",
        "relay.example.org",
        587,
    )
    assert data["http"]["address"] == "[::1]:8025"
    assert data["limits"]["data_timeout"] == 600  # a default, filled in
    assert data["sending_limits"]["messages_per_day"] == 1000


def test_unset_and_absent_are_comments(tmp_path: Path) -> None:
    path = tmp_path / "relaygate.toml"
    path.write_text("", encoding="utf-8")
    text = show(load_config(path))
    for line in (
        "# cert_file: not set",
        "# url: not set",
        "# [delivery.smarthost]: not set",
        "# [[webhooks]]: none",
        "# [http]: not set",
    ):
        assert line in text.splitlines()
    # No [[listeners]] in the file: the two loopback listeners, written out.
    assert [x["address"] for x in tomllib.loads(text)["listeners"]] == [
        "127.0.0.1:2587",
        "127.0.0.1:2465",
    ]


def test_quickstart_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    quickstart = load_config()
    path = tmp_path / "shown.toml"
    path.write_text(show(quickstart), encoding="utf-8")
    loaded = load_config(path)
    assert dataclasses.replace(loaded, source=None, quickstart=True) == quickstart


def test_changed_shows_only_what_differs(tmp_path: Path) -> None:
    path = tmp_path / "relaygate.toml"
    path.write_text('[limits]\nmax_recipients = 5\n\n[delivery]\nmode = "mx"\n')
    data = tomllib.loads(show(load_config(path), changed=True))
    # mx mode has limits by default: [sending_limits] is not a change.
    assert data == {"limits": {"max_recipients": 5}, "delivery": {"mode": "mx"}}
    path.write_text("")
    assert tomllib.loads(show(load_config(path), changed=True)) == {}


def test_changed_round_trips_beside_the_file(tmp_path: Path) -> None:
    original = load_config(rich_config(tmp_path))
    text = show(original, changed=True)
    data = tomllib.loads(text)
    assert "limits" in data and "data_timeout" not in data["limits"]
    assert data["listeners"][0] == {"address": "0.0.0.0:587"}  # required key; tls is default
    assert data["delivery"]["routes"][0]["verify_certificate"] is False
    assert data["http"] == {
        "address": "[::1]:8025",
        "public_url": "https://admin.example.com/",
        "metrics_token_file": str(tmp_path / "token"),
    }
    path = tmp_path / "changed.toml"
    path.write_text(text, encoding="utf-8")
    assert unmasked(load_config(path), original) == original


def test_changed_keeps_a_table_whose_presence_matters(tmp_path: Path) -> None:
    path = tmp_path / "relaygate.toml"
    path.write_text("[http]\n")
    text = show(load_config(path), changed=True)
    assert tomllib.loads(text) == {"http": {}}
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert load_config(again).http == load_config(path).http


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:secret@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("postgresql://db/x?user=u&password=secret&sslmode=require",
         "postgresql://db/x?user=u&password=***&sslmode=require"),
        ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://default:secret@h:6380?ssl_cert_reqs=none", "rediss://default:***@h:6380?ssl_cert_reqs=none"),
        ("unix:///run/redis.sock?db=0&PASSWORD=secret", "unix:///run/redis.sock?db=0&PASSWORD=***"),
        ("https://example.com/?q=a@b:c", "https://example.com/?q=a@b:c"),
        ("not a url", "not a url"),
    ],
)  # fmt: skip
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "value",
    ['a "quoted" \\ back', "tab\tnew\nline\r", "\x00\x1f\x7f", "ünïcode ✓ \u2028", "", "x" * 300],
)
def test_strings_round_trip(value: str) -> None:
    assert tomllib.loads(f"k = {format_value(value)}")["k"] == value


def test_numbers_lists_and_keys() -> None:
    assert format_value(3600.0) == "3600"
    assert format_value(7.5) == "7.5"
    assert format_value(1e-5) == "1e-05"
    assert tomllib.loads(f"k = {format_value(1e300)}")["k"] == 1e300
    assert math.isinf(tomllib.loads(f"k = {format_value(math.inf)}")["k"])
    assert format_value([True, 2, "x"]) == '[true, 2, "x"]'
    assert format_key("example.org") == '"example.org"'
    assert format_key("max_age") == "max_age"
    assert tomllib.loads(f"{format_key('a b.c')} = 1") == {"a b.c": 1}
