"""One worker process: an event loop serving the shared listening sockets.

Each worker owns its services (account look-ups, argon2 thread pool, spool
writer thread) and its connections. SIGTERM drains it: listeners close,
idle sessions get 421, transactions in flight may finish within
``limits.shutdown_grace``, the spool commits what it holds, exit 0.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import os
import signal
import socket
import ssl
import time
from typing import Any

from relaygate import __version__, logs, stats
from relaygate.accounts.changes import ChangeSignal
from relaygate.accounts.directory import Directory
from relaygate.accounts.passwords import PasswordHasher
from relaygate.config import Config, ListenerConfig
from relaygate.eventloop import new_event_loop
from relaygate.oauth import OAuthTokens
from relaygate.sasl import BEARER_MECHANISMS
from relaygate.server import reload
from relaygate.server.connection import SMTPConnection
from relaygate.server.connlimit import ConnectionLimiter
from relaygate.server.listener import ProxyListener
from relaygate.server.tls import (
    certificate_pairs,
    server_context,
)
from relaygate.services import retention
from relaygate.services.defence import DefenceService
from relaygate.services.login import LoginService
from relaygate.services.submission import SubmissionService
from relaygate.smtp.session import Settings
from relaygate.storage.errors import STORAGE_ERRORS
from relaygate.storage.node import NodeStorage, open_node_storage
from relaygate.storage.postgres.nodes import HEARTBEAT, PostgresNodes
from relaygate.storage.redis.changes import ChangeRelay
from relaygate.storage.redis.connections import RedisConnectionCounts
from relaygate.storage.redis.fallback import SHARED_ERRORS, SharedHealth
from relaygate.verify.domain_check import RecipientDomains
from relaygate.webhooks.configured import config_endpoints
from relaygate.webhooks.notices import EventNotices

BoundListener = tuple[socket.socket, ListenerConfig]


def session_settings(
    config: Config, listener: ListenerConfig, channel_bindings: tuple[bytes, ...] = ()
) -> Settings:
    limits = config.limits
    return Settings(
        hostname=config.hostname,
        max_message_size=limits.max_message_size,
        max_recipients=limits.max_recipients,
        max_bad_commands=limits.max_bad_commands,
        max_commands_before_login=limits.max_commands_before_login,
        starttls_available=listener.tls == "starttls",
        channel_bindings=channel_bindings if listener.tls != "none" else (),
        # A loopback development port (config.py allows it nowhere else).
        auth_without_tls=listener.tls == "none" and listener.allow_plaintext_auth,
        # [oauth] set: bearer tokens too (the session offers them over TLS only).
        auth_mechanisms=Settings.auth_mechanisms + (BEARER_MECHANISMS if config.oauth else ()),
    )


class Worker:
    def __init__(
        self,
        config: Config,
        index: int,
        loop: asyncio.AbstractEventLoop,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.loop = loop
        self.connections: set[SMTPConnection] = set()
        self.max_connections = config.limits.max_connections
        self.draining = False
        self._stopped = asyncio.Event()
        pairs = certificate_pairs(config)
        # Every handshake starts on this context; once the certificate files
        # change, its SNI callback moves handshakes to the newest (reload.py).
        self.tls_context: ssl.SSLContext = server_context(pairs)
        self.certificates = reload.CertificateWatch(config, self.tls_context, pairs, str(index))
        self.listener_settings: dict[str, Settings] = {}  # by listener address
        self.standalone = False  # no supervisor: this process answers SIGHUP alone
        self.changes = ChangeSignal(config.data_dir)
        if self.changes.problem:
            logs.event("changes.unavailable", logging.WARNING, reason=self.changes.problem)
        self.limiter = limiter
        self.shared_connections: RedisConnectionCounts | None = None
        # Made in run(), before any listener: the storage may need a round trip.
        self.storage: NodeStorage
        self.logins: LoginService
        self.oauth: OAuthTokens | None = None
        self.submission: SubmissionService

    async def _open_storage(self) -> None:
        """Every storage call made while serving runs off the event loop (a thread,
        or an async pool): a lock held elsewhere must not freeze every session."""
        config = self.config
        self.storage = await open_node_storage(
            config, self.loop, deliver=config.delivery.mode != "capture"
        )
        notices = self._notices()
        self.submission = SubmissionService(
            hostname=config.hostname,
            # Which node took the message, when several share the storage.
            node=config.node_name if config.storage.url else None,
            sending_limits=config.sending_limits,
            capture=config.delivery.mode == "capture",
            counters=self.storage.counters,
            acceptance=self.storage.acceptance,
            notices=notices,
            defence=DefenceService(config.defence, self.storage.defence, notices=notices),
            recipient_domains=_recipient_domains(config),
        )
        self.oauth = OAuthTokens(config.oauth) if config.oauth is not None else None
        if self.oauth is not None:
            # The keys are fetched meanwhile; a login that comes first waits for them.
            await self.oauth.start(wait=False)
        self.logins = LoginService(
            accounts=self.storage.accounts,
            credentials=self.storage.credentials,
            failures=self.storage.failures,
            throttle_config=config.auth_throttle,
            hasher=PasswordHasher(config.password_hash),
            decoy_key=await LoginService.decoy_key(self.storage.secrets),
            loop=self.loop,
            notices=notices,
            oauth=self.oauth,
            directory=Directory(config.ldap, self.loop) if config.ldap else None,
        )
        self._servers: list[asyncio.Server] = []
        self._proxy_listeners: list[ProxyListener] = []
        self._pruning: asyncio.Future[None] | None = None
        self._beating: asyncio.Future[None] | None = None
        self._started = time.time()
        self._unshared_logged = -60.0
        self._relay: ChangeRelay | None = None
        self._connection_health = SharedHealth("connection_counts")
        self._releases: set[asyncio.Future[None]] = set()
        if self.storage.redis is not None:
            counts = RedisConnectionCounts.for_process(
                self.storage.redis, config.connection_limits, config.node_name
            )
            if counts.active:
                try:
                    await counts.renew()  # our counts count from the first connection
                except SHARED_ERRORS as exc:
                    self._connection_health.failed(exc)
                counts.start()
                self.shared_connections = counts
        if self.index == 0 and self.storage.redis is not None:
            # Changes made on other nodes reach this machine's sessions.
            self._relay = ChangeRelay(self.storage.redis, config.data_dir)
            self._relay.start()

    async def run(self, listeners: list[BoundListener]) -> None:
        loop = self.loop
        loop.set_exception_handler(_quiet_exception_handler)
        await self._open_storage()
        self._listeners = [listener for _, listener in listeners]
        self._make_settings()
        for sock, listener in listeners:
            settings = self.listener_settings[listener.address]
            implicit = listener.tls == "implicit"
            if listener.proxy_protocol:
                # PROXY header first, then TLS: not an asyncio.Server (server/listener.py).
                proxied = ProxyListener(self, sock, listener, settings)
                proxied.start()
                self._proxy_listeners.append(proxied)
                continue

            def factory(implicit: bool = implicit, name: str = listener.address) -> SMTPConnection:
                # The settings of now: a reload may have changed them.
                return SMTPConnection(self, self.listener_settings[name], implicit, listener=name)

            server = await loop.create_server(
                factory,
                sock=sock,
                ssl=self.tls_context if implicit else None,
                ssl_handshake_timeout=(
                    self.config.limits.tls_handshake_timeout if implicit else None
                ),
                backlog=1024,
            )
            self._servers.append(server)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.begin_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # The supervisor blocked these until now (see supervisor.serve): a stop
        # request that came during start-up is delivered here, to our handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        sweeper = asyncio.ensure_future(self._sweep())
        flusher = asyncio.ensure_future(stats.flush_forever(self.storage.stats))
        pruner = (
            asyncio.ensure_future(retention.run_forever(self.config, lambda: self.config.retention))
            if retention.runs_here(self.config, self.index)
            else None
        )
        await self._stopped.wait()
        flusher.cancel()
        if pruner is not None:
            pruner.cancel()
            await asyncio.gather(pruner, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)  # already stopping: a repeat must not kill us
        sweeper.cancel()
        if self._relay is not None:
            await self._relay.stop()
        if self.shared_connections is not None:
            await self.shared_connections.stop()
        await stats.flush(self.storage.stats)  # the counts since the last flush
        # Messages handed over are committed first, whatever else is cut short;
        # then the storage closes with its own tasks (a pool's workers), and a
        # decision still waiting on it gets an error it already knows how to take.
        await self.storage.close()
        # Decisions still pending (a delayed failure reply, a prune) belong to
        # connections that are gone: end them here, not as "destroyed" tasks.
        pending = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.logins.close()
        if self.oauth is not None:
            await self.oauth.close()
        self.changes.close()

    # ------------------------------------------------------------- reloading

    def _make_settings(self) -> None:
        for listener in self._listeners:
            settings = session_settings(self.config, listener, self.certificates.bindings)
            self.listener_settings[listener.address] = settings
        for proxied in self._proxy_listeners:
            proxied.settings = self.listener_settings[proxied.listener.address]

    def reload(self) -> None:
        """SIGHUP: the configuration file again, applied to new sessions and
        to the limits every session reads; open connections stay."""
        if self.standalone:
            new = reload.answer(self.config, "server")
        else:
            new = reload.reload_config(self.config, f"worker {self.index}")
        if new is None:
            return
        self.config = self.certificates.config = new
        self.max_connections = new.limits.max_connections
        notices = self._notices()
        self.submission.reconfigure(
            new.hostname, new.sending_limits, notices, _recipient_domains(new)
        )
        if self.submission.defence is not None:
            self.submission.defence.reconfigure(new.defence, notices)
        self.logins.config = new.auth_throttle
        self.logins.notices = notices
        self.certificates.check()
        self._make_settings()  # the hostname, limits and certificate of now

    def _notices(self) -> EventNotices | None:
        if self.storage.webhooks is None:
            return None
        return EventNotices(
            self.storage.webhooks, config_endpoints(self.config.webhooks, with_secrets=False)
        )

    def generation(self) -> int:
        """The account-change signal's current value (see accounts/changes.py)."""
        return self.changes.value()

    async def admit_shared(self, client_ip: str) -> tuple[bool, str | None]:
        """(counted in Redis, the rule refusing or None)."""
        counts = self.shared_connections
        if counts is None:
            return False, None

        async def shared() -> tuple[bool, str | None]:
            refused = await counts.open(client_ip, time.time())
            return refused is None, refused

        async def local() -> tuple[bool, str | None]:  # Redis away: this machine's limiter decided
            return False, None

        return await self._connection_health.call(shared, local)

    def release_shared(self, client_ip: str) -> None:
        counts = self.shared_connections
        if counts is None:
            return

        async def release() -> None:
            try:
                await counts.close(client_ip)
            except SHARED_ERRORS as exc:  # the holder's lease bounds the leak
                self._connection_health.failed(exc)

        task = asyncio.ensure_future(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _prune(self) -> None:
        try:
            await self.logins.prune()
            await self.storage.counters.prune(time.time())
            await stats.prune(self.storage.stats, time.time())
        except STORAGE_ERRORS as exc:
            logs.event("prune.error", logging.WARNING, reason=" ".join(str(exc).split()))

    async def _heartbeat(self, nodes: PostgresNodes) -> None:
        """This node is alive (``relaygate nodes``); and no other node shares the
        database without Redis (each would keep its own throttles)."""
        config = self.config
        try:
            await nodes.heartbeat(config.node_name, self._started, os.getpid(), __version__)
            if config.shared.redis_url is None:
                others = await nodes.others_alive(config.node_name)
                if others and self.loop.time() >= self._unshared_logged + 60:
                    self._unshared_logged = self.loop.time()
                    logs.event(
                        "cluster.unshared",
                        logging.ERROR,
                        nodes=",".join(others),
                        reason="[shared] redis_url is required when nodes share a database",
                    )
        except STORAGE_ERRORS as exc:
            logs.event("heartbeat.error", logging.WARNING, reason=" ".join(str(exc).split()))

    def begin_shutdown(self) -> None:
        if self.draining:
            return
        self.draining = True
        logs.event("shutdown.start", worker=self.index, connections=len(self.connections))
        for server in self._servers:
            server.close()
        for proxied in self._proxy_listeners:
            proxied.close()

    async def _sweep(self) -> None:
        deadline: float | None = None
        next_prune = 0.0
        next_heartbeat = 0.0
        next_watch = self.loop.time() + reload.WATCH_INTERVAL
        while True:
            await asyncio.sleep(0.1 if self.draining else 1.0)
            now = self.loop.time()
            if self.index == 0 and now >= next_prune:
                next_prune = now + PRUNE_INTERVAL
                self._pruning = asyncio.ensure_future(self._prune())  # held: tasks are weak
            if self.index == 0 and self.storage.nodes is not None and now >= next_heartbeat:
                next_heartbeat = now + HEARTBEAT
                self._beating = asyncio.ensure_future(self._heartbeat(self.storage.nodes))
            if now >= next_watch and not self.draining:
                next_watch = now + reload.WATCH_INTERVAL
                if self.certificates.check():  # a renewed certificate, with no signal needed
                    self._make_settings()
            for connection in list(self.connections):
                connection.check_timeouts(now)
            if not self.draining:
                continue
            if deadline is None:
                deadline = now + self.config.limits.shutdown_grace
            force = now >= deadline
            for connection in list(self.connections):
                connection.drain(force)
            if not self.connections or now >= deadline + 2:
                logs.event("shutdown.done", worker=self.index)
                self._stopped.set()
                return


PRUNE_INTERVAL = 600.0  # seconds between clean-ups of old throttle and quota rows


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """TLS handshake failures and resets by clients are routine: one debug line."""
    exc = context.get("exception")
    if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError | asyncio.TimeoutError):
        logs.event("connection.error", logging.DEBUG, reason=type(exc).__name__)
        return
    logs.event(
        "internal.error",
        logging.ERROR,
        message=str(context.get("message")),
        exception=repr(exc) if exc else None,
    )


def run_worker(
    config: Config,
    index: int,
    listeners: list[BoundListener],
    limiter: ConnectionLimiter | None = None,
    standalone: bool = False,
) -> int:
    """Run one worker until it is told to stop; returns the exit status.
    ``standalone``: no supervisor (one worker, capture mode, no HTTP)."""
    loop = new_event_loop()
    profile_path = os.environ.get("RELAYGATE_PROFILE")  # bench/: where the CPU goes
    profiler = cProfile.Profile() if profile_path else None
    try:
        worker = Worker(config, index, loop, limiter)
        worker.standalone = standalone
        if profiler is not None:
            profiler.enable()
        loop.run_until_complete(worker.run(listeners))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_path}.{index}")
        loop.close()
    return 0


def _recipient_domains(config: Config) -> RecipientDomains | None:
    """The RCPT-time domain check, when [submission] check_recipient_domains is on."""
    return RecipientDomains(config) if config.submission.check_recipient_domains else None
