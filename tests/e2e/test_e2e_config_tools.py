"""``relaygate --version`` and ``relaygate config check|show|example``, run as the
user runs them: the CLI as a subprocess, its output and exit status.

``config check`` must find what ``serve`` would refuse and make nothing; what
``config show`` prints must pass ``config check`` and run a real server.
"""

from __future__ import annotations

import importlib.metadata
import smtplib
import subprocess
import sys
from pathlib import Path

from relaygate import __version__
from relaygate.server.tls import ensure_self_signed

from .helpers import (
    ALICE,
    ENV_VAR,
    HOST,
    IO_TIMEOUT,
    PROCESS_TIMEOUT,
    ServerPool,
    clean_env,
    make_message,
)

REPO = Path(__file__).resolve().parents[2]
PG_SECRET = "Pg-pass-4Vn8Qz"
SMARTHOST_SECRET = "Smarthost-file-secret-2Lp7"


def relaygate(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relaygate", *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def good_config(directory: Path) -> Path:
    (cert, key), _ = ensure_self_signed(directory / "certs", "localhost")
    (directory / "smarthost.pw").write_text(SMARTHOST_SECRET + "\n")
    path = directory / "relaygate.toml"
    path.write_text(
        f"""[server]
hostname = "mail.example.test"
data_dir = "data"

[[listeners]]
address = "127.0.0.1:2587"

[tls]
cert_file = "{cert}"
key_file = "{key}"

[delivery]
mode = "smarthost"

[delivery.smarthost]
host = "127.0.0.1"
username = "relay"
password_file = "smarthost.pw"

[storage]
url = "postgresql://relaygate:{PG_SECRET}@127.0.0.1:5432/relaygate"

[log]
file = "log/relaygate.log"
""",
        encoding="utf-8",
    )
    return path


def test_version() -> None:
    result = relaygate("--version", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"relaygate {__version__}\n"
    # What pip installed says the same (pyproject and the package agree).
    assert __version__ == importlib.metadata.version("relaygate")


def test_check_a_good_file_makes_nothing(tmp_path: Path) -> None:
    path = good_config(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = relaygate("config", "check", str(path), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"relaygate: {path}: ok\n",
        "",
    )
    # No data_dir, no log directory: checking changed nothing (nor connected to PostgreSQL).
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_reports_every_problem_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\ndata_dir = "data"\nworkers = -1\ncolour = "blue"\n\n'
        '[tls]\ncert_file = "missing.pem"\nkey_file = "missing.key"\n\n'
        '[delivery]\nmode = "smarthost"\n',
        encoding="utf-8",
    )
    result = relaygate("config", "check", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "relaygate: bad.toml: server.colour: unknown setting",
        "relaygate: bad.toml: server.workers: must be a whole number >= 0 (got -1)",
        f"relaygate: bad.toml: tls.cert_file: cannot read {tmp_path / 'missing.pem'}",
        f"relaygate: bad.toml: tls.key_file: cannot read {tmp_path / 'missing.key'}",
        'relaygate: bad.toml: delivery: mode = "smarthost" needs a [delivery.smarthost] table',
    ]
    assert not (tmp_path / "data").exists()


def test_check_finds_what_serve_would_refuse(tmp_path: Path) -> None:
    (ecdsa_cert, _), (_, rsa_key) = ensure_self_signed(tmp_path / "certs", "localhost")
    (tmp_path / "data").write_text("not a directory\n")
    path = tmp_path / "relaygate.toml"
    path.write_text(
        f'[server]\ndata_dir = "data"\n[tls]\ncert_file = "{ecdsa_cert}"\nkey_file = "{rsa_key}"\n',
        encoding="utf-8",
    )
    result = relaygate("config", "check", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"relaygate: {path}: tls: {ecdsa_cert} / {rsa_key}: cannot load")
    assert lines[1] == f"relaygate: {path}: server.data_dir: {tmp_path / 'data'} is not a directory"
    assert "Traceback" not in result.stderr


def test_check_finds_the_file_like_every_command(tmp_path: Path) -> None:
    good = good_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n", encoding="utf-8")
    env_good = clean_env(**{ENV_VAR: str(good)})
    env_bad = clean_env(**{ENV_VAR: str(bad)})
    assert relaygate("config", "check", cwd=tmp_path, env=env_good).returncode == 0
    assert relaygate("--config", str(good), "config", "check", cwd=tmp_path).returncode == 0
    assert relaygate("config", "check", "--config", str(good), cwd=tmp_path).returncode == 0
    # FILE wins over $RELAYGATE_CONFIG, and a bad $RELAYGATE_CONFIG does not get in its way.
    assert relaygate("config", "check", str(good), cwd=tmp_path, env=env_bad).returncode == 0
    result = relaygate("config", "check", cwd=tmp_path, env=env_bad)
    assert result.returncode == 2
    assert result.stderr.startswith(f"relaygate: {bad}: TOML syntax error")
    assert len(result.stderr.splitlines()) == 1
    result = relaygate("config", "check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "relaygate: config check: no file given: name one, or set --config or"
        " $RELAYGATE_CONFIG (without one, relaygate runs with quickstart settings)"
    ]


def test_show_masks_secrets_and_round_trips(tmp_path: Path) -> None:
    path = good_config(tmp_path)
    result = relaygate("config", "show", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = result.stdout
    assert 'url = "postgresql://relaygate:***@127.0.0.1:5432/relaygate"' in shown
    assert f'password_file = "{tmp_path / "smarthost.pw"}"' in shown
    assert PG_SECRET not in shown and SMARTHOST_SECRET not in shown
    assert "max_recipients = 100" in shown.splitlines()  # defaults filled in
    # What it printed is a config that passes check and shows the same again
    # (from another directory: every path is absolute).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "shown.toml").write_text(shown, encoding="utf-8")
    check = relaygate("config", "check", "shown.toml", cwd=elsewhere)
    assert (check.returncode, check.stdout) == (0, "relaygate: shown.toml: ok\n"), check.stderr
    again = relaygate("config", "show", "shown.toml", cwd=elsewhere)
    assert again.stdout.splitlines()[1:] == shown.splitlines()[1:]  # all but "from FILE"
    assert not (tmp_path / "data").exists() and not (elsewhere / "data").exists()


def test_show_changed(tmp_path: Path) -> None:
    path = good_config(tmp_path)
    result = relaygate("config", "show", "--changed", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "[server]",
        'hostname = "mail.example.test"',
        f'data_dir = "{tmp_path / "data"}"',
        "[[listeners]]",
        'address = "127.0.0.1:2587"',
        "[tls]",
        f'cert_file = "{tmp_path / "certs" / "selfsigned-ecdsa.crt"}"',
        f'key_file = "{tmp_path / "certs" / "selfsigned-ecdsa.key"}"',
        "[delivery]",
        'mode = "smarthost"',
        "[delivery.smarthost]",
        'host = "127.0.0.1"',
        'username = "relay"',
        f'password_file = "{tmp_path / "smarthost.pw"}"',
        "[log]",
        f'file = "{tmp_path / "log" / "relaygate.log"}"',
        "[storage]",
        'url = "postgresql://relaygate:***@127.0.0.1:5432/relaygate"',
    ]


def test_show_without_a_file_is_quickstart(tmp_path: Path) -> None:
    result = relaygate("config", "show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "quickstart, no config file" in result.stdout.splitlines()[0]
    assert f'data_dir = "{tmp_path / "relaygate-data"}"' in result.stdout
    assert 'address = "127.0.0.1:8025"' in result.stdout  # quickstart's web UI
    assert not (tmp_path / "relaygate-data").exists()


def test_show_refuses_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[limits]\nmax_recipients = 0\n", encoding="utf-8")
    result = relaygate("config", "show", "bad.toml", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "relaygate: bad.toml: limits.max_recipients: must be a whole number >= 1 (got 0)\n"
    )


def test_the_example_is_current_and_passes_check(tmp_path: Path) -> None:
    result = relaygate("config", "example", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO / "relaygate.example.toml").read_text(encoding="utf-8")
    (tmp_path / "example.toml").write_text(result.stdout, encoding="utf-8")
    check = relaygate("config", "check", "example.toml", cwd=tmp_path)
    assert (check.returncode, check.stdout) == (0, "relaygate: example.toml: ok\n"), check.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.toml"]


def test_a_server_runs_from_what_show_printed(fresh_servers: ServerPool) -> None:
    server = fresh_servers.create("shown", users=[ALICE], start=False)
    shown = server.cli("config", "show").stdout
    server.config_path.write_text(shown, encoding="utf-8")
    assert server.cli("config", "check").stdout == f"relaygate: {server.config_path}: ok\n"
    server.start()
    with smtplib.SMTP(HOST, server.starttls_port, timeout=IO_TIMEOUT) as client:
        client.starttls(context=server.client_context())
        client.login(ALICE.address, ALICE.password)
        to = ["rcpt@example.net"]
        message = make_message(from_addr=ALICE.address, to=to, subject="from shown config")
        client.sendmail(ALICE.address, to, message)
    assert "from shown config" in server.subjects()
