"""`relaygate dkim ...`, run in-process with a throwaway config and data directory."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import dkim
import pytest

from relaygate.cli import main
from relaygate.config import ENV_VAR
from relaygate.delivery.dkim import Signer
from relaygate.storage.sqlite import connect

CONFIG = """
[server]
hostname = "mx.test"
data_dir = "data"
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cfg(tmp_path: Path) -> list[str]:
    path = tmp_path / "relaygate.toml"
    path.write_text(CONFIG, encoding="utf-8")
    # The database exists, as after `relaygate serve` (read-only commands make none).
    connect(tmp_path / "data" / "relaygate.db").close()
    return ["--config", str(path)]


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "dkim"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def records(text: str) -> dict[bytes, bytes]:
    """The TXT records in some output, as dkimpy's dnsfunc would get them."""
    found = {}
    for name, strings in re.findall(r'^(\S+) IN TXT ((?:"[^"]*" ?)+)$', text, re.MULTILINE):
        found[name.encode()] = "".join(re.findall(r'"([^"]*)"', strings)).encode()
    return found


def test_generate_rsa(capsys: pytest.CaptureFixture[str], cfg: list[str], key_dir: Path) -> None:
    status, out, err = run(capsys, *cfg, "dkim", "generate", "Example.COM")
    assert (status, err) == (0, "")
    path = key_dir / "example.com" / "relaygate.rsa.pem"
    lines = out.splitlines()
    assert lines[0] == "wrote rsa key for example.com, selector relaygate, to"
    assert lines[1] == f"  {path}"
    assert lines[3].startswith('relaygate._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(records(out)) == [b"relaygate._domainkey.example.com."]


def test_generate_both_then_sign_and_verify(
    capsys: pytest.CaptureFixture[str], cfg: list[str], key_dir: Path
) -> None:
    _, out_rsa, _ = run(capsys, *cfg, "dkim", "generate", "example.com")
    status, out_ed, err = run(
        capsys, *cfg, "dkim", "generate", "example.com", "--algorithm", "ed25519"
    )
    assert (status, err) == (0, "")
    assert "selector relaygate-ed25519" in out_ed
    dns = records(out_rsa) | records(out_ed)
    assert len(dns) == 2

    message = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
    signed = Signer.from_directory(key_dir).sign(message, "example.com", 1.79e9) + message
    for index in (0, 1):
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=lambda name, timeout=5: dns.get(name))

    # `show` prints the same records again, from the key files.
    status, out, err = run(capsys, *cfg, "dkim", "show", "EXAMPLE.com.")
    assert (status, err) == (0, "")
    assert records(out) == dns
    assert len(out.splitlines()) == 2


def test_generate_with_selector(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, _ = run(
        capsys,
        *cfg,
        "dkim",
        "generate",
        "example.org",
        "--selector",
        "2026a",
        "--algorithm",
        "ed25519",
    )
    assert status == 0
    assert list(records(out)) == [b"2026a._domainkey.example.org."]


def test_generate_refuses_to_overwrite(
    capsys: pytest.CaptureFixture[str], cfg: list[str], key_dir: Path
) -> None:
    assert run(capsys, *cfg, "dkim", "generate", "example.com", "--algorithm", "ed25519")[0] == 0
    path = key_dir / "example.com" / "relaygate-ed25519.ed25519.pem"
    before = path.read_bytes()
    status, out, err = run(
        capsys, *cfg, "dkim", "generate", "example.com", "--algorithm", "ed25519"
    )
    assert (status, out) == (2, "")
    assert err == (
        f"relaygate: {path}: example.com has a key with selector 'relaygate-ed25519' already;"
        " choose another selector (keys are never replaced)\n"
    )
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bad_domain"], "relaygate: invalid domain: 'bad_domain': use a name such as example.com"),
        (
            ["example.com", "--selector", "a/b"],
            "relaygate: invalid selector: 'a/b': use letters, digits and '-', such as relaygate",
        ),
    ],
)
def test_generate_bad_input(
    capsys: pytest.CaptureFixture[str], cfg: list[str], argv: list[str], message: str
) -> None:
    status, out, err = run(capsys, *cfg, "dkim", "generate", *argv)
    assert (status, out, err) == (2, "", message + "\n")


def test_generate_bad_algorithm(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*cfg, "dkim", "generate", "example.com", "--algorithm", "dsa"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dsa'" in capsys.readouterr().err


def test_list(capsys: pytest.CaptureFixture[str], cfg: list[str], key_dir: Path) -> None:
    status, out, err = run(capsys, *cfg, "dkim", "list")
    assert (status, err) == (0, "")
    assert out == "no DKIM keys yet; create one with: relaygate dkim generate DOMAIN\n"

    run(capsys, *cfg, "dkim", "generate", "example.org", "--algorithm", "ed25519")
    run(
        capsys,
        *cfg,
        "dkim",
        "generate",
        "example.com",
        "--algorithm",
        "ed25519",
        "--selector",
        "s2",
    )
    status, out, err = run(capsys, *cfg, "dkim", "list")
    assert (status, err) == (0, "")
    rows = [line.split() for line in out.splitlines()]
    assert rows == [
        ["DOMAIN", "SELECTOR", "ALGORITHM", "FILE"],
        ["example.com", "s2", "ed25519-sha256", str(key_dir / "example.com" / "s2.ed25519.pem")],
        [
            "example.org",
            "relaygate-ed25519",
            "ed25519-sha256",
            str(key_dir / "example.org" / "relaygate-ed25519.ed25519.pem"),
        ],
    ]

    status, out, _ = run(capsys, *cfg, "dkim", "list", "--json")
    listed = json.loads(out)
    assert [(k["domain"], k["selector"], k["algorithm"]) for k in listed] == [
        ("example.com", "s2", "ed25519-sha256"),
        ("example.org", "relaygate-ed25519", "ed25519-sha256"),
    ]
    assert listed[0]["dns_name"] == "s2._domainkey.example.com."


def test_list_reports_a_broken_key_in_one_line(
    capsys: pytest.CaptureFixture[str], cfg: list[str], key_dir: Path
) -> None:
    (key_dir / "example.com").mkdir(parents=True)
    (key_dir / "example.com" / "s.rsa.pem").write_text("garbage")
    status, out, err = run(capsys, *cfg, "dkim", "list")
    assert (status, out) == (2, "")
    assert err == (
        f"relaygate: {key_dir / 'example.com' / 's.rsa.pem'}: not an unencrypted PEM private key\n"
    )


def test_show_unknown_domain(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, err = run(capsys, *cfg, "dkim", "show", "example.net")
    assert (status, out) == (1, "")
    assert err == (
        "relaygate: no DKIM key for example.net; create one with:"
        " relaygate dkim generate example.net\n"
    )


def test_show_invalid_domain(capsys: pytest.CaptureFixture[str], cfg: list[str]) -> None:
    status, out, err = run(capsys, *cfg, "dkim", "show", "no spaces.com")
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("relaygate: invalid domain:")


def test_quickstart_writes_under_the_working_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # No config: quickstart, data in ./relaygate-data (created on demand).
    status, _, err = run(capsys, "dkim", "generate", "example.com", "--algorithm", "ed25519")
    assert (status, err) == (0, "")
    assert (tmp_path / "relaygate-data/dkim/example.com/relaygate-ed25519.ed25519.pem").is_file()
