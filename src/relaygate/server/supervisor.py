"""``relaygate serve``: check everything, bind the listeners, run the workers.

The supervisor does all that can fail for a reason an admin must fix (data
directory, database, certificates, ports) before any worker starts, and
reports each problem as one line with exit status 2. Then it forks the
workers, which share the listening sockets (the kernel hands each new
connection to whichever worker accepts first, so a busy worker takes fewer).
A worker that dies is restarted; SIGTERM is passed on and awaited.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import resource
import secrets
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from types import FrameType

from relaygate import __version__, logs, metrics
from relaygate.accounts.store import AccountStore
from relaygate.config import Config, ListenerConfig
from relaygate.delivery.engine import run_delivery
from relaygate.http.server import run_http
from relaygate.server import reload
from relaygate.server.connlimit import ConnectionLimiter
from relaygate.server.tls import TLSSetupError, certificate_pairs, server_context
from relaygate.server.worker import BoundListener, run_worker
from relaygate.services.admin import AccountsAdmin
from relaygate.storage import bodies
from relaygate.storage import sqlite as storage
from relaygate.storage.files import private_directory, shared_bits, tighten
from relaygate.storage.postgres import pool as postgres_pool
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.postgres.pool import PostgresUnavailable
from relaygate.storage.redis import client as redis_client
from relaygate.storage.redis.client import RedisUnavailable
from relaygate.storage.sqlite_backend import SQLiteStorage

PR_SET_PDEATHSIG = 1
QUICKSTART_ADDRESS = "dev@example.test"
QUICKSTART_SENDERS = ("@example.test",)


class StartupError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _bind(listener: ListenerConfig, index: int) -> socket.socket:
    return _bind_address(listener.host, listener.port, f"listeners[{index}] {listener.address}")


def bind_http(config: Config) -> socket.socket | None:
    """The [http] listener's socket, bound here so a busy port stops ``serve`` at once."""
    if config.http is None:
        return None
    return _bind_address(config.http.host, config.http.port, f"http {config.http.address}")


def _bind_address(host: str, port: int, label: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = {
            errno.EADDRINUSE: "address already in use",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "address not available on this machine",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise StartupError([f"{label}: {reason}"]) from None
    except (socket.gaierror, UnicodeError) as exc:
        sock.close()
        raise StartupError([f"{label}: {exc}"]) from None
    return sock


def bind_all(config: Config) -> list[BoundListener]:
    bound: list[BoundListener] = []
    problems: list[str] = []
    for index, listener in enumerate(config.listeners):
        try:
            bound.append((_bind(listener, index), listener))
        except StartupError as exc:
            problems += exc.problems
    if problems:
        for sock, _ in bound:
            sock.close()
        raise StartupError(problems)
    return bound


def prepare(config: Config) -> None:
    """Data directory, database schema, certificates, quickstart account."""
    try:
        if config.data_dir.exists():
            _check_private(config.data_dir)
        else:
            private_directory(config.data_dir)
    except OSError as exc:
        raise StartupError([f"data_dir {config.data_dir}: {exc.strerror or exc}"]) from None
    _lock_data_dir(config.data_dir)
    if config.storage.url is not None:
        try:
            asyncio.run(_prepare_shared(config))
        except PostgresUnavailable as exc:
            raise StartupError([f"storage: {exc}"]) from None
    if config.shared.redis_url is not None:
        # Later a Redis that goes away only means node-local throttles for a while;
        # at start a wrong URL or password is a mistake to fix now.
        try:
            asyncio.run(redis_client.check(config.shared.redis_url))
        except RedisUnavailable as exc:
            raise StartupError([f"shared.redis_url: {exc}"]) from None
    try:
        # Made here, before the workers, so they never race to create it.
        storage.connect_state(storage.state_path(config.database_path)).close()
    except storage.DatabaseError as exc:
        raise StartupError([f"database {exc}"]) from None
    if config.storage.url is None:
        _prepare_local(config)
    try:
        server_context(certificate_pairs(config))
    except (TLSSetupError, OSError) as exc:
        raise StartupError([f"tls: {exc}"]) from None


async def _prepare_shared(config: Config) -> None:
    """PostgreSQL: the schema brought up to date, and no second node without Redis."""
    url = config.storage.url
    assert url is not None
    before, after = await postgres_pool.migrate(url)
    if before != after:
        logs.event("storage.migrated", before=before, after=after)
    shared = await PostgresStorage.open(url, 1, _nothing)
    try:
        if config.shared.redis_url is None:
            others = await shared.nodes.others_alive(config.node_name)
            if others:
                raise StartupError(
                    [
                        f"[shared] redis_url is required: node(s) {', '.join(others)} also use"
                        f" {postgres_pool.describe(url)}, and without Redis each node would keep"
                        " its own login throttles and connection counts"
                    ]
                )
        await shared.nodes.heartbeat(config.node_name, time.time(), os.getpid(), __version__)
    finally:
        await shared.close()


async def _nothing() -> None:
    pass


LOCK_FILE = "serve.lock"
LOCK_PATIENCE = 30.0  # seconds to wait for a previous instance that is still draining
_lock_fd: int | None = None  # held (and inherited by every child) for the life of serve


def _lock_data_dir(data_dir: Path) -> None:
    """One ``serve`` per data_dir: two would run two delivery engines (duplicate
    deliveries) and one's start-up clean-up could remove the other's new files.

    The lock is an flock on data_dir/serve.lock, inherited by the workers, so
    it is free only once every process of the previous instance has exited; a
    restart waits up to LOCK_PATIENCE for a draining one.
    """
    global _lock_fd
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError([f"data_dir {data_dir}: {exc.strerror or exc}"]) from None
    deadline = time.monotonic() + LOCK_PATIENCE
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            # The supervisor alive: another serve runs. Gone: its workers are
            # still draining after it died; they will let go soon.
            if _alive(holder) or time.monotonic() >= deadline:
                os.close(fd)
                raise StartupError(
                    [f"another relaygate serve (pid {holder or '?'}) is using data_dir {data_dir}"]
                ) from None
            if not waiting:
                waiting = True
                print(
                    f"relaygate: waiting for the workers of relaygate serve {holder or '?'}"
                    f" to let go of {data_dir}",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    _lock_fd = fd


def _alive(pid_text: str) -> bool:
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Files of ours that an older relaygate (or a loose umask) may have left readable.
_PRIVATE_FILES = (
    "relaygate.db",
    "relaygate.db-wal",
    "relaygate.db-shm",
    "throttle.db",
    "throttle.db-wal",
    "throttle.db-shm",
    "changes",
)


def _check_private(data_dir: Path) -> None:
    """Warn about a data_dir others can enter; make our own files in it private."""
    bits = shared_bits(data_dir)
    if bits:
        mode = stat.S_IMODE(data_dir.stat().st_mode)
        text = (
            f"data_dir {data_dir} is accessible to other users (mode {mode:o}): it holds"
            f" password hashes, keys and mail; run: chmod 700 {data_dir}"
        )
        print(f"relaygate: warning: {text}", file=sys.stderr, flush=True)
        logs.event("data_dir.shared", logging.WARNING, path=str(data_dir), mode=f"{mode:o}")
    for name in _PRIVATE_FILES:
        if tighten(data_dir / name):
            logs.event("file.tightened", logging.WARNING, path=str(data_dir / name), mode="600")


def _prepare_local(config: Config) -> None:
    """The SQLite database of one machine: made or upgraded, a quickstart account,
    body files a crash left without a row removed."""
    try:
        db = storage.connect(config.database_path)
    except storage.DatabaseError as exc:
        raise StartupError([f"database {exc}"]) from None
    try:
        if config.quickstart and AccountStore(db).count() == 0:
            _create_quickstart_account(config)
        # No spool writer runs yet: a body file without a row is from a crash.
        removed = bodies.remove_orphans(db, bodies.directory_for(config.database_path))
        if removed:
            logs.event("spool.orphans_removed", files=removed)
    except OSError as exc:
        raise StartupError([f"data_dir {config.data_dir}: {exc.strerror or exc}"]) from None
    finally:
        db.close()


def _create_quickstart_account(config: Config) -> None:
    password = secrets.token_urlsafe(18)

    async def add() -> None:
        store = SQLiteStorage(config.database_path)
        try:
            admin = AccountsAdmin(store.accounts, config.password_hash)
            await admin.add(QUICKSTART_ADDRESS, password, [QUICKSTART_ADDRESS, *QUICKSTART_SENDERS])
            await admin.set_admin(QUICKSTART_ADDRESS, True)  # it logs in to the web UI
        finally:
            await store.close()

    asyncio.run(add())
    web = (
        f"    web UI:   {config.http.url}/ (this account is an admin there)\n"
        if config.http
        else ""
    )
    print(
        "relaygate: created a quickstart account (the password is shown only this once):\n"
        f"    login:    {QUICKSTART_ADDRESS}\n"
        f"    password: {password}\n"
        f"    may send as: {QUICKSTART_ADDRESS}, any address {QUICKSTART_SENDERS[0]}\n"
        f"{web}"
        "  more: relaygate user add ADDRESS --sender @yourdomain.example",
        flush=True,
    )


def _describe(config: Config) -> str:
    kinds = {"starttls": "STARTTLS", "implicit": "implicit TLS", "none": "no TLS"}
    listeners = ", ".join(
        f"{item.address} ({kinds[item.tls]}"
        f"{', plaintext AUTH (dev port)' if item.allow_plaintext_auth else ''}"
        f"{', PROXY protocol' if item.proxy_protocol else ''})"
        for item in config.listeners
    )
    admin = (
        f"; web UI: {config.http.url}/; admin API: {config.http.url}/api/v1"
        if config.http is not None
        else ""
    )
    return (
        f"relaygate: listening on {listeners}; {config.worker_count()} worker(s); "
        f"delivery: {config.delivery.mode}; data: {config.data_dir}{admin}"
    )


def _warn_about_listeners(config: Config) -> None:
    """A listener without TLS takes no login (passwords never cross it in clear)
    unless it is a loopback dev port with allow_plaintext_auth: say so, since
    no mail can be sent through it."""
    for listener in config.listeners:
        if listener.tls == "none" and not listener.allow_plaintext_auth:
            logs.event(
                "listener.no_auth",
                logging.WARNING,
                listener=listener.address,
                reason="tls = none: AUTH needs TLS, so this listener can never accept mail"
                " (allow_plaintext_auth = true is allowed on loopback addresses only)",
            )


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
HELD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}  # held during start-up: none lost, none fatal


def _raise_file_limit() -> None:
    """Every connection is a file descriptor: use the hard limit, not the soft 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass  # not allowed here: keep what we have


def serve(config: Config) -> int:
    reload.apply_logging(config)
    _raise_file_limit()
    # Hold SIGTERM/SIGINT until every process has its handler: a stop request
    # that arrives during start-up is then delivered, not lost or fatal. Each
    # worker unblocks them once its event loop handles them (worker.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        prepare(config)
        listeners = bind_all(config)
        try:
            http = bind_http(config)
        except StartupError:
            for sock, _ in listeners:
                sock.close()
            raise
    except StartupError as exc:
        for problem in exc.problems:
            print(f"relaygate: {problem}", file=sys.stderr)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        return 2
    if config.http is not None and config.http.metrics:
        # Before any fork and any metric: every process writes its values where
        # the HTTP process reads them all (metrics.py).
        try:
            metrics.enable(config.data_dir)
        except OSError as exc:
            print(f"relaygate: data_dir {config.data_dir}: metrics: {exc}", file=sys.stderr)
            for sock, _ in listeners:
                sock.close()
            if http is not None:
                http.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
            return 2
    print(_describe(config), flush=True)
    _warn_about_listeners(config)
    logs.event("start", workers=config.worker_count(), pid=os.getpid())
    count = config.worker_count()
    # Shared by every worker (an anonymous shared mapping made before fork).
    limiter = ConnectionLimiter(config.connection_limits)
    if config.single_process():
        return run_worker(config, 0, listeners, limiter, standalone=True)
    return _supervise(config, listeners, count, limiter, http)


DELIVERY = -1  # worker index of the delivery process
HTTP = -2  # worker index of the HTTP process (admin API)


def _fork_worker(
    config: Config,
    index: int,
    listeners: list[BoundListener],
    limiter: ConnectionLimiter,
    http: socket.socket | None,
) -> int:
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # Not the supervisor's reload handler; each process sets its own.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _die_with_parent()
            if index in (DELIVERY, HTTP):
                for sock, _ in listeners:
                    sock.close()  # they take no SMTP connections
            elif http is not None:
                http.close()
            if index == DELIVERY:
                if http is not None:
                    http.close()
                status = run_delivery(config)
            elif index == HTTP:
                assert http is not None
                status = run_http(config, http)
            else:
                status = run_worker(config, index, listeners, limiter)
        except BaseException as exc:  # a worker must never return into the parent's code
            logs.event("worker.crash", worker=index, error=repr(exc))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return pid


def _die_with_parent() -> None:
    """Linux: get SIGTERM if the supervisor dies, so no orphan keeps the ports."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned worker still drains on its own SIGTERM


def _supervise(
    config: Config,
    listeners: list[BoundListener],
    count: int,
    limiter: ConnectionLimiter,
    http: socket.socket | None = None,
) -> int:
    workers: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            # Our copies of the listening sockets would keep accepting into the
            # backlog while the workers drain; close them so clients get a refusal.
            for sock, _ in listeners:
                sock.close()
            if http is not None:
                http.close()
        stopping = True
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def reload_all(signum: int, frame: FrameType | None) -> None:
        """SIGHUP: check the file here; only a good one reaches the children,
        which each re-read it and apply what can change (server/reload.py)."""
        nonlocal config
        if stopping:
            return
        new = reload.answer(config, "supervisor")
        if new is None:
            return
        config = new  # workers started from now on get it too
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload_all)
    indexes = list(range(count))
    if config.runs_delivery_process():
        indexes.append(DELIVERY)
    if http is not None:
        indexes.append(HTTP)
    for index in indexes:
        workers[_fork_worker(config, index, listeners, limiter, http)] = index
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # a pending stop runs here
    restarts: list[float] = []
    failed = False
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in workers:
            continue
        index = workers.pop(pid)
        metrics.process_gone(pid)  # its open connections no longer count
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed = failed or code != 0
            continue
        logs.event("worker.exit", worker=index, pid=pid, status=code)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10:
            print(
                "relaygate: workers keep dying (10 restarts in a minute); stopping", file=sys.stderr
            )
            stop(signal.SIGTERM, None)
            failed = True
            continue
        workers[_fork_worker(config, index, listeners, limiter, http)] = index
    for signum in HELD_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # already stopping; a repeat must not kill us
    for sock, _ in listeners:
        sock.close()
    if http is not None:
        http.close()
    logs.event("stop")
    return 1 if failed else 0
