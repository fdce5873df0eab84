"""The container files agree with each other and with relaygate's config.

CI machines have no Docker daemon, so the image itself is tested by
contrib/docker/smoke.sh (README "Run it in a container"); this test holds the
parts that can be read without Docker: the Dockerfile's essentials (non-root
user, volume, healthcheck, the command it runs), compose.yaml's services and
ports, and the container config, loaded by relaygate's own config loader.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from relaygate.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_IN_IMAGE = "/etc/relaygate/relaygate.toml"
CONTAINER_CONFIG = REPO / "contrib" / "docker" / "relaygate.toml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """A JSON-array argument (["relaygate", "serve"]) as a list."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def dockerfile_stages() -> list[list[Instruction]]:
    """Instructions per build stage, continuation lines joined, comments left out."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation line ends the Dockerfile"
    stages: list[list[Instruction]] = []
    for entry in logical:
        keyword, _, args = entry.strip().partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(args.split()))
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{entry!r} before the first FROM"
        stages[-1].append(instruction)
    return stages


def final_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def container_config(monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("RELAYGATE_CONFIG", raising=False)
    return load_config(CONTAINER_CONFIG)


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host side as written ("${VAR:-587}", "127.0.0.1:...")."""
    ports: dict[int, str] = {}
    for entry in service["ports"]:
        host, _, container = str(entry).rpartition(":")
        ports[int(container)] = host
    return ports


# ------------------------------------------------------------------ Dockerfile


def test_every_stage_is_slim_python_3_11() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2  # the wheel is built in one, installed in the other
    for stage in stages:
        assert stage[0].args.split()[0] == "python:3.11-slim", stage[0]


def test_the_image_runs_as_a_fixed_unprivileged_user() -> None:
    stage = final_stage()
    user = only(stage, "USER").args
    name, _, group = user.partition(":")
    assert name not in {"root", "0", ""} and group not in {"root", "0"}, user
    # Everything after USER runs unprivileged; the install happened before it.
    keywords = [i.keyword for i in stage]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    creates = " ".join(i.args for i in stage if i.keyword == "RUN")
    assert f"useradd --system --uid {name}" in creates, creates


def test_the_image_installs_the_wheel_it_built() -> None:
    build, final = dockerfile_stages()
    assert any(i.keyword == "RUN" and "pip wheel" in i.args for i in build)
    copy = [i.args for i in final if i.keyword == "COPY" and i.args.startswith("--from=")]
    assert copy and "/wheels" in copy[0], copy
    assert any(i.keyword == "RUN" and "pip install" in i.args and ".whl" in i.args for i in final)


def test_data_dir_is_the_volume_and_the_ports_are_exposed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stage = final_stage()
    config = container_config(monkeypatch)
    assert only(stage, "VOLUME").exec_form() == [str(config.data_dir)] == ["/data"]
    exposed = {int(p) for p in only(stage, "EXPOSE").args.split()}
    assert config.http is not None
    assert exposed == {listener.port for listener in config.listeners} | {config.http.port}
    assert exposed == {587, 465, 8025}


def test_the_entrypoint_serves_the_config_the_image_carries() -> None:
    stage = final_stage()
    assert only(stage, "ENTRYPOINT").exec_form() == ["relaygate"]
    assert only(stage, "CMD").exec_form() == ["serve", "--config", CONFIG_IN_IMAGE]
    copies = [i.args.split() for i in stage if i.keyword == "COPY"]
    assert ["contrib/docker/relaygate.toml", CONFIG_IN_IMAGE] in copies, copies
    env = " ".join(i.args for i in stage if i.keyword == "ENV")
    assert f"RELAYGATE_CONFIG={CONFIG_IN_IMAGE}" in env  # for `docker exec ... relaygate user add`


def test_the_healthcheck_asks_relaygate_health() -> None:
    check = only(final_stage(), "HEALTHCHECK").args
    options, _, command = check.partition(" CMD ")
    assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
    assert json.loads(command) == ["relaygate", "health", "--config", CONFIG_IN_IMAGE]


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    for stage in dockerfile_stages():
        for instruction in stage:
            if instruction.keyword != "COPY" or instruction.args.startswith("--from="):
                continue
            *sources, _ = instruction.args.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert any(source == a or source.startswith(a + "/") for a in allowed), source


# ------------------------------------------------------------------ compose.yaml


def test_compose_runs_relaygate_with_postgres_and_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    assert set(services) == {"relaygate", "postgres", "redis"}
    relaygate = services["relaygate"]
    assert relaygate["build"] == "."
    for backend in ("postgres", "redis"):
        assert relaygate["depends_on"][backend] == {"condition": "service_healthy"}
        assert services[backend]["healthcheck"]["test"], backend
    config = container_config(monkeypatch)
    # [storage] url names the postgres service, its user and database; the
    # password is not in the config but in PGPASSWORD, the same as the server's.
    assert config.storage.url is not None
    url = urlsplit(config.storage.url)
    postgres = services["postgres"]["environment"]
    assert (url.hostname, url.port, url.password) == ("postgres", 5432, None)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.path == "/" + postgres["POSTGRES_DB"]
    assert relaygate["environment"]["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
    assert config.shared.redis_url is not None
    assert urlsplit(config.shared.redis_url).hostname == "redis"


def test_compose_mounts_the_config_and_the_data_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    data = compose()
    volumes = data["services"]["relaygate"]["volumes"]
    assert f"./contrib/docker/relaygate.toml:{CONFIG_IN_IMAGE}:ro" in volumes
    config = container_config(monkeypatch)
    named = [v for v in volumes if v.endswith(f":{config.data_dir}")]
    assert len(named) == 1, volumes
    assert named[0].split(":")[0] in data["volumes"]


def test_compose_publishes_the_listeners_and_keeps_http_on_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ports = published(compose()["services"]["relaygate"])
    config = container_config(monkeypatch)
    assert config.http is not None
    assert set(ports) == {listener.port for listener in config.listeners} | {config.http.port}
    assert ports[config.http.port].startswith("127.0.0.1:"), ports


def test_the_smoke_script_parses_and_sets_what_compose_reads() -> None:
    script = REPO / "contrib" / "docker" / "smoke.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    exported = set(re.findall(r"^export (RELAYGATE_\w+)", script.read_text(), re.MULTILINE))
    read = set(re.findall(r"\$\{(RELAYGATE_\w+):-", (REPO / "compose.yaml").read_text()))
    assert exported == read, (exported, read)


# ------------------------------------------------------------------ systemd, logs, fail2ban


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    text = (REPO / "contrib" / "systemd" / "relaygate.service").read_text(encoding="utf-8")
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_logs_to_the_journal_and_reloads_with_sighup() -> None:
    unit = unit_settings()
    assert unit["StandardError"] == ["journal"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStart"] == [
        "/opt/relaygate/bin/relaygate serve --config /etc/relaygate/relaygate.toml"
    ]


def test_the_jail_reads_the_units_journal() -> None:
    jail = (REPO / "contrib" / "fail2ban" / "jail.d" / "relaygate.conf").read_text(encoding="utf-8")
    settings = dict(
        (key.strip(), value.strip())
        for key, sep, value in (line.partition("=") for line in jail.splitlines())
        if sep and not key.lstrip().startswith("#")
    )
    assert settings["backend"] == "systemd"
    assert settings["journalmatch"] == "_SYSTEMD_UNIT=relaygate.service"  # the unit's file name
    assert (REPO / "contrib" / "systemd" / settings["journalmatch"].split("=")[1]).is_file()


def test_a_log_file_is_writable_by_the_unit_and_rotated_without_copytruncate() -> None:
    writable = unit_settings()["ReadWritePaths"][0].split()
    rotate = (REPO / "contrib" / "logrotate" / "relaygate").read_text(encoding="utf-8")
    directives = [line.split("#")[0].strip() for line in rotate.splitlines()]
    paths = [d.split()[0] for d in directives if d.endswith("{")]
    assert paths == ["/var/log/relaygate/relaygate.log"]
    assert str(Path(paths[0]).parent) in writable
    assert "copytruncate" not in directives
    assert "systemctl reload relaygate.service >/dev/null 2>&1 || true" in directives
    # The README and docs/deployment.md name that same file.
    for doc in ("README.md", "docs/deployment.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        named = set(re.findall(r"/var/log/relaygate[\w./-]*\.log", text))
        assert named == {paths[0]}, (doc, named)


def test_logrotate_rotates_by_renaming_and_then_reloads(tmp_path: Path) -> None:
    """The shipped recipe run by the real logrotate on a file of ours: the old
    lines are renamed away (not copied and truncated), a new private file takes
    the name, and the reload runs once. Only the path, the owner (this test's
    user) and the reload command (a marker file) are changed for the test."""
    log = tmp_path / "relaygate.log"
    log.write_text("old line\n", encoding="utf-8")
    marker = tmp_path / "reloaded"
    user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    recipe = (REPO / "contrib" / "logrotate" / "relaygate").read_text(encoding="utf-8")
    for old, new in (
        ("/var/log/relaygate/relaygate.log", str(log)),
        ("create 0600 relaygate relaygate", f"create 0600 {user} {group}"),
        ("systemctl reload relaygate.service >/dev/null 2>&1 || true", f"echo reload >> {marker}"),
    ):
        assert old in recipe, old
        recipe = recipe.replace(old, new)
    config = tmp_path / "logrotate.conf"
    config.write_text(recipe, encoding="utf-8")
    inode = log.stat().st_ino
    result = subprocess.run(
        ["/usr/sbin/logrotate", "--force", "--state", str(tmp_path / "state"), str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rotated = tmp_path / "relaygate.log.1"  # delaycompress: not compressed yet
    assert rotated.read_text(encoding="utf-8") == "old line\n"
    assert rotated.stat().st_ino == inode  # renamed: a writer holding it loses nothing
    assert log.read_text(encoding="utf-8") == "" and log.stat().st_mode & 0o777 == 0o600
    assert marker.read_text(encoding="utf-8") == "reload\n"
