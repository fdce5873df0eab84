"""Building blocks for the end-to-end tests.

- ``Server``: one real ``relaygate serve`` process with its own config, data
  directory and log file, plus helpers to run the CLI against it and to read
  its log as parsed events.
- ``RawSMTP``: a byte-exact SMTP client over a real socket (plain or TLS), for
  dialogs that no well-behaved client library would produce.
- ``ServerPool``: makes servers for a fixture and, at teardown, stops them and
  reports a bad exit status or a secret found in a log.
- Every password and AUTH payload a test sends is remembered in
  ``SENT_SECRETS`` so the fixtures can check that no log line ever holds one.
- /proc helpers tell which worker process holds a connection, so tests with
  workers = 2 can make sure both workers answered.

Every wait here is bounded in time, and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import functools
import hashlib
import io
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psycopg
import scramp

from relaygate import cli as relaygate_cli
from relaygate import logs as relaygate_logs
from relaygate.config import Config as RelaygateConfig
from relaygate.storage.postgres import pool as postgres_pool

HOST = "127.0.0.1"
TLS_NAME = "localhost"  # the server's hostname, in its self-signed certificates
PROCESS_TIMEOUT = 30.0  # one CLI command
START_TIMEOUT = 10.0  # until both listeners greet
STOP_TIMEOUT = 15.0  # SIGTERM until exit
IO_TIMEOUT = 10.0  # one SMTP reply
QUEUE_ID = re.compile(r"queued as ([0-9A-Z]{17})\b")
ENV_VAR = "RELAYGATE_CONFIG"

# Every secret a test has sent to any server: no log may contain one.
SENT_SECRETS: set[str] = set()


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def remember_credentials(user: str, password: str) -> None:
    """Note a password and every AUTH payload a client could derive from it."""
    SENT_SECRETS.add(password)
    for payload in (
        f"\0{user}\0{password}",  # PLAIN without authzid
        f"{user}\0{user}\0{password}",  # PLAIN with authzid
        password,  # LOGIN, second step
        user,  # LOGIN, first step
    ):
        SENT_SECRETS.add(b64(payload))


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes, without $RELAYGATE_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update(extra)
    return env


# ------------------------------------------------------------------ ports


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held at once, so distinct)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_is_free(port: int) -> bool:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def wait_until(
    condition: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ processes (Linux /proc)


def process_children(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def connection_holder(
    pids: Iterable[int], server_ports: Collection[int], client_port: int
) -> int | None:
    """Which of ``pids`` holds the server end of our connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local_port = int(parts[1].rsplit(":", 1)[1], 16)
        remote_port = int(parts[2].rsplit(":", 1)[1], 16)
        if local_port in server_ports and remote_port == client_port:
            inode = parts[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return pid
    return None


def wait_workers_serving(root_pid: int, port: int, count: int, timeout: float) -> None:
    """Until ``count`` worker processes (children of ``root_pid``) have each greeted us."""
    seen: set[int] = set()

    def probe() -> bool:
        children = process_children(root_pid)
        if len(children) < count:
            return False
        try:
            with RawSMTP.connect(port, timeout=2.0) as client:
                holder = connection_holder(children, {port}, client.local_port)
        except (OSError, SMTPClosed, AssertionError):
            return False
        if holder is not None:
            seen.add(holder)
        return len(seen.intersection(children)) >= count

    wait_until(probe, timeout, 0.01, f"{count} workers to serve")


# ------------------------------------------------------------------ logs

_LOG_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
    r"(?P<level>debug|info|warning|error|critical) (?P<rest>event=\S.*)$"
)
_PAIR = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def parse_log_line(line: str) -> dict[str, str]:
    """``TS level event=NAME key=value ...`` (or the same as a JSON object, for
    ``[log] format = "json"``) -> dict of strings; ValueError if malformed."""
    if line.startswith("{"):
        return _parse_json_line(line)
    match = _LOG_LINE.match(line)
    if match is None:
        raise ValueError(f"not a logfmt event line: {line!r}")
    fields = {"ts": match["ts"], "level": match["level"]}
    rest = match["rest"]
    pos = 0
    while pos < len(rest):
        pair = _PAIR.match(rest, pos)
        if pair is None:
            raise ValueError(f"bad key=value at {pos} in {line!r}")
        key, value = pair.group(1), pair.group(2)
        if key in fields:
            raise ValueError(f"key {key} twice in {line!r}")
        fields[key] = str(json.loads(value)) if value.startswith('"') else value
        pos = pair.end()
        if pos < len(rest):
            if rest[pos] != " ":
                raise ValueError(f"no space after {key}= in {line!r}")
            pos += 1
    return fields


def _parse_json_line(line: str) -> dict[str, str]:
    data = json.loads(line)
    if not isinstance(data, dict) or list(data)[:3] != ["ts", "level", "event"]:
        raise ValueError(f"not a JSON event line: {line!r}")
    if not _LOG_LINE.match(f"{data['ts']} {data['level']} event={data['event']}"):
        raise ValueError(f"bad ts, level or event in {line!r}")
    # Values as the logfmt form shows them: str() of numbers and booleans.
    return {key: value if isinstance(value, str) else str(value) for key, value in data.items()}


# ------------------------------------------------------------------ messages


def make_message(
    *,
    from_addr: str,
    to: Sequence[str],
    subject: str,
    body: str = "Hello from an end-to-end test.\r\n",
    date: bool = True,
    message_id: bool = True,
    extra_headers: Sequence[str] = (),
) -> bytes:
    """An RFC 5322 message with CRLF line ends."""
    lines = [f"From: {from_addr}", f"To: {', '.join(to)}", f"Subject: {subject}"]
    if date:
        lines.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if message_id:
        lines.append(f"Message-ID: {email.utils.make_msgid(domain='client.test')}")
    lines += extra_headers
    text = "\r\n".join(lines) + "\r\n\r\n" + body.replace("\r\n", "\n").replace("\n", "\r\n")
    return text.encode()


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header section as (name, unfolded value) pairs, in order."""
    end = raw.find(b"\r\n\r\n")
    block = raw if end < 0 else raw[: end + 2]
    fields: list[tuple[str, str]] = []
    for line in block.decode("utf-8", "replace").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        fields.append((name.strip(), value.strip()))
    return fields


def field_values(raw: bytes, name: str) -> list[str]:
    return [v for n, v in header_fields(raw) if n.lower() == name.lower()]


def queue_id_of(text: str) -> str:
    match = QUEUE_ID.search(text)
    if match is None:
        raise AssertionError(f"no 'queued as <id>' in {text!r}")
    return match.group(1)


# ------------------------------------------------------------------ accounts


@dataclass(frozen=True)
class User:
    address: str
    password: str
    senders: tuple[str, ...] = ()
    disabled: bool = False


# ------------------------------------------------------------------ the server


TomlValue = int | float | str | list[str] | list[int]

# Rules that would get in the way of tests that fail many logins or send many
# messages from one account and one IP: off (0), unless a test asks otherwise.
# Written only for the sections this relaygate knows (they are being added).
RELAXED_SECTIONS: dict[str, dict[str, TomlValue]] = {
    "auth_throttle": {
        "ip_per_minute": 0,
        "ip_per_day": 0,
        "network_per_minute": 0,
        "network_per_day": 0,
        "account_per_hour": 0,
        "connection_delay_after": 0,
        "connection_close_after": 0,
    },
    "sending_limits": {
        "messages_per_hour": 0,
        "messages_per_day": 0,
        "recipients_per_day": 0,
        "new_recipients_per_day": 0,
    },
    # The defence watches every test's sending (its hot path runs) but never holds:
    # tests send bursts from new accounts and other loopback networks on purpose.
    "defence": {
        "volume_floor": 0,
        "new_recipient_min": 0,
        "new_network_burst": 0,
        "remote_reject_min": 0,
    },
}


def config_sections() -> set[str]:
    """The top-level tables this version of relaygate accepts."""
    return {f.name for f in dataclasses.fields(RelaygateConfig)}


def relaxed_sections(
    overrides: Mapping[str, Mapping[str, TomlValue]] | None,
) -> dict[str, dict[str, TomlValue]]:
    known = config_sections()
    sections = {name: dict(values) for name, values in RELAXED_SECTIONS.items() if name in known}
    for name, values in (overrides or {}).items():
        sections.setdefault(name, {}).update(values)
    return sections


# Which storage backend the servers of this run use unless a test says (see Server).
E2E_STORAGE = os.environ.get("RELAYGATE_E2E_STORAGE", "sqlite")


def new_database() -> str:
    """A new PostgreSQL database with relaygate's schema; its URL."""
    name = "relaygate_e2e_" + secrets.token_hex(6)
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    asyncio.run(postgres_pool.migrate(url))
    return url


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


POSTGRES_ADMIN_URL = os.environ.get(
    "RELAYGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


class Server:
    """One ``relaygate serve`` process on two free ports (STARTTLS, implicit TLS)."""

    def __init__(
        self,
        directory: Path,
        *,
        workers: int = 1,
        limits: Mapping[str, int | float] | None = None,
        sections: Mapping[str, Mapping[str, TomlValue]] | None = None,
        proxy_trusted: Sequence[str] | None = None,
        node_name: str | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.node_name = node_name
        self.ca_file: Path | None = None  # [tls] cert_file given: what clients trust
        self.directory = directory
        self.data_dir = directory / "data"
        self.log_path = directory / "relaygate.log"
        self.config_path = directory / "relaygate.toml"
        self.stdout_path = directory / "serve.stdout"
        self.stderr_path = directory / "serve.stderr"
        self.workers = workers
        self.limits = dict(limits or {})
        self.sections = relaxed_sections(sections)
        # RELAYGATE_E2E_STORAGE=postgresql: the same test on a database of its own.
        self.scratch_database: str | None = None
        if E2E_STORAGE == "postgresql" and "storage" not in self.sections:
            self.scratch_database = new_database()
            self.sections["storage"] = {"url": self.scratch_database}
        # Given: both listeners expect a PROXY header first, from these networks.
        self.proxy_trusted = list(proxy_trusted) if proxy_trusted is not None else None
        self.starttls_port, self.implicit_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None
        self.terminated = False  # SIGTERM sent to the current process
        self.users: dict[str, User] = {}
        self.serve_env: dict[str, str] = {}  # more environment for `serve` (test knobs)
        self.write_config()

    def __repr__(self) -> str:
        return f"Server({self.directory.name}, ports {self.starttls_port}/{self.implicit_port})"

    # configuration and CLI

    def write_config(self) -> None:
        lines = [
            "[server]",
            'hostname = "localhost"',
            f"data_dir = {json.dumps(str(self.data_dir))}",
            f"workers = {self.workers}",
            *([f"node_name = {json.dumps(self.node_name)}"] if self.node_name else []),
            "",
            "[[listeners]]",
            f'address = "{HOST}:{self.starttls_port}"',
            'tls = "starttls"',
            *self._proxy_lines(),
            "",
            "[[listeners]]",
            f'address = "{HOST}:{self.implicit_port}"',
            'tls = "implicit"',
            *self._proxy_lines(),
            "",
            "[password_hash]",
            "memory_kib = 8192",
            "time_cost = 1",
            "",
            "[log]",  # sections["log"] may add to it (format = "json")
            f"file = {json.dumps(str(self.log_path))}",
            *(f"{k} = {json.dumps(v)}" for k, v in self.sections.get("log", {}).items()),
        ]
        if self.limits:
            lines += ["", "[limits]"] + [f"{k} = {v!r}" for k, v in self.limits.items()]
        for name, values in self.sections.items():
            if name == "log":
                continue
            lines += ["", f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _proxy_lines(self) -> list[str]:
        if self.proxy_trusted is None:
            return []
        return ["proxy_protocol = true", f"proxy_trusted = {json.dumps(self.proxy_trusted)}"]

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "relaygate", "--config", str(self.config_path), *args]

    def env(self) -> dict[str, str]:
        """The environment of this server's processes (serve and the CLI)."""
        return clean_env()

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            env=self.env(),
            cwd=self.directory,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"relaygate {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def quick_cli(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """``relaygate ARGS`` run by this process (relaygate.cli.main, the same code and
        output as the command): for set-up and reads that are not what a test is about.
        A CLI process costs ~0.5 s of CPU to start; the helpers' ~1,000 calls were half
        the suite's CPU. Output in bytes (``--raw``). Off the main thread (stdout is
        global) or for a server whose commands need an environment of their own, a
        real process as ``cli``."""
        if (
            threading.current_thread() is not threading.main_thread()
            or type(self).env is not Server.env
            or type(self).command is not Server.command
        ):
            done = self.cli(*args, stdin=stdin, check=check)
            return subprocess.CompletedProcess(
                done.args, done.returncode, done.stdout.encode(), done.stderr.encode()
            )
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
        err = io.StringIO()
        saved = sys.stdin, sys.stdout, sys.stderr, relaygate_logs._sink.stream
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin or ""), out, err
        relaygate_logs._sink.stream = err
        try:
            status = relaygate_cli.main(["--config", str(self.config_path), *args])
        except SystemExit as exc:  # argparse
            status = exc.code if isinstance(exc.code, int) else 2
        finally:
            sys.stdin, sys.stdout, sys.stderr, relaygate_logs._sink.stream = saved
        out.flush()
        stdout = out.buffer.getvalue()
        if check and status != 0:
            raise AssertionError(f"relaygate {' '.join(args)} exited {status}: {err.getvalue()}")
        return subprocess.CompletedProcess(list(args), status, stdout, err.getvalue().encode())

    def quick_json(self, *args: str) -> Any:
        return json.loads(self.quick_cli(*args).stdout)

    def add_user(self, user: User) -> None:
        remember_credentials(user.address, user.password)
        args = ["user", "add", user.address, "--password-stdin"]
        for pattern in user.senders:
            args += ["--sender", pattern]
        self.quick_cli(*args, stdin=user.password + "\n")
        if user.disabled:
            self.quick_cli("user", "disable", user.address)
        self.users[user.address] = user

    def set_password(self, address: str, password: str) -> None:
        remember_credentials(address, password)
        self.quick_cli("user", "passwd", address, "--password-stdin", stdin=password + "\n")

    def messages(self, limit: int = 100000) -> list[dict[str, Any]]:
        return cast(
            list[dict[str, Any]],
            self.quick_json("messages", "list", "--json", "--limit", str(limit)),
        )

    def message(self, queue_id: str) -> dict[str, Any]:
        for entry in self.messages():
            if entry["id"] == queue_id:
                return entry
        raise AssertionError(f"message {queue_id} is not in `messages list`")

    def subjects(self) -> set[str]:
        return {str(m["subject"]) for m in self.messages()}

    def raw(self, queue_id: str) -> bytes:
        return self.quick_cli("messages", "show", queue_id, "--raw").stdout

    # TLS

    @property
    def ecdsa_cert(self) -> Path:
        return self.data_dir / "tls" / "selfsigned-ecdsa.crt"

    @property
    def rsa_cert(self) -> Path:
        return self.data_dir / "tls" / "selfsigned-rsa.crt"

    def ca_bundle(self) -> Path:
        """Both self-signed certificates in one PEM file (for curl, msmtp, swaks)."""
        bundle = self.directory / "ca-bundle.pem"
        bundle.write_bytes(self.ecdsa_cert.read_bytes() + self.rsa_cert.read_bytes())
        return bundle

    def client_context(self, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """Verifies the server's self-signed certificates (or ``ca_file``'s), host
        name "localhost"."""
        if self.ca_file is not None:
            context = ssl.create_default_context(cafile=str(self.ca_file))
        else:
            context = ssl.create_default_context(cafile=str(self.ecdsa_cert))
            context.load_verify_locations(cafile=str(self.rsa_cert))
        if max_version is not None:
            context.maximum_version = max_version
        return context

    # process

    @property
    def pid(self) -> int:
        assert self.process is not None, "server not started"
        return self.process.pid

    def start(self, timeout: float = START_TIMEOUT) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.terminated = False
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                self.command("serve"),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**self.env(), **self.serve_env},
                cwd=self.directory,
                start_new_session=True,  # its own process group: killpg reaches the workers
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout: float) -> None:
        """Until both listeners send their 220 greeting (the workers are serving)."""
        deadline = time.monotonic() + timeout
        ready = {self.starttls_port: False, self.implicit_port: False}
        while not all(ready.values()):
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"relaygate serve exited {self.process.returncode} during start:\n"
                    + self.stderr_path.read_text(errors="replace")
                )
            if time.monotonic() >= deadline:
                raise AssertionError(f"relaygate serve not ready within {timeout}s")
            for port, done in ready.items():
                if not done:
                    ready[port] = self._greets(port)
            if not all(ready.values()):
                time.sleep(0.05)
        if self.workers > 1:
            wait_workers_serving(
                self.pid, self.starttls_port, self.workers, max(0.1, deadline - time.monotonic())
            )

    def _greets(self, port: int) -> bool:
        """A 220 greeting; on a PROXY listener that does not trust us, a logged refusal."""
        header = b"PROXY UNKNOWN\r\n" if self.proxy_trusted is not None else None
        try:
            tls = self.client_context() if port == self.implicit_port else None
            with RawSMTP.connect(port, tls=tls, timeout=2.0, proxy_header=header) as client:
                client.send(b"QUIT\r\n")
                return client.greeting.code == 220
        except (OSError, ssl.SSLError, SMTPClosed, AssertionError):
            if header is None or not self.log_path.exists():
                return False
            return any(
                event.get("listener") == f"{HOST}:{port}"
                for event in self.log_events("proxy.refused")
            )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        if signum == signal.SIGTERM:
            self.terminated = True
        self.process.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (unless a test sent it) and wait: the exit status, None if it hung."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None and not self.terminated:
            # Only one SIGTERM: a second one while the interpreter exits (Python
            # has restored the default handlers by then) would kill it (-15).
            self.terminated = True
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the whole process group (supervisor and workers); wait for the ports."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        wait_until(
            lambda: port_is_free(self.starttls_port) and port_is_free(self.implicit_port),
            10.0,
            what="the killed server's ports to be free",
        )

    def worker_pids(self) -> list[int]:
        """The processes that serve connections (the supervisor's children, if any)."""
        return process_children(self.pid) or [self.pid]

    def worker_for(self, client_port: int) -> int | None:
        """Which server process holds the connection from our ``client_port``."""
        return connection_holder(
            self.worker_pids(), {self.starttls_port, self.implicit_port}, client_port
        )

    def api_token(self, name: str, *flags: str) -> str:
        """A new HTTP API token (``relaygate token add NAME [--read-only]``): its secret."""
        out = self.quick_cli("token", "add", name, *flags).stdout.decode()
        return out.splitlines()[0].rsplit(" ", 1)[1]

    # logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """A position in the log; pass it as ``since`` to see only later events."""
        return len(self.log_text())

    def log_events(self, name: str | None = None, since: int = 0) -> list[dict[str, str]]:
        text = self.log_text()[since:]
        # A line the server is writing right now can be read half-way: only whole
        # lines count (the rest shows up at the next look).
        text = text[: text.rfind("\n") + 1]
        events = [parse_log_line(line) for line in text.splitlines() if line]
        return [e for e in events if name is None or e["event"] == name]

    def wait_for_event(
        self,
        name: str,
        match: Callable[[dict[str, str]], bool] = lambda e: True,
        since: int = 0,
        timeout: float = 5.0,
    ) -> dict[str, str]:
        found: list[dict[str, str]] = []

        def look() -> bool:
            found[:] = [e for e in self.log_events(name, since) if match(e)]
            return bool(found)

        wait_until(look, timeout, what=f"log event {name}")
        return found[0]

    def secrets_in_log(self, secrets: Iterable[str] | None = None) -> list[str]:
        text = self.log_text()
        return sorted(s for s in (SENT_SECRETS if secrets is None else secrets) if s in text)


# ------------------------------------------------------------------ raw SMTP


class SMTPClosed(Exception):
    """The server closed the connection."""


_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text of each line, after "250-" or "250 "

    @property
    def enhanced(self) -> str:
        first = self.lines[-1].split(" ", 1)[0]
        return first if _ENHANCED.match(first) else ""

    @property
    def text(self) -> str:
        last = self.lines[-1]
        return last.split(" ", 1)[1] if self.enhanced and " " in last else last

    @property
    def status(self) -> str:
        """``"250 2.0.0"``: the code and enhanced code, as tests compare them."""
        return f"{self.code} {self.enhanced}".strip()

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {line}" for line in self.lines)


def auth_mechanisms(ehlo: Reply) -> set[str]:
    """The SASL mechanisms an EHLO reply offers (empty when there is no AUTH line)."""
    for line in ehlo.lines:
        words = line.split()
        if words and words[0].upper() == "AUTH":
            return {word.upper() for word in words[1:]}
    return set()


@dataclass
class RawSMTP:
    """A byte-exact SMTP client; every read is bounded by ``timeout``."""

    sock: socket.socket
    timeout: float = IO_TIMEOUT
    buffer: bytearray = field(default_factory=bytearray)
    greeting: Reply = field(default_factory=lambda: Reply(0, ("",)))

    @classmethod
    def connect(
        cls,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        timeout: float = IO_TIMEOUT,
        source: str | None = None,
        proxy_header: bytes | None = None,
    ) -> RawSMTP:
        """Connect to 127.0.0.1:``port``; ``source`` picks our own 127.x.y.z address.

        All of 127.0.0.0/8 is loopback on Linux, so a test can play clients
        from other addresses and /24 networks without leaving this machine.
        ``proxy_header`` is sent first, before TLS, as a load balancer would.
        """
        sock = socket.create_connection(
            (HOST, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        try:
            if proxy_header is not None:
                sock.sendall(proxy_header)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=TLS_NAME)
            client = cls(sock, timeout)
            client.greeting = client.reply()
        except BaseException:
            sock.close()
            raise
        return client

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def tls_version(self) -> str | None:
        return self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete reply in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, BrokenPipeError) as exc:
            raise SMTPClosed(str(exc)) from None
        if not data:
            raise SMTPClosed("connection closed by the server")
        self.buffer += data

    def read_line(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            self._fill(deadline)

    def reply(self, timeout: float | None = None) -> Reply:
        lines: list[str] = []
        code = 0
        for _ in range(1000):
            line = self.read_line(timeout).decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise AssertionError(f"not an SMTP reply line: {line!r}")
            code = int(line[:3])
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(code, tuple(lines))
        raise AssertionError("reply of more than 1000 lines")

    def command(self, line: str | bytes) -> Reply:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def pending(self, wait: float = 0.3) -> bytes:
        """Whatever else arrives within ``wait`` seconds (b"" if nothing)."""
        data = bytes(self.buffer)
        self.buffer.clear()
        deadline = time.monotonic() + wait
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionError):
                break
            if not chunk:
                break
            data += chunk
        return data

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError, OSError):
                return True
            if not chunk:
                return True
            self.buffer += chunk
        return False

    # dialogs

    def ehlo(self, name: str = "client.test") -> Reply:
        reply = self.command(f"EHLO {name}")
        assert reply.code == 250, str(reply)
        return reply

    def starttls(self, context: ssl.SSLContext) -> None:
        reply = self.command("STARTTLS")
        assert reply.status == "220 2.0.0", str(reply)
        assert not self.buffer, f"plaintext after the STARTTLS reply: {bytes(self.buffer)!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=TLS_NAME)

    def auth_plain(self, user: str, password: str) -> Reply:
        remember_credentials(user, password)
        payload = b64("\0" + user + "\0" + password)
        return self.command(f"AUTH PLAIN {payload}")

    def auth_login(self, user: str, password: str) -> Reply:
        remember_credentials(user, password)
        first = self.command("AUTH LOGIN")
        if first.code != 334:
            return first
        second = self.command(b64(user))
        if second.code != 334:
            return second
        return self.command(b64(password))

    def auth_scram(
        self, mechanism: str, user: str, password: str, *, binding: bytes | None = None
    ) -> Reply:
        """A SCRAM-SHA-256(-PLUS) exchange with scramp as the client; the last reply.

        For -PLUS the channel binding is tls-server-end-point: the SHA-256 of the
        certificate this connection got (or ``binding``, to pretend another one).
        """
        remember_credentials(user, password)
        channel_binding = None
        if mechanism.upper().endswith("-PLUS"):
            if binding is None:
                assert isinstance(self.sock, ssl.SSLSocket)
                der = self.sock.getpeercert(binary_form=True)
                assert der is not None
                binding = hashlib.sha256(der).digest()
            channel_binding = ("tls-server-end-point", binding)
        client = scramp.ScramClient([mechanism], user, password, channel_binding=channel_binding)
        reply = self.command(f"AUTH {mechanism} {b64(client.get_client_first())}")
        if reply.code != 334:
            return reply
        client.set_server_first(base64.b64decode(reply.text).decode())
        reply = self.command(b64(client.get_client_final()))
        if reply.code != 334:
            return reply
        client.set_server_final(base64.b64decode(reply.text).decode())  # checks the server
        return self.command("")

    def login(self, user: str, password: str) -> None:
        reply = self.auth_plain(user, password)
        assert reply.status == "235 2.7.0", str(reply)

    def transaction(self, mail_from: str, rcpts: Sequence[str]) -> None:
        reply = self.command(f"MAIL FROM:<{mail_from}>")
        assert reply.status == "250 2.1.0", str(reply)
        for rcpt in rcpts:
            reply = self.command(f"RCPT TO:<{rcpt}>")
            assert reply.status == "250 2.1.5", str(reply)

    def data(self, message: bytes) -> Reply:
        """DATA with dot-stuffing; the reply to the end of data."""
        reply = self.command("DATA")
        assert reply.code == 354, str(reply)
        body = message if message.endswith(b"\r\n") else message + b"\r\n"
        stuffed = b"\r\n".join(
            b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n")
        )
        self.send(stuffed + b".\r\n")
        return self.reply()

    def send_mail(self, mail_from: str, rcpts: Sequence[str], message: bytes) -> str:
        """A whole transaction; returns the queue id of the 250 reply."""
        self.transaction(mail_from, rcpts)
        reply = self.data(message)
        assert reply.status == "250 2.0.0", str(reply)
        return queue_id_of(reply.text)


@contextlib.contextmanager
def session(
    server: Server,
    *,
    implicit: bool = True,
    user: User | None = None,
    ehlo: bool = True,
    source: str | None = None,
) -> Iterator[RawSMTP]:
    """A TLS session (implicit, or STARTTLS), greeted and optionally logged in."""
    context = server.client_context()
    if implicit:
        client = RawSMTP.connect(server.implicit_port, tls=context, source=source)
    else:
        client = RawSMTP.connect(server.starttls_port, source=source)
    try:
        if not implicit:
            client.ehlo()
            client.starttls(context)
        if ehlo or user is not None:
            client.ehlo()
        if user is not None:
            client.login(user.address, user.password)
        yield client
    finally:
        client.close()


def check_stored(
    server: Server,
    queue_id: str,
    *,
    user: str,
    mail_from: str,
    rcpts: Sequence[str],
    subject: str,
    tls_version: str | None = None,
) -> bytes:
    """The message is listed as expected and starts with our Received field; its raw bytes."""
    entry = server.message(queue_id)
    assert entry["account"] == user, entry
    assert entry["mail_from"] == mail_from, entry
    assert entry["rcpt_to"] == list(rcpts), entry
    assert entry["subject"] == subject, entry
    assert entry["status"] == "captured", entry
    assert entry["client_ip"] == HOST, entry
    raw = server.raw(queue_id)
    assert entry["size"] == len(raw), entry
    assert raw.startswith(b"Received: "), raw[:200]
    name, received = header_fields(raw)[0]
    assert name == "Received"
    assert "with ESMTPSA" in received, received
    assert f" id {queue_id}" in received, received
    assert f"(authenticated user {user})" in received, received
    version = re.search(r"version=(TLSv1\.[23]) ", received)
    assert version is not None, received
    if tls_version is not None:
        assert version.group(1) == tls_version, received
    return raw


# ------------------------------------------------------------------ pools of servers

# The accounts of the shared server (see conftest.py). Passwords are long and
# unusual so a search of the log for them cannot hit by chance.
ALICE = User("alice@example.com", "Alice-pw-5Jq2xT9v")
BOB = User("bob@example.org", "Bob-pw-8Wm3zKr4", senders=("@example.org", "bob@alias.test"))
CAROL = User("carol@example.com", "Carol-pw-3Rt6vNp1", disabled=True)
STANDARD_USERS = (ALICE, BOB, CAROL)
# Small limits so the refusal tests need only small messages.
STANDARD_LIMITS: Mapping[str, int | float] = {"max_message_size": 10000, "max_recipients": 3}


class ServerPool:
    """Creates servers under one directory; ``finish`` stops them and reports problems."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: list[Server] = []

    def create(
        self,
        name: str,
        *,
        workers: int = 1,
        limits: Mapping[str, int | float] | None = None,
        sections: Mapping[str, Mapping[str, TomlValue]] | None = None,
        users: Iterable[User] = (),
        start: bool = True,
        proxy_trusted: Sequence[str] | None = None,
        node_name: str | None = None,
    ) -> Server:
        server = Server(
            self.base / name,
            workers=workers,
            limits=limits,
            sections=sections,
            proxy_trusted=proxy_trusted,
            node_name=node_name,
        )
        self.servers.append(server)
        for user in users:
            server.add_user(user)
        if start:
            server.start()
        return server

    def finish(self) -> list[str]:
        """Stop every server (SIGTERM); one line per problem: bad exit, secrets in a log."""
        problems = []
        for server in self.servers:
            status = server.stop()
            if server.scratch_database is not None:
                drop_database(server.scratch_database)
            if status != 0:
                problems.append(
                    f"{server!r}: exit status {status} after SIGTERM (expected 0; None = hung)"
                )
            leaked = server.secrets_in_log()
            if leaked:
                problems.append(f"{server!r}: log holds {len(leaked)} secret(s): {leaked}")
        return problems


def _says_listening(path: Path) -> bool:
    return b"listening on" in path.read_bytes()


def sigterm_right_after_start(
    server: Server, ports: Sequence[int], attempts: int = 3
) -> list[int | str]:
    """Start ``serve`` and send SIGTERM the moment it prints "listening on",
    ``attempts`` times (the windows between forks are short; three tries hit one);
    each outcome is the exit status, or "hung". Stops at the first bad outcome."""
    outcomes: list[int | str] = []
    for attempt in range(attempts):
        out = server.directory / f"early-{attempt}.stdout"
        with open(out, "wb") as stdout:
            process = subprocess.Popen(
                server.command("serve"),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                env=clean_env(),
                cwd=server.directory,
                start_new_session=True,
            )
        try:
            wait_until(functools.partial(_says_listening, out), 10, 0.002, "start")
            process.send_signal(signal.SIGTERM)
            outcomes.append(process.wait(5))
        except subprocess.TimeoutExpired:
            outcomes.append("hung")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        wait_until(lambda: all(port_is_free(p) for p in ports), 10, what="ports to be free")
        if outcomes[-1] != 0:
            break
    return outcomes


def api_call(
    method: str,
    url: str,
    token: str,
    body: Any = None,
    raw: bytes | None = None,
    timeout: float = 20,
) -> tuple[int, Any]:
    """One HTTP API request as a script would make it: (status, the JSON answer or None).
    Error answers must be JSON too."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        text = exc.read()
        assert exc.headers.get("Content-Type") == "application/json", (exc.code, text[:200])
        return exc.code, json.loads(text)
