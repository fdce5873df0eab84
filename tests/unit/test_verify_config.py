"""[verify] and [submission]: defaults, durations, and one line per bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relaygate.config import ConfigError, config_from_dict


def load(data: dict[str, Any]) -> Any:
    return config_from_dict({"server": {"hostname": "relay.example.test"}, **data}, Path("/tmp"))


def test_defaults() -> None:
    config = load({})
    assert config.verify.probe_from is None
    assert (config.verify.cache_ttl, config.verify.negative_cache_ttl) == (3600, 300)
    assert config.submission.check_recipient_domains is False


def test_values() -> None:
    config = load(
        {
            "verify": {"probe_from": "probe@example.test", "cache_ttl": "2h", "per_host": 1},
            "submission": {"check_recipient_domains": True},
        }
    )
    assert config.verify.probe_from == "probe@example.test"
    assert config.verify.cache_ttl == 7200 and config.verify.per_host == 1
    assert config.submission.check_recipient_domains is True


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("verify", "probe_from", "", "must be an address"),
        ("verify", "probe_from", "a b@example.test", "probe_from"),
        ("verify", "cache_ttl", 60, "duration"),
        ("verify", "cache_ttl", "soon", "not a duration"),
        ("verify", "per_host", 0, ">= 1"),
        ("verify", "timeout", 0, "> 0"),
        ("verify", "nonsense", 1, "unknown setting"),
        ("submission", "check_recipient_domains", "yes", "true or false"),
    ],
)
def test_bad_values_are_named(section: str, key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({section: {key: value}})
    [problem] = caught.value.problems
    assert problem.startswith(f"{section}.{key}: ") and words in problem
