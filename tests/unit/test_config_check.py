"""config_check: what serve would refuse beyond the loader, found without making anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.config import ConfigError
from relaygate.config_check import check
from relaygate.delivery.dkim import generate_key, key_directory
from relaygate.server.tls import ensure_self_signed


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relaygate.toml"
    path.write_text('[server]\ndata_dir = "data"\n' + text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        check(path)
    return caught.value.problems


def test_a_good_file_passes_and_nothing_is_made(tmp_path: Path) -> None:
    (ecdsa_cert, ecdsa_key), _ = ensure_self_signed(tmp_path / "certs", "localhost")
    path = write(
        tmp_path,
        f'[tls]\ncert_file = "{ecdsa_cert}"\nkey_file = "{ecdsa_key}"\n'
        '[log]\nfile = "logs/deep/relaygate.log"\n',
    )
    config = check(path)
    assert config.tls.cert_file == ecdsa_cert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs", "relaygate.toml"]


def test_a_certificate_and_a_key_that_do_not_match(tmp_path: Path) -> None:
    (ecdsa_cert, _), (_, rsa_key) = ensure_self_signed(tmp_path / "certs", "localhost")
    path = write(tmp_path, f'[tls]\ncert_file = "{ecdsa_cert}"\nkey_file = "{rsa_key}"\n')
    found = problems(path)
    assert len(found) == 1
    assert found[0].startswith(f"{path}: tls: {ecdsa_cert} / {rsa_key}: cannot load certificate")


def test_files_that_are_not_pem(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    found = problems(write(tmp_path, '[tls]\ncert_file = "cert.pem"\nkey_file = "key.pem"\n'))
    assert len(found) == 1 and ": tls: " in found[0]


def test_every_problem_beyond_loading_together(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where data_dir should be\n")
    (tmp_path / "logs").write_text("a file where a directory should be\n")
    path = write(tmp_path, '[log]\nfile = "logs/relaygate.log"\n')
    assert problems(path) == [
        f"{path}: server.data_dir: {tmp_path / 'data'} is not a directory",
        f"{path}: log.file: cannot make {tmp_path / 'logs/relaygate.log'}:"
        f" {tmp_path / 'logs'} is not a directory",
    ]


def test_a_log_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    path = write(tmp_path, '[log]\nfile = "log"\n')
    assert problems(path) == [f"{path}: log.file: {tmp_path / 'log'} is a directory"]


def test_dkim_keys_in_data_dir_are_loaded(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    keys = key_directory(tmp_path / "data")
    generate_key(keys, "example.com", algorithm="ed25519")
    check(path)  # a good key
    (keys / "example.com" / "broken.rsa.pem").write_text("not a key\n")
    found = problems(path)
    assert found == [
        f"{path}: dkim: {keys / 'example.com' / 'broken.rsa.pem'}:"
        " not an unencrypted PEM private key"
    ]


def test_loader_problems_come_first_and_alone(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_recipients = 0\ncolour = 1\n")
    assert problems(path) == [
        f"{path}: limits.colour: unknown setting",
        f"{path}: limits.max_recipients: must be a whole number >= 1 (got 0)",
    ]
