"""The pure parts of LDAP directory accounts: filters, sender addresses, config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relaygate.accounts.directory import login_address, sender_addresses, user_filter
from relaygate.config import ConfigError, LDAPConfig, config_from_dict
from relaygate.server.reload import merge


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dave@example.test", "(mail=dave@example.test)"),
        ("*", "(mail=\\2a)"),
        ("*)(uid=*", "(mail=\\2a\\29\\28uid=\\2a)"),
        ("a\\b(c)", "(mail=a\\5cb\\28c\\29)"),
        ("nul\0x", "(mail=nul\\00x)"),
    ],
)
def test_the_login_name_is_escaped_in_the_filter(name: str, expected: str) -> None:
    assert user_filter("(mail={address})", name) == expected


def test_the_filter_template_may_name_the_address_twice() -> None:
    template = "(|(mail={address})(userPrincipalName={address}))"
    assert (
        user_filter(template, "x*@d.test")
        == "(|(mail=x\\2a@d.test)(userPrincipalName=x\\2a@d.test))"
    )


@pytest.mark.parametrize(
    "name",
    ["", "dave", "*)(uid=*", "a b@example.test", "dave@example.test\r\n", "x" * 300 + "@d.test"],
)
def test_names_that_are_not_addresses_never_reach_the_directory(name: str) -> None:
    assert login_address(name) is None


def test_login_address_lowercases_the_domain_only() -> None:
    assert login_address("Dave@Example.TEST") == "Dave@example.test"


def test_sender_addresses_keep_full_addresses_only() -> None:
    values: list[object] = [
        "dave@example.test",
        "DAVE@example.test",  # the same address again
        "SMTP:Primary@Example.test",  # AD proxyAddresses
        "smtp:alias@example.test",
        "X500:/o=Org/ou=x",  # other proxyAddresses kinds: not addresses
        "@example.test",  # never a whole domain
        "evil@example.test\r\nBcc: x@y",
        b"bytes@example.test",
        b"\xff\xfe@example.test",  # not UTF-8
        42,
        "  spaced@example.test  ",
    ]
    assert sender_addresses(values) == (
        "alias@example.test",
        "bytes@example.test",
        "dave@example.test",
        "Primary@example.test",
        "spaced@example.test",
    )


def _config(tmp_path: Path, **ldap: object) -> dict[str, object]:
    password = tmp_path / "bind.password"
    password.write_text("secret\n")
    section = {
        "url": "ldap://ldap.example.test",
        "bind_dn": "cn=relaygate,dc=example,dc=test",
        "bind_password_file": str(password),
        "base_dn": "dc=example,dc=test",
    }
    section.update(ldap)  # type: ignore[arg-type]
    return {"server": {"data_dir": str(tmp_path / "data")}, "ldap": section}


def test_ldap_defaults(tmp_path: Path) -> None:
    config = config_from_dict(_config(tmp_path), tmp_path)
    assert config.ldap is not None
    assert config.ldap.filter == "(mail={address})"
    assert config.ldap.start_tls is True
    assert config.ldap.cache_ttl == 300
    assert config.ldap.alias_attributes == ()
    assert config.ldap.disabled_filter is None


@pytest.mark.parametrize(
    ("ldap", "problem"),
    [
        ({"url": "ldap://h/dc=x"}, "ldap.url: must be ldap://host[:port] or ldaps://host[:port]"),
        ({"filter": "(mail=x)"}, "ldap.filter: must contain {address}"),
        ({"filter": "mail={address}"}, "ldap.filter: must be one parenthesised LDAP filter"),
        ({"filter": "(mail={address}))("}, "ldap.filter: must be one parenthesised"),
        ({"disabled_filter": "x=1"}, "ldap.disabled_filter: must be one parenthesised"),
        ({"alias_attributes": ["ok", "bad name"]}, "ldap.alias_attributes: must be a list"),
        ({"cache_ttl": "off"}, "ldap.cache_ttl: must be a duration"),
        ({"timeout": 0}, "ldap.timeout: must be a whole number >= 1"),
        ({"start_tls": False}, "ldap.start_tls: false would send passwords in clear"),
        ({"bind_dn": ""}, "ldap.bind_dn: must be a non-empty string"),
    ],
)
def test_ldap_config_problems(tmp_path: Path, ldap: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(_config(tmp_path, **ldap), tmp_path)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_clear_text_is_allowed_to_loopback_only(tmp_path: Path) -> None:
    config = config_from_dict(
        _config(tmp_path, url="ldap://127.0.0.1:3389", start_tls=False), tmp_path
    )
    assert config.ldap is not None and not config.ldap.start_tls


def test_empty_password_file_and_missing_keys(tmp_path: Path) -> None:
    data = _config(tmp_path)
    (tmp_path / "bind.password").write_text("\n")
    del data["ldap"]["base_dn"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, tmp_path)
    assert "ldap.base_dn: is required" in caught.value.problems
    assert any("bind_password_file" in p and "is empty" in p for p in caught.value.problems)


def test_a_changed_ldap_section_needs_a_restart(tmp_path: Path) -> None:
    running = config_from_dict(_config(tmp_path), tmp_path)
    assert running.ldap is not None
    new = dataclasses.replace(
        running, ldap=dataclasses.replace(running.ldap, filter="(uid={address})")
    )
    kept, needs_restart = merge(running, new)
    assert needs_restart == ["ldap"]
    assert kept.ldap == running.ldap
    assert isinstance(kept.ldap, LDAPConfig)
