"""relaygate.example.toml: generated from the config types, every key described,
and a file the loader and ``config check`` accept."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from relaygate import config_check, config_docs
from relaygate.config import ConfigError, config_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "relaygate.example.toml"


def test_every_key_has_a_description() -> None:
    missing = config_docs.missing()
    assert not missing, (
        "describe these config keys in DOCS in src/relaygate/config_docs.py, one line each"
        ' (e.g. "delivery.bounce_to": Doc("Where bounces go: sender | capture."),), then run'
        f" `{config_docs.REGENERATE}`: " + ", ".join(missing)
    )


def test_no_description_of_a_key_that_is_gone() -> None:
    unused = config_docs.unused()
    assert not unused, (
        "these DOCS entries in src/relaygate/config_docs.py describe no config key"
        f" (renamed or removed?): {', '.join(unused)}"
    )


def test_the_checked_in_example_is_what_the_generator_makes() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == config_docs.example(), (
        f"relaygate.example.toml is out of date: run `{config_docs.REGENERATE}`"
        " at the repository root"
    )


def test_the_example_passes_config_check(tmp_path: Path) -> None:
    # A copy: beside the real file, ./relaygate-data may exist from `make run`.
    copy = tmp_path / "relaygate.toml"
    copy.write_text(config_docs.example(), encoding="utf-8")
    config = config_check.check(copy)
    assert config.delivery.mode == "capture"
    assert config.data_dir == tmp_path / "relaygate-data"
    assert list(tmp_path.iterdir()) == [copy]  # checking made nothing


def uncommented(text: str) -> str:
    """Every `#key = value` and `#[table]` line of the example made active."""
    return "\n".join(re.sub(r'^#(?=[\[A-Za-z0-9_"])', "", line) for line in text.splitlines())


def test_every_example_line_is_a_key_the_loader_knows(tmp_path: Path) -> None:
    data = tomllib.loads(uncommented(config_docs.example()))
    try:
        config_from_dict(data, tmp_path)
        problems: list[str] = []
    except ConfigError as exc:
        problems = exc.problems
    # The example's files are not on this machine, proxy_trusted wants
    # proxy_protocol = true, and [oauth] takes jwks_url or jwks_file, not both:
    # everything else must load.
    expected = ("cannot read /etc/relaygate/", "proxy_trusted", "jwks_url and jwks_file")
    others = [p for p in problems if not any(e in p for e in expected)]
    assert not others
    assert "listeners[0].proxy_trusted: is set but proxy_protocol is not true" in problems


def test_the_example_describes_each_key_once_above_it() -> None:
    lines = config_docs.example().splitlines()
    at = lines.index("#max_recipients = 100")
    assert lines[at - 1] == "# Recipients per message."
    # A route's smarthost keys were described under [delivery.smarthost] already.
    route = lines.index("#[[delivery.routes]]")
    assert lines[route + 3 : route + 5] == ['#domain = "example.org"', '#host = "smtp.example.net"']
    assert all(len(line) <= 100 for line in lines)
