"""Which process prunes, and how often (services/retention.py); the pruning
itself is in the storage contract tests, the background run in the e2e suite."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relaygate.config import Config, WebhookConfig, config_from_dict
from relaygate.services import retention


def _config(**sections: dict[str, object]) -> Config:
    return config_from_dict(dict(sections), Path("/tmp"))


@pytest.mark.parametrize(
    ("workers", "sections", "hooks", "delivery_process"),
    [
        (1, {}, False, False),  # one process does everything
        (2, {}, False, False),  # capture, no HTTP, no webhooks: no delivery process
        (1, {"http": {}}, False, True),
        (2, {"delivery": {"mode": "mx"}}, False, True),
        (1, {"delivery": {"mode": "mx"}}, False, True),
        (2, {}, True, True),  # the delivery process sends the webhooks
        (1, {}, True, False),  # but one capture worker runs without a supervisor
    ],
)
def test_one_process_prunes(
    workers: int, sections: dict[str, dict[str, object]], hooks: bool, delivery_process: bool
) -> None:
    config = _config(server={"workers": workers}, **sections)
    if hooks:
        hook = WebhookConfig("https://hooks.example/x", (), Path("/tmp/secret"))
        config = dataclasses.replace(config, webhooks=(hook,))
    assert config.runs_delivery_process() is delivery_process
    pruners = [i for i in [None, *range(workers)] if retention.runs_here(config, i)]
    assert pruners == ([None] if delivery_process else [0])


def test_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(retention.INTERVAL_ENV, raising=False)
    assert retention.interval() == retention.INTERVAL
    monkeypatch.setenv(retention.INTERVAL_ENV, "0.5")
    assert retention.interval() == 0.5
    for bad in ("soon", "0", "-3", "1e9"):
        monkeypatch.setenv(retention.INTERVAL_ENV, bad)
        assert retention.interval() == retention.INTERVAL


def test_nothing_to_do_when_every_limit_is_off() -> None:
    assert retention.enabled(_config().retention)
    off = _config(retention={"max_age": "off", "max_messages": 0}).retention
    assert not retention.enabled(off)
    assert retention.enabled(_config(retention={"max_age": "off", "body_max_age": "1d"}).retention)
