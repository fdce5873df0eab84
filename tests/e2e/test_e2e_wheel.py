"""The wheel installs and runs outside the repository.

The sources are copied to a temporary directory and built into a wheel (pip
wheel, build isolation: setuptools as pyproject asks for it), with no setuptools
warning in the build output. The wheel goes into a NEW virtual environment
(its dependencies from the package index through pip and pip's cache), and from
a working directory outside the repository the installed ``relaygate`` script
answers ``--version``, creates an account, and serves: a message submitted with
smtplib over STARTTLS lands in the message log, and the web UI serves its login
page and a static file, which only the package data in the wheel can provide.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import relaygate

from .helpers import HOST, Server, User, clean_env, free_ports, make_message

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 240.0  # pip fetches setuptools for the isolated build
INSTALL_TIMEOUT = 420.0  # the dependencies, from pip's cache when it has them
USER = User("wheel@example.test", "Wheel-pw-7Hq2mZ4c")

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + INSTALL_TIMEOUT + 120)

# A Python warning class (SetuptoolsDeprecationWarning, BuildBackendWarning, ...),
# the "!!" frame setuptools puts around deprecations, or a distutils "warning:".
_WARNING = re.compile(r"\b[A-Z]\w*Warning\b|^\s*!!\s*$|^\s*warning:", re.MULTILINE)


def outside_env() -> dict[str, str]:
    """No PYTHONPATH (it would put this checkout's sources before the installed
    package); bytecode allowed, as for any user (distutils warns when it is off)."""
    env = clean_env()
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args,
        cwd=cwd,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


@dataclass(frozen=True)
class Installed:
    wheel: Path
    build_output: str
    venv: Path
    workdir: Path  # a directory that is not the repository

    @property
    def relaygate(self) -> Path:
        return self.venv / "bin" / "relaygate"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    dist = base / "dist"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(dist), str(source)],
        base,
        BUILD_TIMEOUT,
    )
    wheels = list(dist.glob("relaygate-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    run([sys.executable, "-m", "venv", str(venv)], base, 60)
    run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheels[0])],
        base,
        INSTALL_TIMEOUT,
    )
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(wheels[0], built.stdout + built.stderr, venv, workdir)


class InstalledServer(Server):
    """A Server run by the wheel's ``relaygate`` script, from outside the repo."""

    def __init__(self, directory: Path, installed: Installed, http_port: int) -> None:
        self.installed = installed
        super().__init__(directory, sections={"http": {"address": f"{HOST}:{http_port}"}})

    def command(self, *args: str) -> list[str]:
        return [str(self.installed.relaygate), "--config", str(self.config_path), *args]

    def env(self) -> dict[str, str]:
        return outside_env()


@pytest.fixture(scope="module")
def served(installed: Installed) -> Iterator[tuple[InstalledServer, str]]:
    (http_port,) = free_ports(1)
    server = InstalledServer(installed.workdir / "server", installed, http_port)
    assert REPO not in server.directory.parents
    server.add_user(USER)
    server.start()
    yield server, f"http://{HOST}:{http_port}"
    assert server.stop() == 0, server.stderr_path.read_text(errors="replace")


def test_the_build_shows_no_setuptools_warning(installed: Installed) -> None:
    assert "Successfully built relaygate" in installed.build_output, installed.build_output
    warnings = [m.group(0) for m in _WARNING.finditer(installed.build_output)]
    assert not warnings, installed.build_output


def test_the_wheel_carries_the_license_and_the_package_data(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"relaygate-{relaygate.__version__}.dist-info/METADATA").decode()
    assert f"relaygate-{relaygate.__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata.splitlines(), metadata
    assert {"relaygate/py.typed", "relaygate/http/ui/static/app.css"} <= names
    assert "relaygate/http/ui/templates/login.html" in names


def test_the_installed_script_runs_from_the_venv(installed: Installed) -> None:
    version = run([str(installed.relaygate), "--version"], installed.workdir, 30)
    assert version.stdout.strip() == f"relaygate {relaygate.__version__}"
    where = run(
        [
            str(installed.venv / "bin" / "python"),
            "-c",
            "import relaygate; print(relaygate.__file__)",
        ],
        installed.workdir,
        30,
    )
    module = Path(where.stdout.strip())
    assert installed.venv in module.parents, module  # not this checkout's src/


def test_the_installed_server_accepts_mail_over_starttls(
    served: tuple[InstalledServer, str],
) -> None:
    server, _ = served
    message = make_message(
        from_addr=USER.address, to=["someone@example.org"], subject="from the wheel"
    )
    with smtplib.SMTP(HOST, server.starttls_port, local_hostname="client.test", timeout=10) as smtp:
        smtp.starttls(context=server.client_context())  # verifies the self-signed pair
        smtp.login(USER.address, USER.password)
        refused = smtp.sendmail(USER.address, ["someone@example.org"], message)
    assert refused == {}
    subjects = {m["subject"] for m in server.messages()}
    assert "from the wheel" in subjects


def test_the_installed_web_ui_serves_its_page_and_static_files(
    served: tuple[InstalledServer, str],
) -> None:
    _, base = served
    with urllib.request.urlopen(f"{base}/login", timeout=10) as reply:
        assert reply.status == 200
        page = reply.read().decode()
    assert 'name="password"' in page, page
    assert "/ui/static/app.css" in page
    with urllib.request.urlopen(f"{base}/ui/static/app.css", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/css")
        css = reply.read()
    assert css == (REPO / "src" / "relaygate" / "http" / "ui" / "static" / "app.css").read_bytes()
