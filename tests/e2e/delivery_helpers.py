"""Building blocks for the onward-delivery end-to-end tests.

- ``DeliveryServer``: a ``helpers.Server`` that can carry extra environment
  variables (``SSL_CERT_FILE``, to trust a test CA for outbound TLS) and extra
  TOML (the ``[delivery]`` tables, written by ``delivery_toml``, including
  ``[delivery.tls_policy]`` with quoted domain keys and ``[[delivery.routes]]``,
  which ``Server``'s ``sections=`` cannot express).
- ``loopback_address``/``start_sinks``: SMTP sinks on addresses of 127.0.0.0/8
  that no other test uses, so a late retry of one test's message can never land
  in another test's sink.
- CLI wrappers for the queue and the message log (``queue_rows``,
  ``history_lines``, ``wait_status``) and ``find_dsns``/``DSN``: the bounces and
  delay warnings relaygate created about a message, parsed with ``email``.

Every wait is bounded; everything listens and connects on loopback only.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import itertools
import json
import re
import subprocess
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from fakes.smtp_sink import SMTPSink

from .helpers import (
    START_TIMEOUT,
    Server,
    ServerPool,
    User,
    clean_env,
    make_message,
    remember_credentials,
    session,
    wait_until,
)

WAIT = 15.0  # the longest any single delivery step may take in these tests
POLL = 0.1

TomlScalar = bool | int | float | str
TomlData = TomlScalar | Sequence[TomlScalar]


# ------------------------------------------------------------------ config


def toml_value(value: TomlData) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


def _table(header: str, values: Mapping[str, TomlData]) -> list[str]:
    return ["", header] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items()]


def delivery_toml(
    delivery: Mapping[str, TomlData],
    *,
    smarthost: Mapping[str, TomlData] | None = None,
    tls_policy: Mapping[str, str] | None = None,
    routes: Sequence[Mapping[str, TomlData]] = (),
) -> str:
    """The ``[delivery]`` tables as TOML text (keys quoted: "dest.test" is one key)."""
    lines = _table("[delivery]", delivery)
    if smarthost is not None:
        lines += _table("[delivery.smarthost]", smarthost)
    if tls_policy:
        lines += _table("[delivery.tls_policy]", tls_policy)
    for route in routes:
        lines += _table("[[delivery.routes]]", route)
    return "\n".join(lines) + "\n"


class DeliveryServer(Server):
    """A ``Server`` with extra environment variables and extra TOML text."""

    def __init__(
        self,
        directory: Path,
        *,
        extra_toml: str = "",
        env: Mapping[str, str] | None = None,
        workers: int = 1,
    ) -> None:
        self.extra_toml = extra_toml  # write_config (run by Server.__init__) reads it
        self.extra_env = dict(env or {})
        super().__init__(directory, workers=workers)

    def write_config(self) -> None:
        super().write_config()
        if self.extra_toml:
            with self.config_path.open("a", encoding="utf-8") as file:
                file.write(self.extra_toml)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """As ``Server.start``, with ``extra_env`` in the server's environment."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.terminated = False
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                self.command("serve"),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=clean_env(**self.extra_env),
                cwd=self.directory,
                start_new_session=True,  # its own process group: killpg reaches the workers
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise


def new_server(
    pool: ServerPool,
    name: str,
    *,
    extra_toml: str,
    users: Sequence[User] = (),
    env: Mapping[str, str] | None = None,
    dkim: Sequence[Sequence[str]] = (),
    start: bool = True,
) -> DeliveryServer:
    """A server in ``pool`` (stopped and checked at the pool's teardown).

    ``dkim``: argument lists for ``relaygate dkim generate`` run before the start.
    """
    server = DeliveryServer(pool.base / name, extra_toml=extra_toml, env=env)
    pool.servers.append(server)
    for user in users:
        server.add_user(user)
    for args in dkim:
        server.cli("dkim", "generate", *args)
    if start:
        server.start()
    return server


def password_file(directory: Path, user: str, password: str) -> Path:
    """A smarthost password file; the password is remembered as a secret for log checks."""
    remember_credentials(user, password)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{user}.password"
    path.write_text(password + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def ca_bundle(path: Path, cas: Sequence[Path]) -> Path:
    """One PEM file with every CA of ``cas`` (for SSL_CERT_FILE)."""
    path.write_bytes(b"".join(ca.read_bytes() for ca in cas))
    return path


# ------------------------------------------------------------------ sinks

# 127.66.0.0/16: no other test module uses it; one fresh address per sink.
_ADDRESSES = itertools.count(1)


def loopback_address() -> str:
    n = next(_ADDRESSES)
    return f"127.66.{n // 250}.{n % 250 + 1}"


@contextlib.contextmanager
def start_sinks(hosts: Sequence[str], port: int, **options: Any) -> Iterator[list[SMTPSink]]:
    """One started ``SMTPSink(host, port, **options)`` per host; all stopped at the end."""
    sinks: list[SMTPSink] = []
    try:
        for host in hosts:
            sinks.append(SMTPSink(host, port, **options).start())
        yield sinks
    finally:
        for sink in sinks:
            sink.stop()


def max_concurrent_connections(sink: SMTPSink) -> int:
    """The most connections the sink had open at once (from its event log)."""
    open_ids: set[int] = set()
    most = 0
    for event in sink.events:
        if event.kind == "connect":
            open_ids.add(event.connection_id)
            most = max(most, len(open_ids))
        elif event.kind == "disconnect":
            open_ids.discard(event.connection_id)
    return most


def message_ids_by_connection(sink: SMTPSink) -> dict[int, int]:
    """connection id -> how many accepted messages that connection carried."""
    counts: dict[int, int] = {}
    for received in sink.messages:
        counts[received.connection_id] = counts.get(received.connection_id, 0) + 1
    return counts


# ------------------------------------------------------------------ submitting


def submit(
    server: Server,
    user: User,
    rcpts: Sequence[str],
    subject: str,
    *,
    mail_from: str | None = None,
    body: str = "Hello from an end-to-end test.\r\n",
    count: int = 1,
) -> list[str]:
    """``count`` messages over one implicit-TLS, authenticated session; their queue ids."""
    sender = mail_from or user.address
    ids = []
    with session(server, user=user) as client:
        for index in range(count):
            text = subject if count == 1 else f"{subject} #{index + 1}"
            message = make_message(from_addr=sender, to=rcpts, subject=text, body=body)
            ids.append(client.send_mail(sender, rcpts, message))
        client.command("QUIT")
    return ids


def submit_one(
    server: Server,
    user: User,
    rcpts: Sequence[str],
    subject: str,
    *,
    mail_from: str | None = None,
    body: str = "Hello from an end-to-end test.\r\n",
) -> str:
    [queue_id] = submit(server, user, rcpts, subject, mail_from=mail_from, body=body)
    return queue_id


# ------------------------------------------------------------------ queue and message log


def queue_rows(server: Server) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], server.quick_json("queue", "list", "--json"))


def queue_rows_for(server: Server, queue_id: str) -> list[dict[str, Any]]:
    return [row for row in queue_rows(server) if row["id"] == queue_id]


def status_of(server: Server, queue_id: str) -> str:
    return str(server.message(queue_id)["status"])


def wait_status(
    server: Server, queue_id: str, statuses: str | Collection[str], timeout: float = WAIT
) -> str:
    """Until the message's status is one of ``statuses``; the status reached."""
    wanted = {statuses} if isinstance(statuses, str) else set(statuses)
    seen: list[str] = []

    def reached() -> bool:
        seen.append(status_of(server, queue_id))
        return seen[-1] in wanted

    try:
        wait_until(reached, timeout, POLL, f"{queue_id} to become {sorted(wanted)}")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; last status {seen[-1] if seen else None!r};"
            f" history: {history_lines(server, queue_id)}"
        ) from None
    return seen[-1]


def history_lines(server: Server, queue_id: str) -> list[str]:
    """The ``delivery history:`` lines of ``messages show ID`` (stripped)."""
    out = server.quick_cli("messages", "show", queue_id).stdout.decode()
    lines: list[str] = []
    inside = False
    for line in out.splitlines():
        if line == "delivery history:":
            inside = True
            continue
        if inside:
            if not line.startswith("  "):
                break
            lines.append(line.strip())
    return lines


_HISTORY = re.compile(
    r"^(?P<ts>\S+)\s+(?P<outcome>\S+)\s+<(?P<rcpt>[^>]*)>\s+via (?P<host>\S+)"
    r"\s+tls: (?P<tls>.*?)  (?P<reply>.*)$"
)


@dataclass(frozen=True)
class Attempt:
    outcome: str
    recipient: str
    host: str
    tls: str
    reply: str


def history(server: Server, queue_id: str) -> list[Attempt]:
    """``history_lines`` parsed."""
    attempts = []
    for line in history_lines(server, queue_id):
        match = _HISTORY.match(line)
        assert match is not None, f"history line not understood: {line!r}"
        attempts.append(
            Attempt(match["outcome"], match["rcpt"], match["host"], match["tls"], match["reply"])
        )
    return attempts


def delete_leftovers(server: Server) -> list[str]:
    """``queue delete`` everything still queued; the ids deleted."""
    ids = sorted({str(row["id"]) for row in queue_rows(server)})
    for queue_id in ids:
        server.cli("queue", "delete", queue_id, check=False)
    return ids


# ------------------------------------------------------------------ DSNs


@dataclass(frozen=True)
class DSN:
    """A delivery status notification relaygate stored (captured or queued)."""

    queue_id: str
    entry: dict[str, Any]  # its `messages list` entry
    raw: bytes
    message: email.message.EmailMessage
    note: str  # the text/plain part
    per_message: dict[str, str]  # the first block of message/delivery-status
    recipients: list[dict[str, str]]  # one block per recipient
    headers: str  # the text/rfc822-headers part

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def about(self) -> str:
        """The queue id of the message this DSN is about."""
        return self.per_message.get("x-relaygate-queue-id", "")


def _fields(block: str) -> dict[str, str]:
    """``Name: value`` lines (with continuations) -> {lowercase name: value}."""
    fields: dict[str, str] = {}
    name = ""
    for line in block.splitlines():
        if line[:1] in (" ", "\t") and name:
            fields[name] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            name = key.strip().lower()
            fields[name] = value.strip()
    return fields


def parse_dsn(queue_id: str, entry: dict[str, Any], raw: bytes) -> DSN:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert parsed.get_content_type() == "multipart/report", parsed.get_content_type()
    assert parsed.get_param("report-type") == "delivery-status", parsed["Content-Type"]
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ], [p.get_content_type() for p in parts]
    note = cast(email.message.EmailMessage, parts[0]).get_content()
    # The email package parses message/delivery-status into one Message per
    # block; read the bytes instead, as a DSN reader would see them.
    status_text = _part_text(raw, "message/delivery-status")
    blocks = [b for b in re.split(r"\r?\n\r?\n", status_text.strip()) if b.strip()]
    per_message = _fields(blocks[0]) if blocks else {}
    recipients = [_fields(block) for block in blocks[1:]]
    headers = _part_text(raw, "text/rfc822-headers")
    return DSN(queue_id, entry, raw, parsed, str(note), per_message, recipients, headers)


def _part_text(raw: bytes, content_type: str) -> str:
    """The body of the MIME part with ``content_type`` (first one), as text."""
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    match = re.search(
        rf"^Content-Type: {re.escape(content_type)}.*?\n\n(?P<body>.*?)\n--",
        text,
        re.MULTILINE | re.DOTALL | re.IGNORECASE,
    )
    assert match is not None, f"no {content_type} part in:\n{text}"
    return match["body"]


# (data directory, queue id) -> stored bytes: a stored message never changes.
_RAW: dict[tuple[Path, str], bytes] = {}


def find_dsns(server: Server, about: str) -> list[DSN]:
    """Every DSN in the message log that reports on message ``about``."""
    found = []
    for entry in server.messages():
        if entry["mail_from"] != "" or entry["id"] == about:
            continue
        key = (server.data_dir, str(entry["id"]))
        if key not in _RAW:
            _RAW[key] = server.raw(key[1])
        raw = _RAW[key]
        if f"X-Relaygate-Queue-ID: {about}".encode() not in raw:
            continue
        found.append(parse_dsn(str(entry["id"]), entry, raw))
    return found


def wait_dsns(server: Server, about: str, count: int, timeout: float = WAIT) -> list[DSN]:
    """Until at least ``count`` DSNs about ``about`` exist; all of them."""
    found: list[DSN] = []

    def enough() -> bool:
        found[:] = find_dsns(server, about)
        return len(found) >= count

    wait_until(enough, timeout, 0.2, f"{count} DSN(s) about {about}")
    return found


# ------------------------------------------------------------------ DKIM


def dkim_txt_records(server: Server, domain: str) -> dict[str, str]:
    """``relaygate dkim show DOMAIN`` -> {dns name without final dot: joined TXT value}."""
    records: dict[str, str] = {}
    for line in server.cli("dkim", "show", domain).stdout.splitlines():
        if " IN TXT " not in line:
            continue
        name, _, rest = line.partition(" IN TXT ")
        records[name.rstrip(".").lower()] = "".join(re.findall(r'"([^"]*)"', rest))
    return records
