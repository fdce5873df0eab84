"""The compromised-account rules (relaygate/defence.py): counts in, a decision out."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from relaygate.config import DefenceConfig
from relaygate.defence import (
    Activity,
    client_name,
    decide,
    network_of,
    reject_trigger,
    volume_threshold,
)

NOW = 1_800_000_000.0
RULES = DefenceConfig()  # the defaults: factor 10, floor 200, burst 50, share 0.9 of >= 200
QUIET = Activity(messages=0, recipients=0, new_recipients=0, baseline=0, new_network_at=None)


def test_a_steady_account_is_never_held_at_its_own_busiest_hour_and_more() -> None:
    # 14 days peaking at 300 an hour: this hour at 3x its busiest is still fine.
    steady = replace(QUIET, messages=900, recipients=1800, new_recipients=30, baseline=300)
    assert decide(RULES, steady, NOW) is None
    assert volume_threshold(RULES, steady, NOW) == 3000


def test_a_new_account_gets_the_floor() -> None:
    assert decide(RULES, replace(QUIET, messages=200), NOW) is None
    trigger = decide(RULES, replace(QUIET, messages=201), NOW)
    assert trigger is not None and trigger.reason == "volume"
    assert trigger.counts["messages"] == 201 and "201 messages this hour > 200" in trigger.detail


def test_volume_is_k_times_the_baseline_above_the_floor() -> None:
    busy = replace(QUIET, baseline=40)
    assert decide(RULES, replace(busy, messages=400), NOW) is None
    assert decide(RULES, replace(busy, messages=401), NOW) is not None


def test_a_burst_after_a_login_from_a_new_network() -> None:
    roaming = replace(QUIET, new_network_at=NOW - 600, new_network="203.0.113.0/24")
    assert decide(RULES, replace(roaming, messages=50), NOW) is None
    trigger = decide(RULES, replace(roaming, messages=51), NOW)
    assert trigger is not None and trigger.reason == "new_network"
    assert trigger.detail == (
        "51 messages this hour since a login from a new network 203.0.113.0/24 > 50"
    )
    # An hour after that login the network is no longer new.
    assert decide(RULES, replace(roaming, messages=51, new_network_at=NOW - 3601), NOW) is None
    # A busy account's own baseline is its burst allowance.
    assert decide(RULES, replace(roaming, messages=51, baseline=80), NOW) is None


def test_mostly_new_recipients_once_there_are_enough() -> None:
    spray = replace(QUIET, messages=150, recipients=210, new_recipients=199)
    assert decide(RULES, spray, NOW) is None  # under the minimum count
    spray = replace(spray, recipients=220, new_recipients=200)
    trigger = decide(RULES, spray, NOW)
    assert trigger is not None and trigger.reason == "new_recipients"
    assert decide(RULES, replace(spray, recipients=223), NOW) is None  # 200/223 < 0.9


def test_an_expected_burst_raises_the_baseline_until_it_ends() -> None:
    expected = replace(QUIET, messages=1500, expected_until=NOW + 60, expected_messages=200)
    assert decide(RULES, expected, NOW) is None  # threshold 10 x 200
    assert decide(RULES, replace(expected, messages=2001), NOW) is not None
    assert decide(RULES, replace(expected, expected_until=NOW - 1), NOW) is not None
    # While expected, the new-network and new-recipient triggers stay quiet.
    burst = replace(
        expected, messages=60, new_network_at=NOW - 5, recipients=300, new_recipients=300
    )
    assert decide(RULES, burst, NOW) is None


def test_held_disabled_and_zero_thresholds_decide_nothing() -> None:
    flood = replace(
        QUIET, messages=10_000, new_network_at=NOW, recipients=9000, new_recipients=9000
    )
    assert decide(RULES, replace(flood, held=True), NOW) is None
    assert decide(replace(RULES, enabled=False), flood, NOW) is None
    off = DefenceConfig(volume_floor=0, new_recipient_min=0, new_network_burst=0)
    assert decide(off, flood, NOW) is None


def test_remote_refusals() -> None:
    assert reject_trigger(RULES, 19, 20) is None  # under the minimum
    assert reject_trigger(RULES, 20, 100) is None  # 0.2 <= 0.3
    trigger = reject_trigger(RULES, 31, 100)
    assert trigger is not None and trigger.reason == "remote_rejects"
    assert trigger.counts == {"refused": 31, "attempted": 100}
    assert reject_trigger(RULES, 50, 0) is None
    assert reject_trigger(replace(RULES, remote_reject_min=0), 999, 1000) is None


def test_networks_are_slash_24_and_slash_48() -> None:
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert network_of("?") is None
    assert network_of("not an address\r\n") is None


def test_client_names_are_printable_and_bounded() -> None:
    assert client_name("Laptop.Example") == "laptop.example"
    assert client_name("x\r\ny z\x00") == "x??y?z?"
    assert len(client_name("a" * 5000)) == 100
    assert client_name("") == "-"


def test_the_defence_section_is_validated_one_line_per_problem(tmp_path: Path) -> None:
    from relaygate.config import ConfigError, config_from_dict

    good = config_from_dict(
        {"defence": {"enabled": False, "volume_factor": 4, "new_recipient_share": 1}}, tmp_path
    )
    assert not good.defence.enabled and good.defence.volume_factor == 4.0
    assert config_from_dict({}, tmp_path).defence == DefenceConfig()
    bad = {
        "enabled": "yes",
        "volume_factor": -1,
        "volume_floor": 1.5,
        "new_recipient_share": 1.5,
        "remote_reject_rate": True,
        "refresh_seconds": 0,
        "hold_everything": True,
    }
    try:
        config_from_dict({"defence": bad}, tmp_path)
    except ConfigError as exc:
        problems = exc.problems
    else:
        raise AssertionError("accepted")
    assert len(problems) == len(bad), problems
    assert all("\n" not in p and p.startswith("defence") for p in problems)
