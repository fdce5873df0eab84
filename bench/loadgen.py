#!/usr/bin/env python3
"""Bounded SMTP submission load generator for relaygate's benchmark.

Each connection does: connect -> (implicit TLS | 220 banner -> EHLO -> STARTTLS
-> TLS) -> EHLO -> AUTH PLAIN with an initial response -> M transactions ->
QUIT.  A transaction sends MAIL FROM, RCPT TO and DATA in one write when the
server announces PIPELINING (one at a time otherwise), then the dot-stuffed
message and the final ``CRLF.CRLF``.  A message counts as accepted only when
the reply after the data is 250; anything else is a failure, keyed by the step
and the reply code (or the kind of I/O error).

Safety bounds: only loopback targets; ``-n`` caps the number of connections,
``--duration`` stops new connections, every step has ``--timeout`` and the
whole run ``--hard-timeout`` (after which everything in flight is cancelled and,
should the event loop be stuck, the process exits on its own).

Standard library only (uvloop is used when importable).  Prints a summary, or
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.utils
import functools
import ipaddress
import json
import math
import os
import random
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CRLF = b"\r\n"
MAX_REPLY_LINES = 100
MAX_LINE = 8192

DEFAULT_USER_PATTERN = "user{i}@example.test"
DEFAULT_PASSWORD_PATTERN = "pw-user{i}-bench"
DEFAULT_RCPT_PATTERN = "rcpt{k}@remote.example.net"


# ---------------------------------------------------------------- pure helpers


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def summarize_latencies(values_s: Iterable[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of durations in seconds, given in ms."""
    ordered = sorted(values_s)
    n = len(ordered)
    mean = sum(ordered) / n if n else 0.0
    return {
        "n": n,
        "p50_ms": round(percentile(ordered, 50) * 1000, 3),
        "p90_ms": round(percentile(ordered, 90) * 1000, 3),
        "p99_ms": round(percentile(ordered, 99) * 1000, 3),
        "max_ms": round((ordered[-1] if ordered else 0.0) * 1000, 3),
        "mean_ms": round(mean * 1000, 3),
    }


def dot_stuff(data: bytes) -> bytes:
    """Double every '.' that starts a line (RFC 5321 4.5.2); data uses CRLF."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


_TEXT = (
    "the quarterly report is attached please review the figures before our meeting on "
    "thursday we moved the deadline because the supplier confirmed delivery of the new "
    "parts next week let me know if the numbers for the northern region look right to "
    "you and whether we should invite the finance team as well thanks again for your "
    "help with the migration the servers were restarted overnight without any problem"
)
_WORDS = tuple(_TEXT.split())


@functools.lru_cache(maxsize=64)
def make_body(length: int, seed: int = 5321) -> bytes:
    """Plain-text body of exactly ``length`` bytes: CRLF lines of at most 78 chars.

    Every 25th line starts with a '.' so that dot-stuffing is exercised.  The
    result always ends with CRLF (a body shorter than 2 bytes is just CRLF).
    """
    rng = random.Random(seed)
    lines: list[bytes] = []
    total = 0
    number = 0
    while total < length:
        number += 1
        words: list[str] = []
        width = 0
        target = rng.randint(40, 72)
        while width < target:
            word = rng.choice(_WORDS)
            words.append(word)
            width += len(word) + 1
        text = " ".join(words)
        if number % 25 == 0:
            text = "." + text
        if number % 9 == 0:
            text = text.capitalize() + "."
        line = text.encode("ascii") + CRLF
        lines.append(line)
        total += len(line)
    body = b"".join(lines)
    if length < 2:
        return CRLF
    # Cut to size, keeping the CRLF at the end and no lone CR before it.
    cut = body[: length - 2]
    if cut.endswith(b"\r"):
        cut = cut[:-1] + b"x"
    return cut + CRLF


def make_headers(sender: str, rcpt: str, subject: str, message_id: str, date: str) -> bytes:
    return (
        f"From: Bench Sender <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode("ascii")


def make_message(
    sender: str, rcpt: str, size: int, subject: str, message_id: str, date: str
) -> bytes:
    """Headers + body of ``size`` bytes in total (more if the headers alone are bigger)."""
    headers = make_headers(sender, rcpt, subject, message_id, date)
    return headers + make_body(max(size - len(headers), 2))


def data_payload(message: bytes) -> bytes:
    """What is sent after the 354: the dot-stuffed message then '.' CRLF."""
    if not message.endswith(CRLF):
        message += CRLF
    return dot_stuff(message) + b".\r\n"


def load_users(
    users_file: Path | None, user_pattern: str, password_pattern: str, count: int, start: int = 1
) -> list[tuple[str, str]]:
    """Users from a file of ``address:password`` lines, or from the two patterns."""
    if users_file is not None:
        result: list[tuple[str, str]] = []
        for raw in users_file.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            address, sep, password = line.partition(":")
            if not sep or not address:
                raise ValueError(f"{users_file}: bad line (want address:password): {line!r}")
            result.append((address, password))
        if not result:
            raise ValueError(f"{users_file}: no users")
        return result
    return [
        (user_pattern.format(i=i), password_pattern.format(i=i))
        for i in range(start, start + count)
    ]


def split_evenly(total: int, parts: int, index: int) -> int:
    """Share ``index`` (0-based) of ``total`` split into ``parts`` near-equal integers."""
    return total // parts + (1 if index < total % parts else 0)


def loopback_addresses(host: str, port: int) -> list[str]:
    """Resolve ``host``; raise ValueError unless every address is loopback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise ValueError(f"{host!r} resolves to nothing")
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise ValueError(f"refusing non-loopback target {host!r} ({address})")
    return addresses


def cpu_seconds_used() -> float:
    """CPU time (user + system) of this process and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def client_tls_context() -> ssl.SSLContext:
    """No certificate verification (the servers use self-signed certificates); TLS >= 1.2."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# ---------------------------------------------------------------- the load


class StepFailed(Exception):
    """A step got an unexpected reply or an I/O error; ``reason`` is 'step:code'."""

    def __init__(self, step: str, what: str, detail: str = "") -> None:
        super().__init__(f"{step}:{what} {detail}".strip())
        self.step = step
        self.reason = f"{step}:{what}"
        self.detail = detail
        self.code = int(what) if what.isdigit() else None


@dataclass
class Settings:
    address: str
    port: int
    mode: str
    concurrency: int
    messages: int
    max_connections: int
    duration: float
    timeout: float
    hard_timeout: float
    size: int
    users: list[tuple[str, str]]
    rcpt_pattern: str
    ehlo_name: str
    pipelining: bool
    index_offset: int = 0  # this process's share: connection i is global i*stride+offset
    index_stride: int = 1


@dataclass
class Results:
    accepted: int = 0
    attempted: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    message_latencies: list[float] = field(default_factory=list)
    connection_latencies: list[float] = field(default_factory=list)
    connections_started: int = 0
    connections_ok: int = 0
    tls_versions: Counter[str] = field(default_factory=Counter)
    pipelined: int = 0
    duration_s: float = 0.0
    hard_timeout_hit: bool = False
    first_errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "attempted": self.attempted,
            "failures": dict(self.failures),
            "message_latencies": [round(v, 6) for v in self.message_latencies],
            "connection_latencies": [round(v, 6) for v in self.connection_latencies],
            "connections_started": self.connections_started,
            "connections_ok": self.connections_ok,
            "tls_versions": dict(self.tls_versions),
            "pipelined": self.pipelined,
            "duration_s": self.duration_s,
            "hard_timeout_hit": self.hard_timeout_hit,
            "first_errors": self.first_errors,
        }

    def merge_json(self, data: dict[str, Any]) -> None:
        self.accepted += int(data["accepted"])
        self.attempted += int(data["attempted"])
        self.failures.update({str(k): int(v) for k, v in data["failures"].items()})
        self.message_latencies.extend(float(v) for v in data["message_latencies"])
        self.connection_latencies.extend(float(v) for v in data["connection_latencies"])
        self.connections_started += int(data["connections_started"])
        self.connections_ok += int(data["connections_ok"])
        self.tls_versions.update({str(k): int(v) for k, v in data["tls_versions"].items()})
        self.pipelined += int(data["pipelined"])
        self.duration_s = max(self.duration_s, float(data["duration_s"]))
        self.hard_timeout_hit = self.hard_timeout_hit or bool(data["hard_timeout_hit"])
        for error in data["first_errors"]:
            if len(self.first_errors) < 10:
                self.first_errors.append(str(error))


class Session:
    """One SMTP connection's reader/writer with step-tagged, time-bounded I/O."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def reply(self, step: str) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: (code, texts)."""
        texts: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(MAX_REPLY_LINES):
                    raw = await self.reader.readline()
                    if not raw.endswith(b"\n"):
                        raise StepFailed(step, "eof", "connection closed by server")
                    if len(raw) > MAX_LINE:
                        raise StepFailed(step, "bad-reply", "line too long")
                    line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                    if len(line) < 3 or not line[:3].isdigit():
                        raise StepFailed(step, "bad-reply", repr(line[:80]))
                    texts.append(line[4:])
                    if len(line) == 3 or line[3] == " ":
                        return int(line[:3]), texts
                    if line[3] != "-":
                        raise StepFailed(step, "bad-reply", repr(line[:80]))
        except TimeoutError:
            raise StepFailed(step, "timeout", f"no reply within {self.timeout:g} s") from None
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            raise StepFailed(step, type(exc).__name__, str(exc)) from None
        raise StepFailed(step, "bad-reply", "too many reply lines")

    async def send(self, step: str, data: bytes) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError:
            raise StepFailed(step, "timeout", "write stalled") from None
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            raise StepFailed(step, type(exc).__name__, str(exc)) from None

    async def expect(self, step: str, *codes: int) -> list[str]:
        code, texts = await self.reply(step)
        if code not in codes:
            raise StepFailed(step, str(code), " / ".join(texts)[:200])
        return texts

    async def command(self, step: str, line: str, *codes: int) -> list[str]:
        await self.send(step, line.encode("utf-8") + CRLF)
        return await self.expect(step, *codes)


def ehlo_keywords(texts: list[str]) -> set[str]:
    """Extension keywords from an EHLO reply (first line is the greeting)."""
    return {text.split(" ", 1)[0].upper() for text in texts[1:] if text}


class LoadGenerator:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.results = Results()
        self.tls = client_tls_context()
        self.next_local = 0
        self.deadline = 0.0
        self.seq = 0

    def _take_index(self) -> int | None:
        """The next global connection index, or None once the count or time is up."""
        if self.next_local >= self.s.max_connections:
            return None
        if self.s.duration > 0 and time.monotonic() >= self.deadline:
            return None
        local = self.next_local
        self.next_local += 1
        return local * self.s.index_stride + self.s.index_offset

    def _fail(self, failure: StepFailed) -> None:
        self.results.failures[failure.reason] += 1
        if len(self.results.first_errors) < 10:
            self.results.first_errors.append(str(failure))

    async def _open(self, step: str, server_tls: bool) -> Session:
        try:
            async with asyncio.timeout(self.s.timeout):
                reader, writer = await asyncio.open_connection(
                    self.s.address,
                    self.s.port,
                    ssl=self.tls if server_tls else None,
                    limit=MAX_LINE * 4,
                )
        except TimeoutError:
            raise StepFailed(step, "timeout", "connect/TLS took too long") from None
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            raise StepFailed(step, type(exc).__name__, str(exc)) from None
        return Session(reader, writer, self.s.timeout)

    async def _start_tls(self, session: Session) -> None:
        try:
            async with asyncio.timeout(self.s.timeout):
                await session.writer.start_tls(self.tls)
        except TimeoutError:
            raise StepFailed("tls", "timeout", "handshake took too long") from None
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            raise StepFailed("tls", type(exc).__name__, str(exc)) from None

    def _note_tls(self, session: Session) -> None:
        ssl_object = session.writer.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            self.results.tls_versions[str(ssl_object.version())] += 1

    async def connection(self, index: int) -> None:
        user, password = self.s.users[index % len(self.s.users)]
        started = time.perf_counter()
        self.results.connections_started += 1
        session: Session | None = None
        try:
            implicit = self.s.mode == "implicit"
            session = await self._open("connect", implicit)
            await session.expect("banner", 220)
            if not implicit:
                keywords = ehlo_keywords(
                    await session.command("ehlo", f"EHLO {self.s.ehlo_name}", 250)
                )
                if "STARTTLS" not in keywords:
                    raise StepFailed("ehlo", "no-starttls", "STARTTLS not announced")
                await session.command("starttls", "STARTTLS", 220)
                await self._start_tls(session)
            self._note_tls(session)
            keywords = ehlo_keywords(
                await session.command("ehlo2", f"EHLO {self.s.ehlo_name}", 250)
            )
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            await session.command("auth", f"AUTH PLAIN {token}", 235)
            pipelining = self.s.pipelining and "PIPELINING" in keywords
            for number in range(self.s.messages):
                if not await self.transaction(session, user, index, number, pipelining):
                    break
            else:
                await session.command("quit", "QUIT", 221)
                self.results.connections_ok += 1
                self.results.connection_latencies.append(time.perf_counter() - started)
        except StepFailed as failure:
            self._fail(failure)
            if failure.step == "connect":
                await asyncio.sleep(0.01)  # no tight reconnect loop against a dead port
        finally:
            if session is not None:
                session.writer.close()
                try:
                    async with asyncio.timeout(2):
                        await session.writer.wait_closed()
                except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
                    pass

    async def transaction(
        self, session: Session, user: str, index: int, number: int, pipelining: bool
    ) -> bool:
        """One message; True to go on with the next one on this connection."""
        self.seq += 1
        rcpt = self.s.rcpt_pattern.format(k=self.seq % 1000, i=index, m=number)
        message = make_message(
            user,
            rcpt,
            self.s.size,
            f"Bench message {index}-{number}",
            f"{time.time_ns()}.{os.getpid()}.{index}.{number}@loadgen.bench.test",
            email.utils.formatdate(usegmt=True),
        )
        payload = data_payload(message)
        mail = f"MAIL FROM:<{user}>\r\n".encode()
        rcpt_line = f"RCPT TO:<{rcpt}>\r\n".encode()
        self.results.attempted += 1
        started = time.perf_counter()
        try:
            if pipelining:
                self.results.pipelined += 1
                await session.send("mail", mail + rcpt_line + b"DATA\r\n")
                mail_code, mail_text = await session.reply("mail")
                rcpt_code, rcpt_text = await session.reply("rcpt")
                data_code, data_text = await session.reply("data")
                if data_code == 354 and (mail_code != 250 or rcpt_code not in (250, 251)):
                    # The server took DATA although the envelope failed: send an
                    # empty message to get back in step, then report the envelope.
                    await session.send("data", b".\r\n")
                    await session.reply("data")
                if mail_code != 250:
                    raise StepFailed("mail", str(mail_code), " ".join(mail_text)[:200])
                if rcpt_code not in (250, 251):
                    raise StepFailed("rcpt", str(rcpt_code), " ".join(rcpt_text)[:200])
                if data_code != 354:
                    raise StepFailed("data", str(data_code), " ".join(data_text)[:200])
            else:
                await session.send("mail", mail)
                await session.expect("mail", 250)
                await session.send("rcpt", rcpt_line)
                await session.expect("rcpt", 250, 251)
                await session.command("data", "DATA", 354)
            await session.send("eod", payload)
            await session.expect("eod", 250)
        except StepFailed as failure:
            self._fail(failure)
            if failure.code is None:
                return False  # I/O error or garbled reply: this connection is done
            try:
                await session.command("rset", "RSET", 250)
            except StepFailed as rset_failure:
                self._fail(rset_failure)
                return False
            return True
        self.results.accepted += 1
        self.results.message_latencies.append(time.perf_counter() - started)
        return True

    async def _worker(self) -> None:
        while (index := self._take_index()) is not None:
            await self.connection(index)

    async def run(self) -> Results:
        started = time.monotonic()
        self.deadline = started + self.s.duration
        workers = [asyncio.create_task(self._worker()) for _ in range(self.s.concurrency)]
        try:
            async with asyncio.timeout(self.s.hard_timeout):
                await asyncio.gather(*workers)
        except TimeoutError:
            self.results.hard_timeout_hit = True
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        self.results.duration_s = round(time.monotonic() - started, 4)
        return self.results


# ---------------------------------------------------------------- running it


def _run_loop(settings: Settings, use_uvloop: bool) -> tuple[Results, bool]:
    """Run the load in this process; returns the results and whether uvloop was used."""
    loop_factory = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        results = runner.run(LoadGenerator(settings).run())
    return results, loop_factory is not None


def _arm_backstop(seconds: float) -> None:
    """Exit the process if it is still alive well after the hard timeout."""

    def fire() -> None:
        sys.stderr.write(f"loadgen: still running {seconds:.0f} s after start; exiting\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loadgen.py",
        description="Bounded load generator for authenticated SMTP submission (loopback only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address or name")
    parser.add_argument("--port", type=int, default=2587)
    parser.add_argument("--mode", choices=("starttls", "implicit"), default="starttls")
    parser.add_argument("-c", "--concurrency", type=int, default=20, help="parallel connections")
    parser.add_argument(
        "-m", "--messages", type=int, default=50, help="messages per connection (default 50)"
    )
    parser.add_argument(
        "-n", "--connections", type=int, default=100_000, help="total connections at most"
    )
    parser.add_argument(
        "--duration", type=float, default=15.0, help="seconds after which no connection starts"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-step timeout, seconds")
    parser.add_argument(
        "--hard-timeout",
        type=float,
        default=0.0,
        help="overall limit in seconds (default: duration + 2 x timeout + 30, at most 3600)",
    )
    parser.add_argument(
        "--size", type=int, default=4096, help="message size in bytes (headers + body)"
    )
    parser.add_argument("--users-file", type=Path, help="lines address:password")
    parser.add_argument("--user-pattern", default=DEFAULT_USER_PATTERN)
    parser.add_argument("--password-pattern", default=DEFAULT_PASSWORD_PATTERN)
    parser.add_argument("--user-count", type=int, default=20)
    parser.add_argument("--user-start", type=int, default=1, help="first i of the patterns")
    parser.add_argument(
        "--rcpt-pattern",
        default=DEFAULT_RCPT_PATTERN,
        help="recipient; keys k (0..999), i (connection), m (message number)",
    )
    parser.add_argument("--ehlo-name", default="loadgen.bench.test")
    parser.add_argument("--no-pipelining", action="store_true", help="one command per write")
    parser.add_argument("--procs", type=int, default=1, help="client processes sharing the load")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("concurrency", "messages", "connections", "procs", "user_count"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration < 0 or args.timeout <= 0 or args.hard_timeout < 0:
        parser.error("--duration, --timeout and --hard-timeout must not be negative")
    if args.duration == 0 and args.connections > 1_000_000:
        parser.error("without --duration, -n must be at most 1000000")
    if args.procs > args.concurrency:
        parser.error("--procs must not exceed --concurrency")
    if not 0 < args.port < 65536:
        parser.error("--port must be 1..65535")


def _hard_timeout(args: argparse.Namespace) -> float:
    if args.hard_timeout > 0:
        return float(args.hard_timeout)
    return float(min(args.duration + 2 * args.timeout + 30, 3600.0))


def _child_command(args: argparse.Namespace, index: int) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve())]
    for flag, value in (
        ("--host", args.host),
        ("--port", args.port),
        ("--mode", args.mode),
        ("-c", split_evenly(args.concurrency, args.procs, index)),
        ("-m", args.messages),
        ("-n", max(split_evenly(args.connections, args.procs, index), 1)),
        ("--duration", args.duration),
        ("--timeout", args.timeout),
        ("--hard-timeout", _hard_timeout(args)),
        ("--size", args.size),
        ("--user-pattern", args.user_pattern),
        ("--password-pattern", args.password_pattern),
        ("--user-count", args.user_count),
        ("--user-start", args.user_start),
        ("--rcpt-pattern", args.rcpt_pattern),
        ("--ehlo-name", args.ehlo_name),
        ("--procs", args.procs),
        ("--child", index),
    ):
        command += [flag, str(value)]
    if args.users_file is not None:
        command += ["--users-file", str(args.users_file)]
    if args.no_pipelining:
        command.append("--no-pipelining")
    if args.no_uvloop:
        command.append("--no-uvloop")
    return command


def _run_children(args: argparse.Namespace) -> tuple[Results, bool]:
    """Start --procs copies of this script, each with its share, and merge what they print."""
    children = [
        subprocess.Popen(_child_command(args, k), stdout=subprocess.PIPE, text=True)
        for k in range(args.procs)
    ]
    merged = Results()
    used_uvloop = True
    limit = time.monotonic() + _hard_timeout(args) + 30
    for child in children:
        try:
            out, _ = child.communicate(timeout=max(limit - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            merged.failures["process:timeout"] += 1
            merged.hard_timeout_hit = True
            continue
        if child.returncode != 0 or not out.strip():
            merged.failures[f"process:exit-{child.returncode}"] += 1
            continue
        data = json.loads(out)
        merged.merge_json(data)
        used_uvloop = used_uvloop and bool(data["uvloop"])
    return merged, used_uvloop


def summary(
    args: argparse.Namespace, results: Results, used_uvloop: bool, cpu_s: float
) -> dict[str, Any]:
    failed_total = sum(results.failures.values())
    duration = results.duration_s
    return {
        "target": f"{args.host}:{args.port}",
        "mode": args.mode,
        "concurrency": args.concurrency,
        "messages_per_connection": args.messages,
        "size": args.size,
        "procs": args.procs,
        "uvloop": used_uvloop,
        "accepted": results.accepted,
        "attempted": results.attempted,
        "failed": dict(sorted(results.failures.items())),
        "failed_total": failed_total,
        "connections": {
            "started": results.connections_started,
            "ok": results.connections_ok,
        },
        "pipelined_transactions": results.pipelined,
        "tls_versions": dict(results.tls_versions),
        "duration_s": duration,
        "msgs_per_s": round(results.accepted / duration, 2) if duration > 0 else 0.0,
        "latency": {
            "message": summarize_latencies(results.message_latencies),
            "connection": summarize_latencies(results.connection_latencies),
        },
        "client_cpu_s": round(cpu_s, 3),
        "hard_timeout_hit": results.hard_timeout_hit,
        "first_errors": results.first_errors,
    }


def print_text(report: dict[str, Any]) -> None:
    message = report["latency"]["message"]
    connection = report["latency"]["connection"]
    print(f"target      {report['target']} ({report['mode']}), uvloop={report['uvloop']}")
    print(
        f"load        -c {report['concurrency']} -m {report['messages_per_connection']}"
        f" --size {report['size']} --procs {report['procs']}"
    )
    print(
        f"accepted    {report['accepted']} of {report['attempted']} in {report['duration_s']} s"
        f" = {report['msgs_per_s']} msg/s"
    )
    print(f"connections {report['connections']['ok']} ok of {report['connections']['started']}")
    print(
        f"message     p50 {message['p50_ms']} ms  p90 {message['p90_ms']} ms"
        f"  p99 {message['p99_ms']} ms  max {message['max_ms']} ms"
    )
    print(
        f"connection  p50 {connection['p50_ms']} ms  p90 {connection['p90_ms']} ms"
        f"  p99 {connection['p99_ms']} ms  max {connection['max_ms']} ms"
    )
    print(f"client CPU  {report['client_cpu_s']} s")
    for reason, count in report["failed"].items():
        print(f"failed      {reason}: {count}")
    for error in report["first_errors"][:5]:
        print(f"  e.g.      {error}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        addresses = loopback_addresses(args.host, args.port)
        users = load_users(
            args.users_file,
            args.user_pattern,
            args.password_pattern,
            args.user_count,
            args.user_start,
        )
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    hard_timeout = _hard_timeout(args)
    _arm_backstop(hard_timeout + 60)
    cpu_before = cpu_seconds_used()

    if args.procs > 1 and args.child < 0:
        results, used_uvloop = _run_children(args)
    else:
        settings = Settings(
            address=addresses[0],
            port=args.port,
            mode=args.mode,
            concurrency=args.concurrency,
            messages=args.messages,
            max_connections=args.connections,
            duration=args.duration,
            timeout=args.timeout,
            hard_timeout=hard_timeout,
            size=args.size,
            users=users,
            rcpt_pattern=args.rcpt_pattern,
            ehlo_name=args.ehlo_name,
            pipelining=not args.no_pipelining,
            index_offset=max(args.child, 0),
            index_stride=args.procs if args.child >= 0 else 1,
        )
        results, used_uvloop = _run_loop(settings, not args.no_uvloop)

    if args.child >= 0:
        data = results.to_json()
        data["uvloop"] = used_uvloop
        print(json.dumps(data))
        return 0
    report = summary(args, results, used_uvloop, cpu_seconds_used() - cpu_before)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_text(report)
    return 0 if results.accepted > 0 and not results.hard_timeout_hit else 1


if __name__ == "__main__":
    sys.exit(main())
