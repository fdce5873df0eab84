"""load_config: quickstart, a full file, and one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.config import (
    ENV_VAR,
    QUICKSTART_LISTENERS,
    AuthThrottleConfig,
    ConfigError,
    ConnectionLimitsConfig,
    HTTPConfig,
    ListenerConfig,
    SendingLimits,
    load_config,
)


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def write(tmp_path: Path, text: str, name: str = "relaygate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path | str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def test_no_file_means_quickstart() -> None:
    config = load_config()
    assert config.quickstart
    assert config.source is None
    assert config.listeners == QUICKSTART_LISTENERS
    assert config.data_dir == Path("relaygate-data").absolute()
    assert config.database_path == config.data_dir / "relaygate.db"


def test_full_valid_file(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    path = write(
        tmp_path,
        """
[server]
hostname = "mail.example.com"
data_dir = "data"
workers = 3

[[listeners]]
address = "0.0.0.0:587"
tls = "starttls"

[[listeners]]
address = "[::1]:465"
tls = "implicit"

[tls]
cert_file = "cert.pem"
key_file = "key.pem"

[delivery]
mode = "capture"

[limits]
max_message_size = 1048576
max_recipients = 5
idle_timeout = 30
command_timeout = 7.5

[password_hash]
memory_kib = 8192
time_cost = 1
parallelism = 2

[log]
level = "debug"
format = "json"
file = "relaygate.log"
""",
    )
    config = load_config(path)
    assert not config.quickstart
    assert config.source == path.resolve()
    assert config.hostname == "mail.example.com"
    assert config.data_dir == (tmp_path / "data").resolve()
    assert config.worker_count() == 3
    assert config.listeners == (
        ListenerConfig("0.0.0.0", 587, "starttls"),
        ListenerConfig("::1", 465, "implicit"),
    )
    assert config.listeners[1].address == "[::1]:465"
    assert config.tls.cert_file == (tmp_path / "cert.pem").resolve()
    assert config.tls.key_file == (tmp_path / "key.pem").resolve()
    assert config.limits.max_message_size == 1048576
    assert config.limits.max_recipients == 5
    assert config.limits.idle_timeout == 30.0
    assert config.limits.command_timeout == 7.5
    assert config.limits.data_timeout == 600.0  # untouched default
    assert (config.password_hash.memory_kib, config.password_hash.time_cost) == (8192, 1)
    assert config.password_hash.parallelism == 2
    assert (config.log.level, config.log.format) == ("debug", "json")
    assert config.log.file == (tmp_path / "relaygate.log").resolve()


def test_empty_file_uses_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert not config.quickstart
    assert config.listeners == QUICKSTART_LISTENERS
    assert config.data_dir == (tmp_path / "relaygate-data").resolve()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nhostnme = "x"\n', "server.hostnme: unknown setting"),
        ('colour = "blue"\n', "colour: unknown setting"),
        ('[[listeners]]\naddress = "127.0.0.1:25"\ntls = "ssl"\n', "listeners[0].tls: must be"),
        ('[[listeners]]\naddress = "localhost"\n', "listeners[0].address: must be host:port"),
        ('[[listeners]]\naddress = "[::1]:0"\n', "listeners[0].address: must be host:port"),
        ("[server]\nworkers = -1\n", "server.workers: must be a whole number >= 0"),
        ('[server]\nhostname = ""\n', "server.hostname: must be a non-empty string"),
        ("[limits]\nidle_timeout = 0\n", "limits.idle_timeout: must be a number of seconds"),
        ("[password_hash]\nmemory_kib = 1024\n", "password_hash.memory_kib: must be"),
        ('[log]\nlevel = "loud"\n', "log.level: must be one of"),
        ('[tls]\ncert_file = "missing.pem"\n', "tls.cert_file: cannot read"),
        ("server = 1\n", "server: must be a table"),
    ],
)
def test_each_problem_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    found = problems(path)
    assert any(line.startswith(f"{path}: {expected}") for line in found), found
    assert all("\n" not in line for line in found)


def test_all_problems_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
typo = 1
[[listeners]]
address = "nonsense"
[[listeners]]
address = "127.0.0.1:587"
tls = "sometimes"
[limits]
max_recipients = 0
""",
    )
    found = problems(path)
    assert len(found) == 4, found
    assert [line.split(": ")[1] for line in found] == [
        "typo",
        "listeners[0].address",
        "listeners[1].tls",
        "limits.max_recipients",
    ]


def test_listener_listed_twice(tmp_path: Path) -> None:
    text = '[[listeners]]\naddress = "127.0.0.1:587"\n' * 2
    assert problems(write(tmp_path, text)) == [
        f"{tmp_path / 'relaygate.toml'}: listeners: 127.0.0.1:587 is listed twice"
    ]


def test_cert_without_key(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    found = problems(write(tmp_path, '[tls]\ncert_file = "cert.pem"\n'))
    assert found == [
        f"{tmp_path / 'relaygate.toml'}: tls: cert_file and key_file must be given together"
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems(path) == [f"{path}: cannot read: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (found,) = problems(tmp_path)
    assert found.startswith(f"{tmp_path}: cannot read: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    assert problems(path) == [f"{path}: not UTF-8 text"]


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nhostname = 'x'\n")
    (found,) = problems(path)
    assert found.startswith(f"{path}: TOML syntax error: ")
    assert "line 1" in found


def test_environment_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[server]\nhostname = "env.example"\n')
    monkeypatch.setenv(ENV_VAR, str(path))
    config = load_config()
    assert config.hostname == "env.example"
    assert config.source == path.resolve()


def test_explicit_path_beats_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.toml"))
    path = write(tmp_path, '[server]\nhostname = "explicit.example"\n', "explicit.toml")
    assert load_config(path).hostname == "explicit.example"


def test_environment_variable_to_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.toml"
    monkeypatch.setenv(ENV_VAR, str(missing))
    assert problems_from_env() == [f"{missing}: cannot read: No such file or directory"]


def test_empty_environment_variable_means_quickstart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "")
    assert load_config().quickstart


def problems_from_env() -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config()
    return caught.value.problems


# ------------------------------------------------------------------ throttling and limits


def test_throttle_and_limit_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[auth_throttle]
ip_per_minute = 5
network_per_day = 0
known_network_days = 7
delay_seconds = 2.5

[sending_limits]
messages_per_hour = 50
new_recipients_per_day = 0

[connection_limits]
per_ip_concurrent = 20
exempt = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "10.1.2.3/16"]
""",
    )
    config = load_config(path)
    assert config.auth_throttle == AuthThrottleConfig(
        ip_per_minute=5, network_per_day=0, known_network_days=7, delay_seconds=2.5
    )
    assert config.sending_limits == SendingLimits(messages_per_hour=50, new_recipients_per_day=0)
    assert config.connection_limits == ConnectionLimitsConfig(
        per_ip_concurrent=20,
        per_ip_per_minute=600,
        exempt=("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32", "10.1.0.0/16"),
    )


def test_throttle_and_limit_defaults(tmp_path: Path) -> None:
    for config in (load_config(write(tmp_path, "")), load_config()):
        assert config.auth_throttle == AuthThrottleConfig()
        assert config.connection_limits == ConnectionLimitsConfig()
        # Capture mode: nothing leaves the machine, so no default sending limits.
        assert config.sending_limits == SendingLimits(0, 0, 0, 0)
    relay = load_config(
        write(tmp_path, '[delivery]\nmode = "smarthost"\n[delivery.smarthost]\nhost = "h"\n')
    )
    assert relay.sending_limits == SendingLimits()
    explicit = load_config(write(tmp_path, "[sending_limits]\nmessages_per_hour = 5\n"))
    assert explicit.sending_limits == SendingLimits(messages_per_hour=5)
    assert AuthThrottleConfig().account_per_hour == 20
    assert SendingLimits().messages_per_day == 1000
    assert ConnectionLimitsConfig().exempt == ("127.0.0.0/8", "::1/128")


def test_an_empty_exempt_list_limits_everyone(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[connection_limits]\nexempt = []\n"))
    assert config.connection_limits.exempt == ()


def test_delivery_private_targets_and_destination_timeout(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, ""))
    assert default.delivery.allow_private_targets is False  # refused unless allowed
    assert default.delivery.destination_timeout == 60.0
    config = load_config(
        write(tmp_path, "[delivery]\nallow_private_targets = true\ndestination_timeout = 5\n")
    )
    assert config.delivery.allow_private_targets is True
    assert config.delivery.destination_timeout == 5.0
    for text, expected in [
        ('allow_private_targets = "yes"', "delivery.allow_private_targets: must be true or false"),
        ("destination_timeout = 0", "delivery.destination_timeout: must be a number of seconds"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, f"[delivery]\n{text}\n"))
        assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auth_throttle = 3\n", "auth_throttle: must be a table"),
        ("[auth_throttle]\nip_per_hour = 3\n", "auth_throttle.ip_per_hour: unknown setting"),
        ("[auth_throttle]\nip_per_minute = -1\n", "auth_throttle.ip_per_minute: must be a whole"),
        ("[auth_throttle]\nip_per_day = 1.5\n", "auth_throttle.ip_per_day: must be a whole"),
        ('[auth_throttle]\naccount_per_hour = "20"\n', "auth_throttle.account_per_hour: must be"),
        (
            "[auth_throttle]\nknown_network_days = 0\n",
            "auth_throttle.known_network_days: must be a whole number >= 1",
        ),
        ("[auth_throttle]\ndelay_seconds = 0\n", "auth_throttle.delay_seconds: must be a number"),
        (
            "[auth_throttle]\nconnection_close_after = true\n",
            "auth_throttle.connection_close_after: must be a whole number >= 0",
        ),
        (
            "[sending_limits]\nmessages_per_hour = -5\n",
            "sending_limits.messages_per_hour: must be a whole number >= 0 (got -5)",
        ),
        ("[sending_limits]\nper_hour = 5\n", "sending_limits.per_hour: unknown setting"),
        (
            "[connection_limits]\nper_ip_concurrent = -1\n",
            "connection_limits.per_ip_concurrent: must be a whole number >= 0",
        ),
        (
            '[connection_limits]\nexempt = "127.0.0.0/8"\n',
            "connection_limits.exempt: must be an array of CIDRs",
        ),
        (
            '[connection_limits]\nexempt = ["127.0.0.0/8", "localhost"]\n',
            "connection_limits.exempt[1]: must be an IP network such as 192.0.2.0/24 "
            "(got 'localhost')",
        ),
        ("[connection_limits]\nexempt = [5]\n", "connection_limits.exempt[0]: must be an IP"),
        (
            '[connection_limits]\nexempt = ["10.0.0.0/33"]\n',
            "connection_limits.exempt[0]: must be an IP",
        ),
    ],
)
def test_throttle_and_limit_problems(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {expected}"), found
    assert "\n" not in found[0]


def test_every_limit_problem_on_its_own_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[auth_throttle]
ip_per_minute = -1
delay_seconds = "soon"
[sending_limits]
messages_per_day = "many"
colour = 1
[connection_limits]
per_ip_per_minute = 0.5
exempt = ["nope", "10.0.0.0/8", "::1/200"]
""",
    )
    found = problems(path)
    assert [line.split(": ")[1] for line in found] == [
        "auth_throttle.ip_per_minute",
        "auth_throttle.delay_seconds",
        "sending_limits.colour",
        "sending_limits.messages_per_day",
        "connection_limits.per_ip_per_minute",
        "connection_limits.exempt[0]",
        "connection_limits.exempt[2]",
    ]


def test_proxy_protocol_listener(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[[listeners]]
address = "127.0.0.1:2587"
tls = "starttls"
proxy_protocol = true
proxy_trusted = ["127.0.0.1/32", "10.1.2.3/8", "::1"]

[[listeners]]
address = "127.0.0.1:2465"
tls = "implicit"
""",
        )
    )
    proxied, plain = config.listeners
    assert proxied.proxy_protocol is True
    assert proxied.proxy_trusted == ("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    assert plain.proxy_protocol is False
    assert plain.proxy_trusted == ()


_LISTENER = '[[listeners]]\naddress = "127.0.0.1:2587"\n'


def test_an_empty_proxy_trusted_without_proxy_protocol_is_fine(tmp_path: Path) -> None:
    # What `config show` writes for a listener without PROXY protocol.
    config = load_config(
        write(tmp_path, _LISTENER + "proxy_protocol = false\nproxy_trusted = []\n")
    )
    assert config.listeners[0].proxy_trusted == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "proxy_protocol = true\n",
            "listeners[0].proxy_trusted: is required with proxy_protocol = true",
        ),
        (
            "proxy_protocol = true\nproxy_trusted = []\n",
            "listeners[0].proxy_trusted: must not be empty with proxy_protocol = true",
        ),
        (
            'proxy_protocol = true\nproxy_trusted = "10.0.0.0/8"\n',
            "listeners[0].proxy_trusted: must be an array of CIDRs",
        ),
        (
            'proxy_protocol = true\nproxy_trusted = ["10.0.0.0/8", "balancer.internal"]\n',
            "listeners[0].proxy_trusted[1]: must be an IP network such as 192.0.2.0/24 "
            "(got 'balancer.internal')",
        ),
        (
            'proxy_protocol = true\nproxy_trusted = ["10.0.0.0/33"]\n',
            "listeners[0].proxy_trusted[0]: must be an IP network",
        ),
        (
            "proxy_protocol = true\nproxy_trusted = [10]\n",
            "listeners[0].proxy_trusted[0]: must be an IP network",
        ),
        (
            'proxy_protocol = "yes"\n',
            "listeners[0].proxy_protocol: must be true or false (got 'yes')",
        ),
        (
            'proxy_trusted = ["10.0.0.0/8"]\n',
            "listeners[0].proxy_trusted: is set but proxy_protocol is not true",
        ),
        ("proxy = true\n", "listeners[0].proxy: unknown setting"),
    ],
)
def test_proxy_protocol_problems(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, _LISTENER + text)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {expected}"), found
    assert "\n" not in found[0]


# ------------------------------------------------------------------ [http]


def test_http_listener_in_quickstart_only_unless_configured(tmp_path: Path) -> None:
    quick = load_config()
    assert quick.http == HTTPConfig() and quick.http.url == "http://127.0.0.1:8025"
    assert load_config(write(tmp_path, "")).http is None
    token = write(tmp_path, "s3cret\n", "metrics.token")
    config = load_config(
        write(
            tmp_path,
            f"""
[http]
address = "0.0.0.0:8443"
tls = true
public_url = "https://mail-admin.example.com/"
metrics = false
metrics_token_file = "{token}"
allow_private_targets = true
""",
        )
    )
    assert config.http == HTTPConfig(
        "0.0.0.0", 8443, True, "https://mail-admin.example.com/", False, token, True
    )
    assert config.http.url == "https://mail-admin.example.com"
    plain = load_config(write(tmp_path, '[http]\naddress = "[::]:8025"\n'))
    assert plain.http is not None and plain.http.url == "http://[::1]:8025"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[http]\naddress = "8025"', "http.address: must be host:port or [v6]:port (got '8025')"),
        ("[http]\ntls = 1", "http.tls: must be true or false"),
        ('[http]\npublic_url = "ftp://x"', "http.public_url: must be a http:// or https:// URL"),
        ('[http]\nmetrics_token_file = "nope"', "http.metrics_token_file"),
        ("[http]\nport = 80", "http.port: unknown setting"),
        (
            '[[listeners]]\naddress = "127.0.0.1:8025"\n[http]\naddress = "127.0.0.1:8025"',
            "http.address: 127.0.0.1:8025 is also an SMTP listener",
        ),
    ],
)
def test_http_problems(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(write(tmp_path, text))
    assert len(found) == 1 and found[0].split(": ", 1)[1].startswith(expected), found


def test_retention_defaults_and_settings(tmp_path: Path) -> None:
    defaults = load_config(write(tmp_path, "")).retention
    assert (defaults.max_age, defaults.max_messages, defaults.body_max_age) == (
        30 * 86400,
        100_000,
        None,
    )
    set_ = load_config(
        write(
            tmp_path,
            '[retention]\nmax_age = "90d"\nmax_messages = 0\nbody_max_age = "1w"\n',
        )
    ).retention
    assert (set_.max_age, set_.max_messages, set_.body_max_age) == (90 * 86400, 0, 7 * 86400)
    off = load_config(write(tmp_path, '[retention]\nmax_age = "off"\n')).retention
    assert off.max_age is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('max_age = "30"', "retention.max_age: not a duration: '30'"),
        ("max_age = 30", 'retention.max_age: must be a duration such as "30d", or "off"'),
        ('max_age = "0s"', 'retention.max_age: must be at least 1s, or "off"'),
        ("max_messages = -1", "retention.max_messages: must be a whole number >= 0"),
        ('body_max_age = "2w"\nmax_age = "1w"', "retention.body_max_age: must not be longer"),
        ("keep = 1", "retention.keep: unknown setting"),
    ],
)
def test_retention_problems(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, f"[retention]\n{text}\n")
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {expected}"), found


# ------------------------------------------------------------------ bounce_to, dev port, ca_file


def test_bounce_to_defaults_follow_the_mode(tmp_path: Path) -> None:
    assert load_config().delivery.bounce_to == "capture"  # quickstart: capture mode
    assert load_config(write(tmp_path, "")).delivery.bounce_to == "capture"
    mx = load_config(write(tmp_path, '[delivery]\nmode = "mx"\n'))
    assert mx.delivery.bounce_to == "sender"  # outside capture mode bounces reach people
    kept = load_config(write(tmp_path, '[delivery]\nmode = "mx"\nbounce_to = "capture"\n'))
    assert kept.delivery.bounce_to == "capture"
    path = write(tmp_path, '[delivery]\nmode = "mx"\nbounce_to = "postmaster"\n')
    assert problems(path) == [
        f"{path}: delivery.bounce_to: must be one of sender, capture (got 'postmaster')"
    ]


@pytest.mark.parametrize("address", ["127.0.0.1:1025", "127.8.9.10:1025", "[::1]:1025"])
def test_plaintext_auth_on_a_loopback_dev_port(tmp_path: Path, address: str) -> None:
    text = f'[[listeners]]\naddress = "{address}"\ntls = "none"\nallow_plaintext_auth = true\n'
    [listener] = load_config(write(tmp_path, text)).listeners
    assert (listener.tls, listener.allow_plaintext_auth) == ("none", True)


def test_localhost_is_a_loopback_dev_port(tmp_path: Path) -> None:
    text = '[[listeners]]\naddress = "localhost:1025"\ntls = "none"\nallow_plaintext_auth = true\n'
    [listener] = load_config(write(tmp_path, text)).listeners
    assert listener.allow_plaintext_auth and listener.host == "localhost"


@pytest.mark.parametrize(
    ("address", "tls", "expected"),
    [
        (
            "0.0.0.0:1025",
            "none",
            "listeners[0].allow_plaintext_auth: is only allowed on a loopback address"
            " (127.0.0.0/8, ::1, localhost), not 0.0.0.0: passwords would cross the network"
            " unencrypted",
        ),
        ("192.0.2.1:1025", "none", "listeners[0].allow_plaintext_auth: is only allowed on a"),
        ("[::]:1025", "none", "listeners[0].allow_plaintext_auth: is only allowed on a"),
        ("[::ffff:127.0.0.1]:1025", "none", "listeners[0].allow_plaintext_auth: is only allowed"),
        ("mail.example.test:1025", "none", "listeners[0].allow_plaintext_auth: is only allowed"),
        (
            "127.0.0.1:1025",
            "starttls",
            'listeners[0].allow_plaintext_auth: is only for tls = "none" listeners'
            " (this one is starttls: log in after TLS)",
        ),
        ("127.0.0.1:1025", "implicit", 'listeners[0].allow_plaintext_auth: is only for tls = "'),
    ],
)
def test_plaintext_auth_elsewhere_is_refused(
    tmp_path: Path, address: str, tls: str, expected: str
) -> None:
    text = f'[[listeners]]\naddress = "{address}"\ntls = "{tls}"\nallow_plaintext_auth = true\n'
    path = write(tmp_path, text)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {expected}"), found
    assert "\n" not in found[0]


def test_plaintext_auth_behind_a_proxy_is_refused(tmp_path: Path) -> None:
    """A loopback listener behind a local balancer still serves remote clients."""
    text = (
        '[[listeners]]\naddress = "127.0.0.1:1025"\ntls = "none"\nallow_plaintext_auth = true\n'
        'proxy_protocol = true\nproxy_trusted = ["127.0.0.1/32"]\n'
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}: listeners[0].allow_plaintext_auth: is not allowed with proxy_protocol = true:"
        " the clients are on other machines and their passwords would cross the network"
        " unencrypted"
    ]


def test_plaintext_auth_must_be_a_boolean(tmp_path: Path) -> None:
    text = '[[listeners]]\naddress = "127.0.0.1:1025"\ntls = "none"\nallow_plaintext_auth = 1\n'
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}: listeners[0].allow_plaintext_auth: must be true or false (got 1)"
    ]


def test_a_tls_none_listener_defaults_to_no_plaintext_auth(tmp_path: Path) -> None:
    [listener] = load_config(
        write(tmp_path, '[[listeners]]\naddress = "0.0.0.0:1025"\ntls = "none"\n')
    ).listeners
    assert listener.allow_plaintext_auth is False


def _ca_pem(tmp_path: Path) -> Path:
    from fakes.smtp_sink import make_tls_context

    _, ca = make_tls_context("smarthost.test", tmp_path / "tls", ips=())
    return ca


def test_smarthost_and_route_ca_file(tmp_path: Path) -> None:
    ca = _ca_pem(tmp_path)
    config = load_config(
        write(
            tmp_path,
            f"""
[delivery]
mode = "smarthost"
[delivery.smarthost]
host = "smarthost.test"
ca_file = "tls/{ca.name}"
[[delivery.routes]]
domain = "Private.Test"
host = "relay.private.test"
ca_file = "{ca}"
[[delivery.routes]]
domain = "public.test"
host = "relay.public.test"
""",
        )
    )
    assert config.delivery.smarthost is not None
    assert config.delivery.smarthost.ca_file == ca  # relative to the config file
    private, public = config.delivery.routes
    assert private.smarthost.ca_file == ca
    assert public.smarthost.ca_file is None  # the system's trust store


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('ca_file = "missing.pem"', "delivery.smarthost.ca_file: cannot read "),
        ('ca_file = "junk.pem"', "delivery.smarthost.ca_file: "),
        (
            'ca_file = "CA"\nverify_certificate = false',
            "delivery.smarthost.ca_file: is set but never used",
        ),
        ('ca_file = "CA"\ntls = "none"', "delivery.smarthost.ca_file: is set but never used"),
        ("ca_file = 5", "delivery.smarthost.ca_file: must be a path (got 5)"),
    ],
)
def test_ca_file_problems(tmp_path: Path, extra: str, expected: str) -> None:
    ca = _ca_pem(tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    text = '[delivery]\nmode = "smarthost"\n[delivery.smarthost]\nhost = "smarthost.test"\n'
    path = write(tmp_path, text + extra.replace('"CA"', f'"{ca}"') + "\n")
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: {expected}"), found
    assert "\n" not in found[0]
    if "junk" in extra:
        assert found[0].endswith("junk.pem: no PEM CA certificate in it"), found
