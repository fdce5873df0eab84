#!/usr/bin/env python3
"""Onward delivery throughput: messages per second relaygate delivers to a local
SMTP sink, reusing its connections.

The bench runs, all on loopback:

* a receiving SMTP sink (this file, ``--sink-child``) in its own process, so its
  CPU is measured apart: asyncio, EHLO with PIPELINING, accepts every message,
  counts messages, recipients, connections and Message-IDs (duplicates), on
  127.0.0.2 and a free port;
* relaygate from a temporary configuration: one STARTTLS listener, ``[delivery]
  mode = "smarthost"`` to the sink with ``tls = "none"``, ``per_destination``
  from ``--per-destination``, no sending limits, a fast password hash, one user;
* ``bench/loadgen.py`` (``-c 20 -m 50``, 4 KB messages) for the submissions.

Phase 1 (backlog drain): with the delivery process running, submit
``--messages`` messages and measure from the first submission until the sink
has all of them: delivered msg/s, connections the sink saw (messages per
connection), CPU per delivered message of the delivery process alone (the
supervisor's child that holds no listening socket), of the whole server and of
the sink.  Phase 2 (steady state): submit for ``--duration`` seconds, report the
delivered msg/s over that window and the queue length when it ends
(``relaygate queue list --json``), then wait for the queue to drain.

At the end the sink's count is checked against the accepted submissions
(nothing lost, no Message-ID twice), the queue must be empty, every message must
be "delivered" in ``relaygate messages list`` and the log must have no
deferral, failure or error.  ``--capture-baseline`` also submits the phase 1 load
to a capture-mode relaygate, for the submission-only CPU per message.

Prints a table and writes ``bench/results/delivery-<timestamp>.json``.
relaygate and the sink are stopped (SIGTERM / quit) in a ``finally`` block.
Usage: ``.venv/bin/python bench/delivery_bench.py [--messages 5000] [--duration 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import math
import os
import platform
import re
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from run import (
    CLOCK_TICKS,
    LOADGEN,
    PASSWORD_PATTERN,
    RESULTS_DIR,
    USER_PATTERN,
    BenchError,
    RelaygateServer,
    ScratchPostgres,
    background_load,
    cell,
    default_python,
    interrupts_as_errors,
    machine_busy_seconds,
    parse_proc_stat,
    port_accepts,
    read_processes,
    render_table,
    tree_cpu_seconds,
)

SINK_HOST = "127.0.0.2"
CONCURRENCY = 20  # loadgen connections
PER_CONNECTION = 50  # loadgen messages per connection
POLL = 0.1  # seconds between looks at the sink's counters
CRLF = b"\r\n"
MAX_LINE = 4096
MAX_MESSAGE = 64 * 1024 * 1024
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*([^\r\n]*)")


# ================================================================ the sink (child process)


@dataclass
class SinkState:
    """What the sink saw; touched only by the sink's event loop thread."""

    connections: int = 0
    open_now: int = 0
    open_peak: int = 0
    messages: int = 0
    recipients: int = 0
    octets: int = 0
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    without_message_id: int = 0
    ids: set[bytes] = field(default_factory=set)
    arrivals: array[float] = field(default_factory=lambda: array("d"))
    per_connection: list[int] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)
    pipelined_reads: int = 0  # reads that carried more than one command
    problems: Counter[str] = field(default_factory=Counter)
    protocols: set[SinkProtocol] = field(default_factory=set)

    def record_message(self, message: bytes) -> None:
        self.messages += 1
        self.octets += len(message)
        self.arrivals.append(time.monotonic())
        header_end = message.find(b"\r\n\r\n")
        match = _MESSAGE_ID.search(message, 0, header_end if header_end >= 0 else len(message))
        if match is None or not match.group(1).strip():
            self.without_message_id += 1
            return
        message_id = match.group(1).strip()
        if message_id in self.ids:
            self.duplicates += 1
            if len(self.duplicate_examples) < 10:
                self.duplicate_examples.append(message_id.decode("ascii", "replace"))
        else:
            self.ids.add(message_id)

    def snapshot(self, marks: Sequence[int]) -> dict[str, Any]:
        """Counters now, and the arrival time (monotonic) of the k-th message for each mark."""
        per_connection = sorted(self.per_connection)
        return {
            "now": time.monotonic(),
            "connections": self.connections,
            "open_now": self.open_now,
            "open_peak": self.open_peak,
            "messages": self.messages,
            "unique_message_ids": len(self.ids),
            "recipients": self.recipients,
            "bytes": self.octets,
            "duplicates": self.duplicates,
            "duplicate_examples": list(self.duplicate_examples),
            "without_message_id": self.without_message_id,
            "first_arrival": self.arrivals[0] if self.arrivals else None,
            "last_arrival": self.arrivals[-1] if self.arrivals else None,
            "arrival_of": {
                str(k): (self.arrivals[k - 1] if 0 < k <= len(self.arrivals) else None)
                for k in marks
            },
            "closed_connections": len(per_connection),
            "messages_per_closed_connection": {
                "min": per_connection[0] if per_connection else None,
                "median": per_connection[len(per_connection) // 2] if per_connection else None,
                "max": per_connection[-1] if per_connection else None,
            },
            "commands": dict(self.commands),
            "pipelined_reads": self.pipelined_reads,
            "problems": dict(self.problems),
        }


_EHLO_REPLY = (
    b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-SIZE 67108864\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class SinkProtocol(asyncio.Protocol):
    """One SMTP connection: accepts everything, answers pipelined commands in one write."""

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.in_transaction = False
        self.transaction_recipients = 0
        self.messages = 0
        self.last_activity = time.monotonic()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        state = self.state
        state.connections += 1
        state.open_now += 1
        state.open_peak = max(state.open_peak, state.open_now)
        state.protocols.add(self)
        self.transport.write(b"220 sink.bench.test ESMTP bench sink\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        state.open_now -= 1
        state.per_connection.append(self.messages)
        state.protocols.discard(self)
        if exc is not None:
            state.problems[f"connection lost: {type(exc).__name__}"] += 1

    def close(self, reason: str = "") -> None:
        if reason:
            self.state.problems[reason] += 1
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = time.monotonic()
        buffer = self.buffer
        buffer += data
        out: list[bytes] = []
        position = 0
        commands = 0
        while True:
            if self.in_data:
                # The buffer starts with the CRLF that ended the DATA line, so an empty
                # message (".\r\n" right away) is found by the same search.
                end = buffer.find(b"\r\n.\r\n", self.scan_from)
                if end < 0:
                    if len(buffer) > MAX_MESSAGE:
                        out.append(b"552 5.3.4 message too big for the bench sink\r\n")
                        self._flush(out)
                        self.close("message too big")
                        return
                    self.scan_from = max(len(buffer) - 4, 0)
                    self._flush(out)
                    return
                self.state.record_message(bytes(buffer[2 : end + 2]))
                self.messages += 1
                self.in_data = False
                self.in_transaction = False
                self.transaction_recipients = 0
                del buffer[: end + 5]
                position = 0
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            newline = buffer.find(CRLF, position)
            if newline < 0:
                if len(buffer) - position > MAX_LINE:
                    out.append(b"500 5.5.2 line too long\r\n")
                    self._flush(out)
                    self.close("line too long")
                    return
                break
            line = bytes(buffer[position:newline])
            position = newline + 2
            commands += 1
            if commands == 2:
                self.state.pipelined_reads += 1
            verb = line[:4].upper()
            if verb == b"MAIL":
                self.in_transaction = True
                self.transaction_recipients = 0
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if not self.in_transaction:
                    out.append(b"503 5.5.1 MAIL first\r\n")
                else:
                    self.transaction_recipients += 1
                    self.state.recipients += 1
                    out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if not self.transaction_recipients:
                    out.append(b"503 5.5.1 RCPT first\r\n")
                else:
                    out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    self.in_data = True
                    del buffer[: position - 2]
                    position = 0
                    self.scan_from = 0
            elif verb == b"EHLO":
                out.append(_EHLO_REPLY)
            elif verb == b"HELO":
                out.append(b"250 sink.bench.test\r\n")
            elif verb == b"RSET":
                self.in_transaction = False
                self.transaction_recipients = 0
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"NOOP":
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                self.state.commands["QUIT"] += 1
                out.append(b"221 2.0.0 Bye\r\n")
                self._flush(out)
                self.close()
                return
            else:
                self.state.problems["unknown command"] += 1
                out.append(b"502 5.5.2 command not implemented\r\n")
                continue
            self.state.commands[verb.decode("ascii")] += 1
        if position:
            del buffer[:position]
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))
        out.clear()


async def _sweep_idle(state: SinkState, idle_timeout: float) -> None:
    while True:
        await asyncio.sleep(min(5.0, idle_timeout))
        limit = time.monotonic() - idle_timeout
        for protocol in list(state.protocols):
            if protocol.last_activity < limit:
                protocol.close("idle timeout")


async def _sink(host: str, lifetime: float, idle_timeout: float, used_uvloop: bool) -> int:
    loop = asyncio.get_running_loop()
    state = SinkState()
    stop: asyncio.Future[str] = loop.create_future()
    server = await loop.create_server(
        lambda: SinkProtocol(state), host, 0, backlog=1024, reuse_address=True
    )
    port = int(server.sockets[0].getsockname()[1])
    sweeper = asyncio.create_task(_sweep_idle(state, idle_timeout))

    def request_stop(reason: str) -> None:
        if not stop.done():
            stop.set_result(reason)

    async def snapshot(marks: list[int]) -> dict[str, Any]:
        return state.snapshot(marks)

    def control() -> None:
        """Requests on stdin, one JSON line answered on stdout for each."""
        for raw in sys.stdin:
            words = raw.split()
            if not words:
                continue
            if words[0] == "stats":
                try:
                    marks = [int(word) for word in words[1:]]
                    future = asyncio.run_coroutine_threadsafe(snapshot(marks), loop)
                    answer = future.result(timeout=30)
                except (ValueError, concurrent.futures.TimeoutError, RuntimeError) as exc:
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(answer), flush=True)
            elif words[0] == "quit":
                break
            else:
                print(json.dumps({"error": f"unknown request {words[0]!r}"}), flush=True)
        loop.call_soon_threadsafe(request_stop, "quit")

    threading.Thread(target=control, name="sink-control", daemon=True).start()
    print(
        json.dumps({"ready": True, "port": port, "pid": os.getpid(), "uvloop": used_uvloop}),
        flush=True,
    )
    try:
        reason = await asyncio.wait_for(stop, lifetime)
    except TimeoutError:
        reason = "lifetime"
        print(f"bench sink: exiting after its {lifetime:g} s lifetime", file=sys.stderr)
    sweeper.cancel()
    server.close()
    for protocol in list(state.protocols):
        protocol.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)
    return 0 if reason == "quit" else 3


def sink_child(host: str, lifetime: float, idle_timeout: float, use_uvloop: bool) -> int:
    """The sink process's main: serve until 'quit', stdin's end or ``lifetime`` seconds."""
    if not ipaddress.ip_address(host).is_loopback:
        print(f"bench sink: refusing non-loopback address {host}", file=sys.stderr)
        return 2
    loop_factory = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_sink(host, lifetime, idle_timeout, loop_factory is not None))


# ================================================================ the sink (parent side)


class SinkProcess:
    """Starts the sink child and asks it for its counters over a pipe."""

    def __init__(self, python: str, host: str, lifetime: float, use_uvloop: bool) -> None:
        self.python = python
        self.host = host
        self.lifetime = lifetime
        self.use_uvloop = use_uvloop
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.pid = 0
        self.uvloop = False
        self.tmp = Path(tempfile.mkdtemp(prefix="relaygate-bench-sink-"))
        self.stderr_path = self.tmp / "sink-stderr.log"

    def _read_line(self, timeout: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise BenchError(f"the bench sink did not answer within {timeout:g} s")
        line = self.process.stdout.readline()
        if not line:
            raise BenchError(f"the bench sink exited ({self.process.poll()}): {self.stderr_tail()}")
        return line

    def start(self, timeout: float = 30.0) -> None:
        command = [
            self.python,
            str(Path(__file__).resolve()),
            "--sink-child",
            self.host,
            "--sink-lifetime",
            str(self.lifetime),
        ]
        if not self.use_uvloop:
            command.append("--no-uvloop")
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        ready = json.loads(self._read_line(timeout))
        self.port = int(ready["port"])
        self.pid = int(ready["pid"])
        self.uvloop = bool(ready["uvloop"])
        if not port_accepts(self.port, self.host):
            raise BenchError(f"the bench sink does not accept on {self.host}:{self.port}")

    def stats(self, *marks: int, timeout: float = 30.0) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(" ".join(["stats", *(str(k) for k in marks)]) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self._read_line(timeout))
        if "error" in answer:
            raise BenchError(f"bench sink: {answer['error']}")
        return answer

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid) or 0.0

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-500:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> str:
        """Ask the sink to quit and wait; a problem description or ''."""
        problem = self._stop(timeout)
        if problem:
            return f"{problem} (its stderr: {self.stderr_path})"
        shutil.rmtree(self.tmp, ignore_errors=True)
        return ""

    def _stop(self, timeout: float) -> str:
        if self.process is None:
            return ""
        process, self.process = self.process, None
        try:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.write("quit\n")
                    process.stdin.flush()
                with contextlib.suppress(OSError):
                    process.stdin.close()
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            return f"the bench sink did not exit within {timeout:g} s (killed)"
        finally:
            if process.stdout is not None:
                process.stdout.close()
        return "" if code == 0 else f"the bench sink exited with {code}: {self.stderr_tail()}"


# ================================================================ /proc


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime (+ reaped children) of one process, None once it is gone."""
    try:
        return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())[1] / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def listening_inodes() -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    found: set[str] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.add(target[8:-1])
    except OSError:
        pass
    return found


def find_delivery_pid(supervisor: int) -> tuple[int | None, list[int]]:
    """(the supervisor's child without a listening socket, all its children)."""
    children = sorted(pid for pid, (ppid, _) in read_processes().items() if ppid == supervisor)
    listening = listening_inodes()
    candidates = [pid for pid in children if not socket_inodes(pid) & listening]
    return (candidates[0] if len(candidates) == 1 else None), children


def delivery_pid_from_log(log_file: Path) -> int | None:
    pid = None
    try:
        with log_file.open(errors="replace") as handle:
            for line in handle:
                if "event=delivery.start" in line:
                    match = re.search(r"\bpid=(\d+)", line)
                    if match:
                        pid = int(match.group(1))
    except OSError:
        return None
    return pid


# ================================================================ relaygate


class DeliveryServer(RelaygateServer):
    """relaygate with one STARTTLS listener, delivering to the sink (or capturing)."""

    def __init__(
        self,
        python: str,
        workers: int,
        log_level: str,
        *,
        mode: str,
        sink: tuple[str, int] | None,
        per_destination: int,
        concurrency: int,
        storage_url: str | None = None,
    ) -> None:
        super().__init__(python, workers, 1, log_level, storage_url)
        self.mode = mode
        self.sink = sink
        self.per_destination = per_destination
        self.delivery_concurrency = concurrency

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError("relaygate is not running")
        return self.process.pid

    def write_config(self) -> None:
        delivery = f'[delivery]\nmode = "{self.mode}"\n'
        if self.mode == "smarthost":
            assert self.sink is not None
            delivery += (
                f"per_destination = {self.per_destination}\n"
                f"concurrency = {self.delivery_concurrency}\n"
                "# Short waits: a deferral in a bench is a finding, and the retry must\n"
                "# land before the bench stops waiting for the queue to drain.\n"
                "retry_schedule = [2, 5, 10]\n\n"
                "[delivery.smarthost]\n"
                f'host = "{self.sink[0]}"\n'
                f"port = {self.sink[1]}\n"
                'tls = "none"\n'
            )
        self.config.write_text(
            "# written by bench/delivery_bench.py\n"
            "[server]\n"
            'hostname = "bench.relaygate.test"\n'
            f'data_dir = "{self.tmp / "data"}"\n'
            f"workers = {self.workers}\n\n"
            "[[listeners]]\n"
            f'address = "127.0.0.1:{self.starttls_port}"\n'
            'tls = "starttls"\n\n'
            f"{delivery}\n"
            + (f'[storage]\nurl = "{self.storage_url}"\n\n' if self.storage_url else "")
            + "[sending_limits]\n"
            "messages_per_hour = 0\n"
            "messages_per_day = 0\n"
            "recipients_per_day = 0\n"
            "new_recipients_per_day = 0\n\n"
            "# The bench measures delivery, not password hashing.\n"
            "[password_hash]\n"
            "memory_kib = 8192\n"
            "time_cost = 1\n"
            "parallelism = 1\n\n"
            "[log]\n"
            f'level = "{self.log_level}"\n'
            f'file = "{self.log_file}"\n',
            encoding="utf-8",
        )

    def listening_ports(self) -> list[int]:
        return [self.starttls_port]  # this config has no implicit-TLS listener

    def cli_json(self, *args: str) -> Any:
        done = subprocess.run(
            self.cli(*args), capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise BenchError(
                f"relaygate {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()[-300:]}"
            )
        return json.loads(done.stdout)

    def queue_length(self) -> int:
        return len(self.cli_json("queue", "list", "--json"))

    def message_statuses(self, limit: int) -> dict[str, int]:
        rows = self.cli_json("messages", "list", "--json", "--limit", str(max(limit, 1)))
        return dict(Counter(str(row["status"]) for row in rows))

    def log_events(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        try:
            with self.log_file.open(errors="replace") as handle:
                for line in handle:
                    match = re.search(r"\bevent=(\S+)", line)
                    if match:
                        counts[match.group(1)] += 1
        except OSError:
            pass
        return dict(sorted(counts.items()))

    def log_lines(self, event: str, limit: int = 5) -> list[str]:
        found: list[str] = []
        with contextlib.suppress(OSError), self.log_file.open(errors="replace") as handle:
            for line in handle:
                if f"event={event} " in line or line.rstrip().endswith(f"event={event}"):
                    found.append(line.rstrip()[:400])
                    if len(found) >= limit:
                        break
        return found


# ================================================================ load


def loadgen_command(
    args: argparse.Namespace,
    port: int,
    *,
    connections: int,
    duration: float,
    hard_timeout: float,
) -> list[str]:
    command = [
        args.python,
        str(LOADGEN),
        "--json",
        "--port",
        str(port),
        "--mode",
        "starttls",
        "-c",
        str(CONCURRENCY),
        "-m",
        str(PER_CONNECTION),
        "-n",
        str(connections),
        "--duration",
        str(duration),
        "--hard-timeout",
        str(hard_timeout),
        "--size",
        str(args.size),
        "--user-pattern",
        USER_PATTERN,
        "--password-pattern",
        PASSWORD_PATTERN,
        "--user-count",
        "1",
    ]
    if args.no_uvloop:
        command.append("--no-uvloop")
    return command


class Loadgen:
    """loadgen.py in a subprocess, its JSON report and stderr in files of ``workdir``."""

    def __init__(self, command: list[str], hard_timeout: float, workdir: Path, name: str) -> None:
        self.command = command
        self.hard_timeout = hard_timeout
        self.output = workdir / f"loadgen-{name}.json"
        self.errors = workdir / f"loadgen-{name}.stderr"
        self.started = time.monotonic()
        self.ended: float | None = None
        with self.output.open("wb") as stdout, self.errors.open("wb") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )

    def done(self) -> bool:
        if self.ended is None and self.process.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is not None

    def overdue(self) -> bool:
        return time.monotonic() - self.started > self.hard_timeout + 90

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.ended is None:
            self.ended = time.monotonic()

    def report(self) -> dict[str, Any]:
        self.done()
        try:
            data: dict[str, Any] = json.loads(self.output.read_text(errors="replace"))
        except (OSError, json.JSONDecodeError):
            try:
                errors = self.errors.read_text(errors="replace")[-800:]
            except OSError:
                errors = ""
            raise BenchError(f"loadgen exit {self.process.returncode}, no JSON: {errors}") from None
        return data

    def first_submission(self) -> float:
        """When the load began: its exit minus the run time it reports (no interpreter start)."""
        assert self.ended is not None
        reported = float(self.report().get("duration_s", 0.0))
        return max(self.started, self.ended - reported) if reported > 0 else self.started


# ================================================================ measuring


@dataclass
class CPUReading:
    delivery: float | None
    server_tree: float
    sink: float
    machine: float
    database: float  # PostgreSQL's processes (0 on SQLite: it runs inside relaygate)

    @classmethod
    def take(cls, ctx: Context) -> CPUReading:
        delivery_pid = ctx.delivery_pid
        return cls(
            delivery=process_cpu_seconds(delivery_pid) if delivery_pid is not None else None,
            server_tree=tree_cpu_seconds([ctx.server.pid]),
            sink=ctx.sink.cpu_seconds(),
            machine=machine_busy_seconds(),
            database=tree_cpu_seconds(ctx.database_roots) if ctx.database_roots else 0.0,
        )

    def minus(self, before: CPUReading) -> dict[str, float | None]:
        delivery = (
            None
            if self.delivery is None or before.delivery is None
            else round(self.delivery - before.delivery, 3)
        )
        return {
            "delivery_process_s": delivery,
            "server_tree_s": round(self.server_tree - before.server_tree, 3),
            "sink_s": round(self.sink - before.sink, 3),
            "machine_busy_s": round(self.machine - before.machine, 3),
            "database_s": round(self.database - before.database, 3),
        }


def per_message_ms(seconds: float | None, count: int) -> float | None:
    if seconds is None or count <= 0:
        return None
    return round(seconds / count * 1000, 3)


def rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


@dataclass
class Context:
    args: argparse.Namespace
    server: DeliveryServer
    sink: SinkProcess
    delivery_pid: int | None
    problems: list[str]
    total_accepted: int = 0
    database_roots: list[int] = field(default_factory=list)


def wait_for_messages(
    sink: SinkProcess, target: int, deadline: float, samples: list[tuple[float, int]] | None = None
) -> dict[str, Any]:
    """Poll the sink until it has ``target`` messages (or the deadline); its last stats."""
    while True:
        stats = sink.stats(target)
        if samples is not None:
            samples.append((stats["now"], int(stats["messages"])))
        if stats["messages"] >= target or time.monotonic() >= deadline:
            return stats
        time.sleep(POLL)


def run_load(
    ctx: Context, loadgen: Loadgen, samples: list[tuple[float, int]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample the sink while loadgen runs; (loadgen report, sink stats at its end)."""
    while not loadgen.done():
        if loadgen.overdue():
            loadgen.kill()
            raise BenchError("loadgen outlived its hard timeout; killed")
        stats = ctx.sink.stats()
        samples.append((stats["now"], int(stats["messages"])))
        time.sleep(POLL)
    at_end = ctx.sink.stats()
    samples.append((at_end["now"], int(at_end["messages"])))
    report = loadgen.report()
    if report.get("failed_total"):
        ctx.problems.append(
            f"loadgen: {report['failed_total']} submissions failed: {report.get('failed')}"
            f" e.g. {report.get('first_errors', [])[:2]}"
        )
    return report, at_end


def phase_backlog(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    connections = math.ceil(args.messages / PER_CONNECTION)
    if connections * PER_CONNECTION != args.messages:
        print(
            f"note: --messages rounded up to {connections * PER_CONNECTION}"
            f" ({connections} connections x {PER_CONNECTION})",
            file=sys.stderr,
        )
    before_stats = ctx.sink.stats()
    base = int(before_stats["messages"])
    before_connections = int(before_stats["connections"])
    cpu_before = CPUReading.take(ctx)
    samples: list[tuple[float, int]] = []
    loadgen = Loadgen(
        loadgen_command(
            args,
            ctx.server.starttls_port,
            connections=connections,
            duration=0,
            hard_timeout=args.timeout,
        ),
        args.timeout,
        ctx.server.tmp,
        "phase1",
    )
    deadline = loadgen.started + args.timeout
    report, at_submit_end = run_load(ctx, loadgen, samples)
    accepted = int(report.get("accepted", 0))
    ctx.total_accepted += accepted
    target = base + accepted
    stats = wait_for_messages(ctx.sink, target, deadline, samples)
    cpu_after = CPUReading.take(ctx)
    delivered = int(stats["messages"]) - base
    first_submission = loadgen.first_submission()
    assert loadgen.ended is not None
    complete = delivered >= accepted
    last = stats["arrival_of"].get(str(target)) if complete else None
    finished = float(last) if last is not None else float(stats["now"])
    wall = finished - first_submission
    first_arrival = next((t for t, n in samples if n > base), None)
    connections_seen = int(stats["connections"]) - before_connections
    cpu = cpu_after.minus(cpu_before)
    if not complete:
        ctx.problems.append(
            f"phase 1: the sink had {delivered} of {accepted} messages after"
            f" {args.timeout:g} s (queue: {safe_queue_length(ctx)})"
        )
    return {
        "phase": "1 backlog",
        "submitted": accepted,
        "delivered": delivered,
        "complete": complete,
        "wall_s": round(wall, 3),
        "delivered_msgs_per_s": rate(min(delivered, accepted), wall),
        "submit_s": round(loadgen.ended - first_submission, 3),
        "submit_msgs_per_s": report.get("msgs_per_s"),
        "delivered_when_submission_ended": int(at_submit_end["messages"]) - base,
        "first_delivery_after_s": (
            round(first_arrival - first_submission, 3) if first_arrival is not None else None
        ),
        "drain_after_submission_s": round(finished - loadgen.ended, 3),
        # Only the messages still waiting when the last submission was accepted.
        "drain_msgs_per_s": rate(
            min(delivered, accepted) - (int(at_submit_end["messages"]) - base),
            finished - float(at_submit_end["now"]),
        ),
        "sink_connections": connections_seen,
        "msgs_per_connection": (
            round(delivered / connections_seen, 1) if connections_seen else None
        ),
        "sink_open_peak": stats["open_peak"],
        "cpu": cpu,
        "delivery_cpu_ms_per_msg": per_message_ms(cpu["delivery_process_s"], delivered),
        "server_cpu_ms_per_msg": per_message_ms(cpu["server_tree_s"], delivered),
        "submission_cpu_ms_per_msg": per_message_ms(
            None
            if cpu["delivery_process_s"] is None or cpu["server_tree_s"] is None
            else cpu["server_tree_s"] - cpu["delivery_process_s"],
            accepted,
        ),
        "sink_cpu_ms_per_msg": per_message_ms(cpu["sink_s"], delivered),
        "database_cpu_ms_per_msg": per_message_ms(cpu["database_s"], delivered),
        "loadgen_client_cpu_s": report.get("client_cpu_s"),
        "loadgen": report,
        "samples": compress_samples(samples, first_submission, base),
    }


def phase_steady(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    before_stats = ctx.sink.stats()
    base = int(before_stats["messages"])
    before_connections = int(before_stats["connections"])
    cpu_before = CPUReading.take(ctx)
    samples: list[tuple[float, int]] = []
    hard_timeout = args.duration + args.timeout
    loadgen = Loadgen(
        loadgen_command(
            args,
            ctx.server.starttls_port,
            connections=100_000,
            duration=args.duration,
            hard_timeout=hard_timeout,
        ),
        hard_timeout,
        ctx.server.tmp,
        "phase2",
    )
    report, at_end = run_load(ctx, loadgen, samples)
    cpu_after = CPUReading.take(ctx)
    queue_at_end = safe_queue_length(ctx)
    assert loadgen.ended is not None
    start = loadgen.first_submission()
    window = float(at_end["now"]) - start
    accepted = int(report.get("accepted", 0))
    ctx.total_accepted += accepted
    delivered_in_window = int(at_end["messages"]) - base
    connections_seen = int(at_end["connections"]) - before_connections
    # The second half of the window: past the start-up, the rate the two sides settle at.
    middle = start + window / 2
    half = [(t, n) for t, n in samples if t >= middle]
    second_half_rate = (
        rate(half[-1][1] - half[0][1], half[-1][0] - half[0][0]) if len(half) > 1 else None
    )
    # Then let the queue drain, to check that everything arrives exactly once.
    # --timeout, plus 10 ms per message queued at the end: a big backlog takes a while.
    drain_limit = min(args.timeout + (queue_at_end or 0) / 100, 3600.0)
    drain_deadline = time.monotonic() + drain_limit
    stats = wait_for_messages(ctx.sink, base + accepted, drain_deadline)
    drained = int(stats["messages"]) - base >= accepted
    last = stats["arrival_of"].get(str(base + accepted)) if drained else None
    if not drained:
        ctx.problems.append(
            f"phase 2: the sink had {int(stats['messages']) - base} of {accepted} messages"
            f" {drain_limit:.0f} s after the submissions ended"
        )
    cpu = cpu_after.minus(cpu_before)
    return {
        "phase": "2 steady",
        "submitted": accepted,
        "delivered": delivered_in_window,
        "window_s": round(window, 3),
        "delivered_msgs_per_s": rate(delivered_in_window, window),
        "delivered_msgs_per_s_second_half": second_half_rate,
        "submit_msgs_per_s": report.get("msgs_per_s"),
        "queue_at_end": queue_at_end,
        "drained": drained,
        "drain_after_submission_s": (
            round(float(last) - loadgen.ended, 3) if last is not None else None
        ),
        "drain_msgs_per_s": (
            rate(base + accepted - int(at_end["messages"]), float(last) - float(at_end["now"]))
            if last is not None
            else None
        ),
        "sink_connections": connections_seen,
        "msgs_per_connection": (
            round(delivered_in_window / connections_seen, 1) if connections_seen else None
        ),
        "sink_open_peak": at_end["open_peak"],
        "cpu": cpu,
        "delivery_cpu_ms_per_msg": per_message_ms(cpu["delivery_process_s"], delivered_in_window),
        "database_cpu_ms_per_msg": per_message_ms(cpu["database_s"], accepted),
        "server_cpu_ms_per_msg": per_message_ms(cpu["server_tree_s"], accepted),
        "submission_cpu_ms_per_msg": per_message_ms(
            None
            if cpu["delivery_process_s"] is None or cpu["server_tree_s"] is None
            else cpu["server_tree_s"] - cpu["delivery_process_s"],
            accepted,
        ),
        "sink_cpu_ms_per_msg": per_message_ms(cpu["sink_s"], delivered_in_window),
        "loadgen_client_cpu_s": report.get("client_cpu_s"),
        "loadgen": report,
        "samples": compress_samples(samples, start, base),
    }


def compress_samples(
    samples: list[tuple[float, int]], start: float, base: int
) -> list[tuple[float, int]]:
    """About one sample per half second: (seconds since start, messages delivered)."""
    kept: list[tuple[float, int]] = []
    for t, n in samples:
        if not kept or t - start - kept[-1][0] >= 0.5 or (t, n) == samples[-1]:
            kept.append((round(t - start, 2), n - base))
    return kept


def safe_queue_length(ctx: Context) -> int | None:
    try:
        return ctx.server.queue_length()
    except (BenchError, subprocess.SubprocessError, json.JSONDecodeError, OSError) as exc:
        ctx.problems.append(f"queue list: {exc}")
        return None


def capture_baseline(args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    """The phase 1 load against a capture-mode relaygate: submission-only CPU per message."""
    server = DeliveryServer(
        args.python,
        args.workers,
        args.log_level,
        mode="capture",
        sink=None,
        per_destination=args.per_destination,
        concurrency=args.delivery_concurrency,
    )
    result: dict[str, Any] = {"phase": "capture baseline"}
    try:
        server.write_config()
        server.create_users()
        server.start()
        connections = math.ceil(args.messages / PER_CONNECTION)
        before = tree_cpu_seconds([server.pid])
        loadgen = Loadgen(
            loadgen_command(
                args,
                server.starttls_port,
                connections=connections,
                duration=0,
                hard_timeout=args.timeout,
            ),
            args.timeout,
            server.tmp,
            "capture",
        )
        while not loadgen.done():
            if loadgen.overdue():
                loadgen.kill()
                raise BenchError("loadgen outlived its hard timeout; killed")
            time.sleep(POLL)
        used = tree_cpu_seconds([server.pid]) - before
        report = loadgen.report()
        accepted = int(report.get("accepted", 0))
        result.update(
            submitted=accepted,
            submit_msgs_per_s=report.get("msgs_per_s"),
            server_cpu_s=round(used, 3),
            server_cpu_ms_per_msg=per_message_ms(used, accepted),
            loadgen=report,
        )
    finally:
        stop_problem = server.stop()
        if stop_problem:
            problems.append(f"capture baseline: {stop_problem}")
        log_lines = server.log_problems()
        if log_lines:
            problems.append(f"capture baseline log: {log_lines[:3]}")
        server.cleanup(args.keep_temp)
    return result


def final_checks(ctx: Context) -> dict[str, Any]:
    """Lost, duplicated or stuck messages; trouble in relaygate's log."""
    server, problems = ctx.server, ctx.problems
    time.sleep(1.5)  # a late duplicate would land now
    stats = ctx.sink.stats()
    queue = safe_queue_length(ctx)
    try:
        statuses = server.message_statuses(ctx.total_accepted + 100)
    except (BenchError, subprocess.SubprocessError, json.JSONDecodeError, OSError) as exc:
        statuses = {}
        problems.append(f"messages list: {exc}")
    events = server.log_events()
    checks = {
        "accepted_total": ctx.total_accepted,
        "sink_messages": stats["messages"],
        "sink_unique_message_ids": stats["unique_message_ids"],
        "sink_duplicates": stats["duplicates"],
        "sink_duplicate_examples": stats["duplicate_examples"],
        "sink_without_message_id": stats["without_message_id"],
        "sink_recipients": stats["recipients"],
        "sink_connections": stats["connections"],
        "sink_open_peak": stats["open_peak"],
        "sink_commands": stats["commands"],
        "sink_pipelined_reads": stats["pipelined_reads"],
        "sink_problems": stats["problems"],
        "messages_per_closed_connection": stats["messages_per_closed_connection"],
        "queue_at_end": queue,
        "message_statuses": statuses,
        "log_events": events,
    }
    missing = ctx.total_accepted - int(stats["unique_message_ids"])
    # Still queued (the bench stopped waiting) is not the same finding as lost.
    settled = queue == 0
    if missing > 0 and settled:
        problems.append(
            f"LOST: {missing} accepted messages never reached the sink, and the queue is empty"
        )
    elif missing > 0:
        problems.append(
            f"NOT DELIVERED: {missing} accepted messages had not reached the sink when the bench"
            f" stopped waiting ({queue} deliveries still queued)"
        )
    if stats["duplicates"]:
        problems.append(
            f"DUPLICATED: the sink got {stats['duplicates']} messages whose Message-ID it had"
            f" already seen, e.g. {stats['duplicate_examples'][:3]}"
        )
    if int(stats["unique_message_ids"]) > ctx.total_accepted:
        problems.append(
            f"the sink has {stats['unique_message_ids']} distinct Message-IDs but only"
            f" {ctx.total_accepted} submissions were accepted"
        )
    if stats["without_message_id"]:
        problems.append(f"{stats['without_message_id']} delivered messages had no Message-ID")
    if settled and stats["recipients"] != stats["messages"]:
        problems.append(
            f"the sink saw {stats['recipients']} RCPT for {stats['messages']} messages (1 each)"
        )
    other = {k: v for k, v in statuses.items() if k != "delivered"}
    if other:
        problems.append(f"message statuses other than delivered: {other}")
    for event in ("delivery.deferred", "delivery.failed", "delivery.error", "worker.exit"):
        if events.get(event):
            problems.append(f"log: {events[event]} x {event}, e.g. {server.log_lines(event, 2)}")
    if settled and events.get("delivery.ok", 0) != ctx.total_accepted:
        problems.append(
            f"log: {events.get('delivery.ok', 0)} delivery.ok events for"
            f" {ctx.total_accepted} accepted messages"
        )
    if ctx.delivery_pid is not None and process_cpu_seconds(ctx.delivery_pid) is None:
        problems.append(f"the delivery process {ctx.delivery_pid} is gone (restarted?)")
    log_lines = server.log_problems()
    if log_lines:
        checks["log_problems"] = log_lines
        problems.append(f"relaygate log lines that look like trouble: {log_lines[:3]}")
    return checks


# ================================================================ output


COLUMNS = (
    ("submitted", "submitted"),
    ("delivered", "delivered"),
    ("wall_s", "wall s"),
    ("delivered_msgs_per_s", "deliv msg/s"),
    ("submit_msgs_per_s", "submit msg/s"),
    ("sink_connections", "sink conns"),
    ("msgs_per_connection", "msg/conn"),
    ("delivery_cpu_ms_per_msg", "deliv CPU ms/msg"),
    ("submission_cpu_ms_per_msg", "subm CPU ms/msg"),
    ("server_cpu_ms_per_msg", "server CPU ms/msg"),
    ("sink_cpu_ms_per_msg", "sink CPU ms/msg"),
    ("database_cpu_ms_per_msg", "PG CPU ms/msg"),
    ("queue_at_end", "queue at end"),
)


def format_table(phases: list[dict[str, Any]]) -> str:
    header = ["phase", *(title for _, title in COLUMNS)]
    rows = [
        [str(p["phase"])]
        + [
            cell(p.get(key, p.get("window_s")) if key == "wall_s" else p.get(key))
            for key, _ in COLUMNS
        ]
        for p in phases
    ]
    return render_table(header, rows)


# ================================================================ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/delivery_bench.py",
        description=(
            "relaygate onward-delivery benchmark: messages/s delivered (smarthost mode, "
            "connection reuse) to a local SMTP sink on 127.0.0.2; phase 1 drains N submitted "
            "messages, phase 2 submits for --duration seconds."
        ),
    )
    parser.add_argument(
        "--messages", type=int, default=5000, help="phase 1 messages (default 5000)"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="phase 2 seconds of submissions (default 10)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help=(
            "phase 1 limit from its start (default 120 s); phase 2 waits for its queue to drain"
            " this long plus 10 ms per queued message"
        ),
    )
    parser.add_argument(
        "--per-destination", type=int, default=4, help="[delivery] per_destination (default 4)"
    )
    parser.add_argument(
        "--delivery-concurrency",
        type=int,
        default=20,
        help="[delivery] concurrency (default 20)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="relaygate [server] workers (0 = one per CPU)"
    )
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help=(
            "storage: the embedded SQLite (default) or a scratch database on the PostgreSQL of"
            " RELAYGATE_TEST_POSTGRES, dropped at the end; its CPU is reported apart"
        ),
    )
    parser.add_argument("--skip-steady", action="store_true", help="phase 1 only")
    parser.add_argument(
        "--capture-baseline",
        action="store_true",
        help="first submit the phase 1 load to a capture-mode relaygate (submission-only CPU)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="loadgen and sink without uvloop")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument(
        "--python",
        default=default_python(),
        help="Python with relaygate installed (default: this one, else .venv/bin/python)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    parser.add_argument("--sink-child", metavar="HOST", help=argparse.SUPPRESS)
    parser.add_argument("--sink-lifetime", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--sink-idle-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sink_child:
        return sink_child(
            args.sink_child, args.sink_lifetime, args.sink_idle_timeout, not args.no_uvloop
        )
    if not 1 <= args.messages <= 1_000_000 or args.per_destination < 1:
        parser.error("--messages must be 1..1000000, --per-destination >= 1")
    if not 0 < args.duration <= 3600 or not 0 < args.timeout <= 3600:
        parser.error("--duration and --timeout must be > 0 and at most 3600")
    if args.delivery_concurrency < 1 or args.workers < 0:
        parser.error("--delivery-concurrency must be >= 1, --workers >= 0")

    problems: list[str] = []
    phases: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    info: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "command": [sys.executable, *sys.argv],
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
            if not key.startswith("sink_")
        },
        "loadgen": f"-c {CONCURRENCY} -m {PER_CONNECTION} --size {args.size} --mode starttls",
    }
    server: DeliveryServer | None = None
    scratch: ScratchPostgres | None = None
    lifetime = args.timeout * 3 + args.duration + 600
    sink = SinkProcess(args.python, SINK_HOST, lifetime, not args.no_uvloop)
    with interrupts_as_errors():
        try:
            if args.capture_baseline:
                print(f"capture baseline: {args.messages} messages ...", file=sys.stderr)
                phases.append(capture_baseline(args, problems))
            if args.backend == "postgresql":
                scratch = ScratchPostgres()
                info["postgresql"] = {"database": scratch.name, "roots": scratch.roots}
            sink.start()
            info["sink"] = {"address": f"{SINK_HOST}:{sink.port}", "pid": sink.pid}
            info["sink"]["uvloop"] = sink.uvloop
            server = DeliveryServer(
                args.python,
                args.workers,
                args.log_level,
                mode="smarthost",
                sink=(SINK_HOST, sink.port),
                per_destination=args.per_destination,
                concurrency=args.delivery_concurrency,
                storage_url=scratch.url if scratch is not None else None,
            )
            server.write_config()
            server.create_users()
            server.start()
            delivery_pid: int | None = None
            children: list[int] = []
            limit = time.monotonic() + 15
            while delivery_pid is None and time.monotonic() < limit:
                delivery_pid, children = find_delivery_pid(server.pid)
                if delivery_pid is None:
                    time.sleep(0.2)
            from_log = delivery_pid_from_log(server.log_file)
            if delivery_pid is None:
                delivery_pid = from_log
            if delivery_pid is None:
                problems.append(f"could not tell the delivery process among {children}")
            elif from_log is not None and from_log != delivery_pid:
                problems.append(
                    f"delivery process: {delivery_pid} by its sockets, {from_log} by the log"
                )
            info["relaygate"] = {
                "version": server.version(),
                "supervisor_pid": server.pid,
                "children": children,
                "delivery_pid": delivery_pid,
                "delivery_pid_from_log": from_log,
                "config": server.config.read_text(),
            }
            ctx = Context(args, server, sink, delivery_pid, problems)
            if scratch is not None:
                ctx.database_roots = scratch.roots
            # One idle second: lets the workers settle and shows what else runs here.
            info["background_cpus_busy"] = background_load(1.0)
            if info["background_cpus_busy"] > 0.2:
                print(
                    f"warning: the machine was already busy ({info['background_cpus_busy']:.2f}"
                    " CPUs) before the run; msg/s will be off",
                    file=sys.stderr,
                )
            print(
                f"phase 1: {args.messages} messages, then wait for the sink"
                f" (at most {args.timeout:g} s) ...",
                file=sys.stderr,
            )
            phases.append(phase_backlog(ctx))
            if not args.skip_steady:
                print(f"phase 2: {args.duration:g} s of submissions ...", file=sys.stderr)
                phases.append(phase_steady(ctx))
            checks = final_checks(ctx)
        except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            problems.append("interrupted")
        finally:
            if server is not None:
                stop_problem = server.stop()
                if stop_problem:
                    problems.append(stop_problem)
                info.setdefault("relaygate", {})["exit_code"] = server.exit_code
                if problems:
                    info["relaygate"]["log_tail"] = server.tail_output()
                server.cleanup(args.keep_temp or bool(problems))
            stop_problem = sink.stop()
            if stop_problem:
                problems.append(stop_problem)
            if scratch is not None:
                try:
                    scratch.drop()
                except Exception as exc:  # a leftover database is reported, not fatal
                    problems.append(f"dropping {scratch.name}: {exc}")

    if phases:
        print()
        print(format_table([p for p in phases if "submitted" in p and "delivered" in p]))
        for p in phases:
            if p["phase"] == "capture baseline" and "server_cpu_ms_per_msg" in p:
                print(
                    f"\ncapture baseline: {p['submitted']} messages at {p['submit_msgs_per_s']}"
                    f" msg/s, server CPU {p['server_cpu_ms_per_msg']} ms/msg (submission only)"
                )
        print()
        for p in phases:
            if p["phase"].startswith("1"):
                print(
                    f"phase 1: first delivery {p['first_delivery_after_s']} s after the first"
                    f" submission; submissions took {p['submit_s']} s"
                    f" ({p['delivered_when_submission_ended']} delivered by then); the last"
                    f" message arrived {p['drain_after_submission_s']} s after the last"
                    f" submission ({p['drain_msgs_per_s']} msg/s for the rest); sink peak"
                    f" {p['sink_open_peak']} connections at once"
                )
            elif p["phase"].startswith("2"):
                print(
                    f"phase 2: {p['delivered_msgs_per_s_second_half']} msg/s delivered in the"
                    f" second half of the window; queue {p['queue_at_end']} when submissions"
                    f" ended, drained {p['drain_after_submission_s']} s later"
                    f" ({p['drain_msgs_per_s']} msg/s)"
                )
    if checks:
        print(
            f"checks: accepted {checks['accepted_total']}, sink got {checks['sink_messages']}"
            f" ({checks['sink_unique_message_ids']} distinct Message-IDs,"
            f" {checks['sink_duplicates']} duplicates), queue at end {checks['queue_at_end']},"
            f" statuses {checks['message_statuses']}"
        )
    for problem in problems:
        print(f"PROBLEM: {problem}")

    report = {"info": info, "phases": phases, "checks": checks, "problems": problems}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"delivery-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"results written to {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
