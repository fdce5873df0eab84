#!/usr/bin/env python3
"""relaygate's submission benchmark (what ``make bench`` runs).

Starts relaygate from a throw-away configuration (temporary directory, two
loopback listeners on free ports, capture delivery), creates the bench users
with the ``relaygate user add`` command, runs the scenarios with
``bench/loadgen.py`` and reports, per scenario: messages per second, latency and
the server's CPU time per accepted message, measured two ways:

* process: utime + stime (+ reaped children) of the server's process tree,
  read from /proc/<pid>/stat before and after the run;
* machine: busy CPU of the whole machine from /proc/stat, minus the load
  generator's own CPU (its ``client_cpu_s``).

With ``--compare-postfix`` the same scenarios also run, interleaved in the same
run, against Postfix + Dovecot on 127.0.0.1:11587 (``bench/postfix/``), and the
ratios relaygate / Postfix are reported.  Results go to the terminal and to
``bench/results/<timestamp>.json``.  All traffic stays on the loopback interface.
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN = BENCH_DIR / "loadgen.py"
POSTFIX_DIR = BENCH_DIR / "postfix"
RESULTS_DIR = BENCH_DIR / "results"
POSTFIX_ROOT = Path(os.environ.get("BENCH_PF_ROOT", "/var/lib/relaygate-bench-postfix"))
POSTFIX_PORT = 11587
USER_PATTERN = "user{i}@example.test"
PASSWORD_PATTERN = "pw-user{i}-bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# name -> (concurrency, messages per connection, what it shows)
SCENARIOS: dict[str, tuple[int, int, str]] = {
    "a": (20, 50, "sustained: 20 connections, 50 messages each"),
    "b": (20, 1, "one message per connection, incl. TLS + AUTH"),
}


class BenchError(Exception):
    """Something stopped the benchmark; the message says what."""


# ---------------------------------------------------------------- /proc readings


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(ppid, utime+stime+cutime+cstime in clock ticks) from a /proc/<pid>/stat line.

    The command name (field 2) may contain spaces and parentheses, so fields
    are counted from the last ')'.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field n is rest[n - 3].
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, ticks


def read_processes(proc: Path = Path("/proc")) -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks incl. reaped children) for every live process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            table[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return table


def tree_members(table: dict[int, tuple[int, int]], roots: Sequence[int]) -> set[int]:
    """The roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    members: set[int] = set()
    pending = [pid for pid in roots if pid in table]
    while pending:
        pid = pending.pop()
        if pid in members:
            continue
        members.add(pid)
        pending.extend(children.get(pid, ()))
    return members


def tree_cpu_seconds(roots: Sequence[int], proc: Path = Path("/proc")) -> float:
    """CPU seconds used so far by the process trees under ``roots``.

    A live process's own time plus the time of children it has reaped: a worker
    that exits during the run moves its time into its parent's cutime/cstime,
    so the total stays right as long as the roots themselves live.
    """
    table = read_processes(proc)
    return sum(table[pid][1] for pid in tree_members(table, roots)) / CLOCK_TICKS


def parse_machine_busy(text: str) -> float:
    """Busy CPU seconds (all cores) from /proc/stat: everything but idle and iowait."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            user, nice, system, _idle, _iowait, irq, softirq = values[:7]
            steal = values[7] if len(values) > 7 else 0
            return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
    raise ValueError("no 'cpu' line in /proc/stat")


def machine_busy_seconds() -> float:
    return parse_machine_busy(Path("/proc/stat").read_text())


def listening_pids(port: int, proc: Path = Path("/proc")) -> list[int]:
    """Pids holding a listening TCP socket on ``port`` (any local address)."""
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    wanted = {f"socket:[{inode}]" for inode in inodes}
    pids: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    pids.append(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def topmost_same_program(pid: int, proc: Path = Path("/proc")) -> int:
    """Walk up from ``pid`` while the parent runs the same kind of program."""

    def cmdline(p: int) -> str:
        try:
            return (proc / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    own = cmdline(pid)
    marker = "relaygate" if "relaygate" in own else own.split(" ", 1)[0]
    current = pid
    for _ in range(64):
        try:
            ppid = parse_proc_stat((proc / str(current) / "stat").read_text())[0]
        except (OSError, ValueError, IndexError):
            break
        if ppid <= 1 or not marker or marker not in cmdline(ppid):
            break
        current = ppid
    return current


def background_load(seconds: float = 1.0) -> float:
    """How many CPUs' worth of work the machine does while we wait ``seconds``."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return round((machine_busy_seconds() - before) / seconds, 2)


def read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- helpers


def default_python() -> str:
    """This interpreter if it has relaygate, else the project's .venv one when present."""
    if importlib.util.find_spec("relaygate") is not None:
        return sys.executable
    venv = BENCH_DIR.parent / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return round(ours / theirs, 3)


@dataclass
class Target:
    """A server under test: where it listens and which process trees are its."""

    name: str
    port: int
    mode: str
    roots: list[int] = field(default_factory=list)


@dataclass
class Measurement:
    target: str
    scenario: str
    ok: bool
    error: str = ""
    load: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    machine_busy_s: float = 0.0
    tree_cpu_s: list[float] = field(default_factory=list)  # per root, in Target.roots order

    @property
    def accepted(self) -> int:
        return int(self.load.get("accepted", 0))

    def cpu_ms_per_msg_process(self) -> float | None:
        if not self.ok or self.accepted == 0:
            return None
        return round(self.server_cpu_s / self.accepted * 1000, 3)

    def cpu_ms_per_msg_machine(self) -> float | None:
        if not self.ok or self.accepted == 0:
            return None
        server = self.machine_busy_s - float(self.load.get("client_cpu_s", 0.0))
        return round(server / self.accepted * 1000, 3)

    def other_cpu_s(self) -> float | None:
        """Busy CPU that was neither the server's nor the load generator's (noise)."""
        if not self.ok:
            return None
        client = float(self.load.get("client_cpu_s", 0.0))
        return round(self.machine_busy_s - client - self.server_cpu_s, 3)

    def figures(self) -> dict[str, Any]:
        latency = self.load.get("latency", {})
        message = latency.get("message", {})
        connection = latency.get("connection", {})
        return {
            "msgs_per_s": self.load.get("msgs_per_s"),
            "accepted": self.accepted,
            "failed": self.load.get("failed", {}),
            "msg_p50_ms": message.get("p50_ms"),
            "msg_p99_ms": message.get("p99_ms"),
            "conn_p50_ms": connection.get("p50_ms"),
            "conn_p99_ms": connection.get("p99_ms"),
            "server_cpu_ms_per_msg_process": self.cpu_ms_per_msg_process(),
            "server_cpu_ms_per_msg_machine": self.cpu_ms_per_msg_machine(),
            "server_cpu_s": round(self.server_cpu_s, 3),
            # Per process tree (relaygate first, then e.g. PostgreSQL's postmaster).
            "server_cpu_ms_per_msg_by_tree": [
                round(t / self.accepted * 1000, 3) if self.accepted else None
                for t in self.tree_cpu_s
            ],
            "machine_busy_s": round(self.machine_busy_s, 3),
            "client_cpu_s": self.load.get("client_cpu_s"),
            "other_cpu_s": self.other_cpu_s(),
            "wall_s": round(self.wall_s, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "ok": self.ok,
            "error": self.error,
            "figures": self.figures(),
            "loadgen": self.load,
        }


# ---------------------------------------------------------------- relaygate


class RelaygateServer:
    """relaygate started from a temporary configuration, stopped with SIGTERM."""

    def __init__(
        self,
        python: str,
        workers: int,
        users: int,
        log_level: str,
        storage_url: str | None = None,
        redis_url: str | None = None,
        http_port: int | None = None,
        http: bool = False,
        extra_toml: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.extra_toml = extra_toml  # more config text, appended
        self.delivery_toml = ""  # more [delivery] keys
        self.env = env  # more environment for serve
        self.storage_url = storage_url  # None: the embedded SQLite database
        self.redis_url = redis_url  # [shared] redis_url, as a cluster node has
        self.python = python
        self.workers = workers
        self.users = users
        self.log_level = log_level
        self.tmp = Path(tempfile.mkdtemp(prefix="relaygate-bench-"))
        self.config = self.tmp / "relaygate.toml"
        self.log_file = self.tmp / "relaygate.log"
        self.output_file = self.tmp / "serve-output.log"
        self.starttls_port = free_port()
        self.implicit_port = free_port()
        while self.implicit_port == self.starttls_port:
            self.implicit_port = free_port()
        # [http] on 127.0.0.1:PORT: the HTTP process (API, web UI) and /metrics
        # (every process then writes its metrics to data_dir/metrics).
        self.http_port = http_port if http_port is not None else (free_port() if http else None)
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def write_config(self) -> None:
        self.config.write_text(
            "# written by bench/run.py\n"
            "[server]\n"
            'hostname = "bench.relaygate.test"\n'
            f'data_dir = "{self.tmp / "data"}"\n'
            f"workers = {self.workers}\n\n"
            "[[listeners]]\n"
            f'address = "127.0.0.1:{self.starttls_port}"\n'
            'tls = "starttls"\n\n'
            "[[listeners]]\n"
            f'address = "127.0.0.1:{self.implicit_port}"\n'
            'tls = "implicit"\n\n'
            "[delivery]\n"
            'mode = "capture"\n' + self.delivery_toml + "\n"
            "# A benchmark sends far more than a person would: no sending limits.\n"
            "[sending_limits]\n"
            "messages_per_hour = 0\n"
            "messages_per_day = 0\n"
            "recipients_per_day = 0\n"
            "new_recipients_per_day = 0\n\n"
            "[log]\n"
            f'level = "{self.log_level}"\n'
            f'file = "{self.log_file}"\n'
            + (f'\n[storage]\nurl = "{self.storage_url}"\n' if self.storage_url else "")
            + (f'\n[shared]\nredis_url = "{self.redis_url}"\n' if self.redis_url else "")
            + (f'\n[http]\naddress = "127.0.0.1:{self.http_port}"\n' if self.http_port else "")
            + self.extra_toml,
            encoding="utf-8",
        )

    def cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "relaygate", "--config", str(self.config), *args]

    def _add_user(self, i: int) -> str:
        address = USER_PATTERN.format(i=i)
        done = subprocess.run(
            self.cli("user", "add", address, "--password-stdin", "--sender", address),
            input=PASSWORD_PATTERN.format(i=i) + "\n",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            return f"user add {address}: exit {done.returncode}: {done.stderr.strip()[-300:]}"
        return ""

    def create_users(self) -> None:
        if self.storage_url:
            done = subprocess.run(
                self.cli("migrate"), capture_output=True, text=True, timeout=120, check=False
            )
            if done.returncode != 0:
                raise BenchError(f"relaygate migrate: {done.stderr.strip()[-300:]}")
        # The first one alone (it creates the database), then the rest in parallel.
        problems = [self._add_user(1)]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            problems += list(pool.map(self._add_user, range(2, self.users + 1)))
        problems = [p for p in problems if p]
        if problems:
            raise BenchError("creating users failed:\n  " + "\n  ".join(problems[:5]))

    def listening_ports(self) -> list[int]:
        """The ports ``start`` waits for."""
        return [self.starttls_port, self.implicit_port]

    def start(self, timeout: float = 60.0) -> None:
        with self.output_file.open("wb") as output:
            self.process = subprocess.Popen(
                self.cli("serve"),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        limit = time.monotonic() + timeout
        while time.monotonic() < limit:
            if self.process.poll() is not None:
                raise BenchError(
                    f"relaygate serve exited with {self.process.returncode} while starting:\n"
                    + self.tail_output()
                )
            if all(port_accepts(port) for port in self.listening_ports()):
                return
            time.sleep(0.1)
        raise BenchError(f"relaygate did not open its ports within {timeout:g} s")

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM, wait; returns a problem description or ''."""
        if self.process is None:
            return ""
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            self.exit_code = process.wait(timeout=10)
            return f"relaygate did not exit within {timeout:g} s of SIGTERM (killed)"
        if self.exit_code != 0:
            return f"relaygate exited with {self.exit_code} after SIGTERM"
        return ""

    def tail_output(self, lines: int = 15) -> str:
        try:
            text = self.output_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self, limit: int = 20) -> list[str]:
        """Lines of the server's log and output that look like trouble."""
        pattern = re.compile(r"\b(error|critical|traceback|exception)\b", re.IGNORECASE)
        found: list[str] = []
        for path in (self.log_file, self.output_file):
            try:
                with path.open(errors="replace") as handle:
                    for line in handle:
                        if pattern.search(line):
                            found.append(line.rstrip()[:300])
                            if len(found) >= limit:
                                return found
            except OSError:
                continue
        return found

    def version(self) -> str:
        done = subprocess.run(
            [self.python, "-c", "import importlib.metadata as m; print(m.version('relaygate'))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return done.stdout.strip() or "unknown"

    def cleanup(self, keep: bool) -> None:
        if keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- postgresql

PG_ADMIN_URL = os.environ.get(
    "RELAYGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


class ScratchPostgres:
    """A database of its own on the local PostgreSQL, dropped at the end."""

    def __init__(self) -> None:
        import psycopg  # only this option needs it

        self._psycopg = psycopg
        self.name = f"relaygate_bench_{os.getpid()}_{int(time.time())}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"
        port = int(base.rsplit(":", 1)[1]) if base.count(":") > 1 else 5432
        # Its CPU counts as the server's: the postmaster's tree (backends, WAL writer).
        self.roots = sorted({topmost_same_program(pid) for pid in listening_pids(port)})

    def drop(self) -> None:
        with self._psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def scratch_redis() -> tuple[str, list[int]]:
    """Database 14 of the test Redis server, flushed; the server's process for its CPU."""
    import redis  # only this option needs it

    base = os.environ.get("RELAYGATE_TEST_REDIS", "redis://127.0.0.1:6379/9").rsplit("/", 1)[0]
    url = f"{base}/14"
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    port = int(base.rsplit(":", 1)[1]) if base.count(":") > 1 else 6379
    roots = sorted({topmost_same_program(pid) for pid in listening_pids(port)})
    if len(roots) != 1:
        raise BenchError(f"expected one Redis process on port {port}, found {roots}")
    return url, roots


# ---------------------------------------------------------------- postfix


class PostfixServer:
    """Postfix + Dovecot from bench/postfix/, started here if not yet running."""

    def __init__(self) -> None:
        self.started_here = False

    def _script(self, name: str, timeout: float) -> None:
        # Output to a file, not a pipe: the daemons that start.sh starts inherit
        # it and would keep a pipe open forever.
        with tempfile.TemporaryFile() as output:
            try:
                done = subprocess.run(
                    ["bash", str(POSTFIX_DIR / name)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise BenchError(f"bench/postfix/{name} took more than {timeout:g} s") from None
            if done.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace")
                raise BenchError(
                    f"bench/postfix/{name} failed ({done.returncode}):\n{text[-1500:]}"
                )

    def roots(self) -> list[int]:
        pids = [
            read_pid_file(POSTFIX_ROOT / "postfix-queue" / "pid" / "master.pid"),
            read_pid_file(POSTFIX_ROOT / "dovecot" / "run" / "master.pid"),
        ]
        return [pid for pid in pids if pid is not None and Path(f"/proc/{pid}").exists()]

    def start(self) -> None:
        if port_accepts(POSTFIX_PORT) and len(self.roots()) == 2:
            return
        if os.geteuid() != 0:
            raise BenchError("--compare-postfix needs root (it installs and runs Postfix)")
        self._script("setup.sh", 1800)
        self.started_here = True
        self._script("start.sh", 120)
        if len(self.roots()) != 2:
            raise BenchError("Postfix or Dovecot is not running after start.sh")

    def stop(self) -> str:
        if not self.started_here:
            return ""
        try:
            self._script("stop.sh", 90)
        except BenchError as exc:
            return str(exc)
        return ""

    @staticmethod
    def version() -> str:
        try:
            done = subprocess.run(
                ["postconf", "-d", "-h", "mail_version"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            return "unknown"
        return done.stdout.strip() or "unknown"


# ---------------------------------------------------------------- running


class DashboardPoller:
    """A person with the web UI open: logged in, the message log polling every
    2 s (as its page script does) and the dashboard reloaded every 10 s."""

    def __init__(self, base: str, address: str, password: str) -> None:
        self.base = base
        self.requests = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        form = urllib.parse.urlencode({"address": address, "password": password}).encode()
        with self._opener.open(base + "/login", form, timeout=30) as response:
            if not response.geturl().endswith("/"):
                raise BenchError(f"dashboard login failed: landed on {response.geturl()}")
        self._thread = threading.Thread(target=self._run, name="dashboard", daemon=True)

    def _get(self, path: str) -> None:
        try:
            with self._opener.open(self.base + path, timeout=30) as response:
                response.read()
            self.requests += 1
        except OSError as exc:
            self.errors.append(f"{path}: {exc}")

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(2.0):
            self._get("/ui/messages.json")
            tick += 1
            if tick % 5 == 0:
                self._get("/")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=35)


def loadgen_command(
    args: argparse.Namespace, target: Target, scenario: str, duration: float
) -> list[str]:
    concurrency, messages, _ = SCENARIOS[scenario]
    command = [
        args.python,
        str(LOADGEN),
        "--json",
        "--port",
        str(target.port),
        "--mode",
        target.mode,
        "-c",
        str(concurrency),
        "-m",
        str(messages),
        "-n",
        str(args.max_connections),
        "--duration",
        str(duration),
        "--size",
        str(args.size),
        "--user-pattern",
        USER_PATTERN,
        "--password-pattern",
        PASSWORD_PATTERN,
        "--user-count",
        str(args.users),
        "--procs",
        str(args.procs),
        "--timeout",
        str(args.step_timeout),
    ]
    if args.no_uvloop:
        command.append("--no-uvloop")
    return command


def run_loadgen(command: list[str], duration: float, step_timeout: float) -> dict[str, Any]:
    limit = duration + 2 * step_timeout + 120
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    try:
        data: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise BenchError(
            f"loadgen exit {done.returncode}, no JSON: {done.stderr.strip()[-800:]}"
        ) from None
    return data


def measure(args: argparse.Namespace, target: Target, scenario: str) -> Measurement:
    result = Measurement(target=target.name, scenario=scenario, ok=False)
    try:
        if args.warmup > 0:
            run_loadgen(
                loadgen_command(args, target, scenario, args.warmup), args.warmup, args.step_timeout
            )
        command = loadgen_command(args, target, scenario, args.duration)
        cpu_before = tree_cpu_seconds(target.roots)
        trees_before = [tree_cpu_seconds([root]) for root in target.roots]
        busy_before = machine_busy_seconds()
        started = time.monotonic()
        result.load = run_loadgen(command, args.duration, args.step_timeout)
        result.wall_s = time.monotonic() - started
        result.machine_busy_s = machine_busy_seconds() - busy_before
        result.server_cpu_s = tree_cpu_seconds(target.roots) - cpu_before
        result.tree_cpu_s = [
            tree_cpu_seconds([root]) - before
            for root, before in zip(target.roots, trees_before, strict=True)
        ]
        result.ok = result.accepted > 0
        if not result.ok:
            result.error = f"no message accepted; failures: {result.load.get('failed')}"
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        result.error = str(exc)
    return result


def cell(value: Any) -> str:
    """A table cell: '-' for no value, booleans as yes/NO, floats rounded."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


COLUMNS = (
    ("msgs_per_s", "msg/s"),
    ("msg_p50_ms", "msg p50 ms"),
    ("msg_p99_ms", "msg p99 ms"),
    ("conn_p50_ms", "conn p50 ms"),
    ("conn_p99_ms", "conn p99 ms"),
    ("server_cpu_ms_per_msg_process", "CPU ms/msg (proc)"),
    ("server_cpu_ms_per_msg_machine", "CPU ms/msg (machine)"),
    ("accepted", "accepted"),
)


def table_rows(
    measurements: list[Measurement],
    ratios: dict[str, dict[str, float | None]],
    pg_ratios: dict[str, dict[str, float | None]] | None = None,
) -> list[list[str]]:
    rows: list[list[str]] = []
    for scenario in SCENARIOS:
        for m in (m for m in measurements if m.scenario == scenario):
            figures = m.figures()
            failed = sum(int(v) for v in figures["failed"].values())
            row = [scenario, m.target] + [cell(figures[key]) for key, _ in COLUMNS]
            row.append(str(failed) if m.ok else f"ERROR: {m.error[:60]}")
            rows.append(row)
        for label, table in (("ratio r/p", ratios), ("ratio pg/sqlite", pg_ratios or {})):
            if scenario in table:
                rows.append(
                    [scenario, label]
                    + [cell(table[scenario].get(key)) for key, _ in COLUMNS[:-1]]
                    + ["", ""]
                )
    return rows


def render_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Aligned text table: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            text.ljust(w) if i < left else text.rjust(w)
            for i, (text, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(rows: list[list[str]]) -> str:
    header = ["scen", "server", *(title for _, title in COLUMNS), "failed"]
    return render_table(header, rows, left=2)


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def compute_ratios(
    measurements: list[Measurement], ours_name: str = "relaygate", theirs_name: str = "postfix"
) -> dict[str, dict[str, float | None]]:
    ratios: dict[str, dict[str, float | None]] = {}
    for scenario in SCENARIOS:
        ours = [
            m.figures()
            for m in measurements
            if m.scenario == scenario and m.target == ours_name and m.ok
        ]
        theirs = [
            m.figures()
            for m in measurements
            if m.scenario == scenario and m.target == theirs_name and m.ok
        ]
        if not ours or not theirs:
            continue
        ratios[scenario] = {
            key: ratio(_median(f[key] for f in ours), _median(f[key] for f in theirs))
            for key, _ in COLUMNS[:-1]
        }
    return ratios


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=(
            "relaygate submission benchmark: starts relaygate (temporary config, capture "
            "delivery), runs scenario a (-c 20 -m 50) and b (-c 20 -m 1) with 4 KB "
            "messages over STARTTLS + AUTH PLAIN, reports msg/s, latency and server CPU "
            "per message; --compare-postfix runs the same against Postfix + Dovecot."
        ),
    )
    parser.add_argument("--scenario", choices=("a", "b", "all"), default="all")
    parser.add_argument(
        "--duration", type=float, default=15.0, help="seconds of load per scenario (default 15)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds before each (0 = none)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every scenario on every target this many times, interleaved; ratios"
        " compare the medians (default 1)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="relaygate [server] workers (0 = one per CPU)"
    )
    parser.add_argument("--users", type=int, default=20, help="bench users (default 20)")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument(
        "--mode", choices=("starttls", "implicit"), default="starttls", help="relaygate TLS"
    )
    parser.add_argument("--procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--no-uvloop", action="store_true", help="load generator without uvloop")
    parser.add_argument("--compare-postfix", action="store_true", help="also bench Postfix")
    parser.add_argument(
        "--compare-postgres",
        action="store_true",
        help="also bench relaygate on PostgreSQL ([storage] url, a scratch database on"
        " $RELAYGATE_TEST_POSTGRES); its CPU includes PostgreSQL's",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="with --compare-postgres: the PostgreSQL node also has [shared] redis_url (db 14"
        " of $RELAYGATE_TEST_REDIS's server, flushed), as a cluster node has; its CPU includes"
        " Redis's",
    )
    parser.add_argument(
        "--compare-http",
        action="store_true",
        help="also bench relaygate with its HTTP listener on ([http]) and a web UI dashboard"
        " open (polling), and report the ratio to relaygate without it",
    )
    parser.add_argument(
        "--compare-retention",
        action="store_true",
        help="also bench relaygate with retention pruning all the time ([retention]"
        " max_messages = 2000, a round every second), and report the ratio to relaygate without",
    )
    parser.add_argument(
        "--compare-defence",
        action="store_true",
        help="also bench relaygate with the compromised-account defence off ([defence]"
        " enabled = false), and report the ratio of on (the default) to off",
    )
    parser.add_argument(
        "--compare-domain-check",
        action="store_true",
        help="also bench relaygate with [submission] check_recipient_domains = true (a"
        " loopback DNS server in this process answers; the answer is cached after the first"
        " RCPT), and report the ratio to relaygate without",
    )
    parser.add_argument(
        "--relaygate-only-port",
        type=int,
        metavar="PORT",
        help="bench an already running relaygate on 127.0.0.1:PORT (users must exist)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument("--max-connections", type=int, default=100_000, help=argparse.SUPPRESS)
    parser.add_argument("--step-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--python",
        default=default_python(),
        help="Python with relaygate installed (default: this one, else .venv/bin/python)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--http",
        action="store_true",
        help="relaygate with an [http] section (admin API process, /metrics on)",
    )
    return parser


def start_fake_dns() -> Any:
    """The tests' loopback DNS server (tests/fakes/dns_server.py), with the MX of the
    load generator's recipient domain, for --compare-domain-check."""
    path = BENCH_DIR.parent / "tests" / "fakes" / "dns_server.py"
    spec = importlib.util.spec_from_file_location("bench_fake_dns", path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dns = module.FakeDNS().start()
    dns.add_mx("remote.example.net", [(10, "mx.remote.example.net")])
    dns.add_a("mx.remote.example.net", "127.0.0.1")
    return dns


@contextlib.contextmanager
def interrupts_as_errors() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the finally blocks still run."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (
        args.duration <= 0
        or args.warmup < 0
        or args.users < 1
        or args.workers < 0
        or args.rounds < 1
    ):
        parser.error(
            "--duration must be > 0, --warmup >= 0, --users >= 1, --workers >= 0, --rounds >= 1"
        )
    if args.redis and not args.compare_postgres:
        parser.error("--redis goes with --compare-postgres")
    if args.compare_postfix and args.mode != "starttls":
        parser.error("--compare-postfix needs --mode starttls (Postfix listens with STARTTLS)")
    if args.compare_postfix and args.users > 100:
        parser.error("the Postfix bench has 100 users; use --users 100 or fewer")
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]

    problems: list[str] = []
    measurements: list[Measurement] = []
    server: RelaygateServer | None = None
    pg_server: RelaygateServer | None = None
    scratch: ScratchPostgres | None = None
    postfix: PostfixServer | None = None
    http_server: RelaygateServer | None = None
    # Same-config-but-one-section comparisons: (target name, why, its server).
    variants: list[tuple[str, str, RelaygateServer]] = []
    retention_server: RelaygateServer | None = None
    fake_dns: Any = None
    poller: DashboardPoller | None = None
    info: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
    }
    with interrupts_as_errors():
        try:
            targets: list[Target] = []

            def launch(
                name: str,
                why: str,
                delivery_toml: str = "",
                extra_roots: Sequence[int] = (),
                before_start: Callable[[RelaygateServer], object] | None = None,
                **settings: Any,
            ) -> RelaygateServer:
                """A relaygate with ``settings``, its users made, started and measured
                as target ``name`` (with ``extra_roots``: its database's processes)."""
                started = RelaygateServer(
                    args.python, args.workers, args.users, args.log_level, **settings
                )
                started.delivery_toml = delivery_toml
                started.write_config()
                print(
                    f"creating {args.users} users" + (f" ({why})" if why else "") + " ...",
                    file=sys.stderr,
                )
                started.create_users()
                if before_start is not None:
                    before_start(started)
                started.start()
                assert started.process is not None
                port = started.starttls_port if args.mode == "starttls" else started.implicit_port
                roots = [started.process.pid, *extra_roots]
                targets.append(Target(name, port, args.mode, roots))
                return started

            if args.relaygate_only_port:
                port = args.relaygate_only_port
                pids = listening_pids(port)
                if not pids:
                    raise BenchError(f"nothing listens on port {port}")
                roots = sorted({topmost_same_program(pid) for pid in pids})
                targets.append(Target("relaygate", port, args.mode, roots))
                info["relaygate"] = {"port": port, "pids": roots}
            else:
                server = launch("relaygate", "", http=args.http)
                info["relaygate"] = {
                    "version": server.version(),
                    "workers": args.workers,
                    "config": server.config.read_text(),
                }
            if args.compare_postgres:
                scratch = ScratchPostgres()
                redis_roots: list[int] = []
                redis_url = None
                if args.redis:
                    redis_url, redis_roots = scratch_redis()
                pg_server = launch(
                    "relaygate-pg",
                    "on PostgreSQL",
                    extra_roots=[*scratch.roots, *redis_roots],
                    storage_url=scratch.url,
                    redis_url=redis_url,
                )
            if args.compare_http:
                http_port = free_port()
                http_server = launch(
                    "relaygate-http",
                    "HTTP on",
                    # The dashboard poller logs in as user 1: an admin sees it all.
                    before_start=lambda s: subprocess.run(
                        s.cli("user", "admin", USER_PATTERN.format(i=1), "on"),
                        capture_output=True,
                        timeout=60,
                        check=True,
                    ),
                    http_port=http_port,
                )
                poller = DashboardPoller(
                    f"http://127.0.0.1:{http_port}",
                    USER_PATTERN.format(i=1),
                    PASSWORD_PATTERN.format(i=1),
                )
                poller.start()

            def variant(
                name: str, why: str, delivery_toml: str = "", **settings: Any
            ) -> RelaygateServer:
                """Another relaygate differing by ``settings``, loaded like the first."""
                started = launch(name, why, delivery_toml, **settings)
                variants.append((name, why, started))
                return started

            if args.compare_retention:
                # Past 2,000 messages every round (each second) deletes the oldest in
                # batches while the load goes on: the worst case for the SQLite lock.
                retention_server = variant(
                    "relaygate-retention",
                    "retention",
                    extra_toml='\n[retention]\nmax_messages = 2000\nbody_max_age = "1m"\n',
                    env={"RELAYGATE_RETENTION_INTERVAL": "1"},
                )
            if args.compare_defence:
                variant(
                    "relaygate-nodefence",
                    "defence off",
                    extra_toml="\n[defence]\nenabled = false\n",
                )
            if args.compare_domain_check:
                fake_dns = start_fake_dns()
                variant(
                    "relaygate-domain-check",
                    "domain check",
                    delivery_toml=f'resolvers = ["{fake_dns.address}"]\n'
                    "allow_private_targets = true\n",
                    extra_toml="\n[submission]\ncheck_recipient_domains = true\n",
                )
            if args.compare_postfix:
                postfix = PostfixServer()
                print("starting Postfix + Dovecot ...", file=sys.stderr)
                postfix.start()
                targets.append(Target("postfix", POSTFIX_PORT, "starttls", postfix.roots()))
                info["postfix"] = {"version": PostfixServer.version(), "port": POSTFIX_PORT}

            quiet = background_load()
            info["background_cpus_busy"] = quiet
            if quiet > 0.2:
                print(
                    f"warning: before the run the machine was already busy ({quiet:.2f} CPUs);"
                    " msg/s and the machine-wide CPU figure will be off",
                    file=sys.stderr,
                )
            for round_ in range(args.rounds):  # interleaved: drift hits every target alike
                for scenario in scenarios:
                    for target in targets:
                        print(
                            f"scenario {scenario} ({SCENARIOS[scenario][2]}) on {target.name}"
                            f" for {args.duration:g} s"
                            + (f" (round {round_ + 1}/{args.rounds})" if args.rounds > 1 else "")
                            + " ...",
                            file=sys.stderr,
                        )
                        measurement = measure(args, target, scenario)
                        measurements.append(measurement)
                        if measurement.error:
                            problems.append(
                                f"{target.name} scenario {scenario}: {measurement.error}"
                            )
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            problems.append("interrupted")
        finally:
            if server is not None:
                stop_problem = server.stop()
                if stop_problem:
                    problems.append(stop_problem)
                info.setdefault("relaygate", {})["exit_code"] = server.exit_code
                log_lines = server.log_problems()
                if log_lines:
                    info["relaygate"]["log_problems"] = log_lines
                server.cleanup(args.keep_temp or bool(problems))
            if pg_server is not None:
                stop_problem = pg_server.stop()
                if stop_problem:
                    problems.append(f"on PostgreSQL: {stop_problem}")
                pg_problems = pg_server.log_problems()
                if pg_problems:
                    info.setdefault("relaygate-pg", {})["log_problems"] = pg_problems
                pg_server.cleanup(args.keep_temp or bool(problems))
            if poller is not None:
                poller.stop()
                info["dashboard"] = {"requests": poller.requests, "errors": poller.errors[:5]}
                if poller.errors:
                    problems.append(f"dashboard polling failed: {poller.errors[0]}")
            if http_server is not None:
                stop_problem = http_server.stop()
                if stop_problem:
                    problems.append(f"with HTTP on: {stop_problem}")
                http_server.cleanup(args.keep_temp or bool(problems))
            if retention_server is not None and retention_server.log_file.exists():
                log = retention_server.log_file.read_text(errors="replace")
                info["retention"] = {"pruned_events": log.count("retention.pruned")}
            for _, why, server_ in variants:
                stop_problem = server_.stop()
                if stop_problem:
                    problems.append(f"with {why}: {stop_problem}")
                server_.cleanup(args.keep_temp or bool(problems))
            if fake_dns is not None:
                info["domain_check"] = {"dns_queries": len(fake_dns.queries)}
                fake_dns.stop()
            if scratch is not None:
                scratch.drop()
            if postfix is not None:
                stop_problem = postfix.stop()
                if stop_problem:
                    problems.append(stop_problem)

    ratios = compute_ratios(measurements)
    pg_ratios = compute_ratios(measurements, "relaygate-pg", "relaygate")
    http_ratios = compute_ratios(measurements, "relaygate-http", "relaygate")
    retention_ratios = compute_ratios(measurements, "relaygate-retention", "relaygate")
    defence_ratios = compute_ratios(measurements, "relaygate", "relaygate-nodefence")
    domain_ratios = compute_ratios(measurements, "relaygate-domain-check", "relaygate")
    if measurements:
        print()
        print(format_table(table_rows(measurements, ratios, pg_ratios)))
        print()
        for m in measurements:
            for reason, count in sorted(m.load.get("failed", {}).items()):
                print(f"{m.target} scenario {m.scenario}: failed {reason}: {count}")
    for m in measurements:
        trees = m.figures()["server_cpu_ms_per_msg_by_tree"]
        if m.target == "relaygate-pg" and len(trees) > 1 and None not in trees:
            redis = f", Redis {trees[-1]:.2f}" if args.redis and len(trees) > 2 else ""
            databases = trees[1:-1] if redis else trees[1:]
            print(
                f"relaygate-pg scenario {m.scenario}: CPU ms/msg relaygate {trees[0]:.2f},"
                f" PostgreSQL {sum(databases):.2f} (all of the cluster's databases){redis}"
            )
        other = m.other_cpu_s()
        if other is not None and m.machine_busy_s > 0 and other > 0.1 * m.machine_busy_s:
            print(
                f"note: during {m.target} scenario {m.scenario}, other processes used {other:.2f}"
                f" CPU-s ({other / m.machine_busy_s:.0%} of the busy CPU): the machine-wide"
                " CPU figure counts them, the process figure does not"
            )
    for scenario, figures in http_ratios.items():
        print(
            f"HTTP on + dashboard polling / HTTP off, scenario {scenario}: "
            + ", ".join(f"{key} {cell(value)}" for key, value in figures.items())
        )
    for scenario, figures in retention_ratios.items():
        print(
            f"retention pruning all the time / retention idle, scenario {scenario}: "
            + ", ".join(f"{key} {cell(value)}" for key, value in figures.items())
        )
    for scenario, figures in defence_ratios.items():
        print(
            f"defence on / defence off, scenario {scenario}: "
            + ", ".join(f"{key} {cell(value)}" for key, value in figures.items())
        )
    for scenario, figures in domain_ratios.items():
        print(
            f"check_recipient_domains on / off, scenario {scenario}: "
            + ", ".join(f"{key} {cell(value)}" for key, value in figures.items())
        )
    if "domain_check" in info:
        print(f"DNS queries the domain check made: {info['domain_check']['dns_queries']}")
    if "retention" in info:
        print(f"retention rounds that removed something: {info['retention']['pruned_events']}")
    if "dashboard" in info:
        print(f"dashboard requests during the run: {info['dashboard']['requests']}")
    log_problems = info.get("relaygate", {}).get("log_problems", [])
    if log_problems:
        print("relaygate log lines that look like trouble:")
        for line in log_problems:
            print("  " + line)
    for problem in problems:
        print(f"PROBLEM: {problem}")

    report = {
        "info": info,
        "scenarios": {name: SCENARIOS[name][2] for name in scenarios},
        "results": [m.to_json() for m in measurements],
        "ratios_relaygate_over_postfix": ratios,
        "ratios_postgresql_over_sqlite": pg_ratios,
        "ratios_http_on_over_off": http_ratios,
        "ratios_retention_pruning_over_idle": retention_ratios,
        "ratios_defence_on_over_off": defence_ratios,
        "ratios_domain_check_on_over_off": domain_ratios,
        "problems": problems,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"results written to {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
