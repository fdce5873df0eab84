"""The HTTP process: uvicorn serving http/app.py on the socket the supervisor
bound. A process of its own (like delivery), so the admin API and its database
reads never take time from the SMTP workers' event loops."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from relaygate import logs
from relaygate.config import Config
from relaygate.http.app import create_app
from relaygate.http.context import HttpContext
from relaygate.server import reload
from relaygate.server.tls import (
    TLSSetupError,
    certificate_not_after,
    certificate_pairs,
    certificate_pairs_quiet,
)

MAX_CONNECTIONS = 1000


def run_http(config: Config, sock: socket.socket) -> int:
    assert config.http is not None
    certfile = keyfile = None
    if config.http.tls:
        try:
            certfile, keyfile = (str(p) for p in certificate_pairs(config)[0])
        except TLSSetupError as exc:
            logs.event("http.error", logging.ERROR, reason=str(exc))
            return 1
    app = create_app(config)
    settings = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,  # our logs, not uvicorn's
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        timeout_graceful_shutdown=5,
        limit_concurrency=MAX_CONNECTIONS,  # past it: 503 at once, not memory
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers
    )
    settings.load()
    server = uvicorn.Server(settings)
    certificates = _Certificates(config, settings.ssl) if settings.ssl is not None else None

    # uvicorn handles SIGTERM/SIGINT while it serves, then raises the signal again
    # for the handler it found. Ours asks the server to stop: a stop that came
    # before uvicorn took over (held back since the fork) is not lost, and one
    # raised again afterwards ends the process with 0, not "killed by SIGTERM".
    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    logs.event("http.start", address=config.http.address, url=config.http.url)
    asyncio.run(_serve(server, sock, app, certificates))
    return 0


async def _serve(
    server: uvicorn.Server, sock: socket.socket, app: Starlette, certificates: _Certificates | None
) -> None:
    def reload_config() -> None:
        context: HttpContext | None = getattr(app.state, "context", None)
        if context is None:
            return  # not started yet: it reads the file as it is
        new = reload.reload_config(context.config, "http")
        if new is None:
            return
        reload.apply_logging(new)
        context.config = new
        context.logins.config = new.auth_throttle
        context.admin.webhooks.reconfigure(new.webhooks)
        if certificates is not None:
            certificates.config = new
            certificates.check()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload_config)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    watching = asyncio.create_task(certificates.watch()) if certificates is not None else None
    try:
        await server.serve(sockets=[sock])
    finally:
        if watching is not None:
            watching.cancel()


class _Certificates:
    """HTTPS: a renewed certificate is used for new connections within seconds
    (uvicorn's context stays; its SNI callback moves handshakes to the newest)."""

    def __init__(self, config: Config, front: ssl.SSLContext) -> None:
        self.config = config
        self.front = front
        self.current = front
        self.files = self._files()
        self.signature = reload.signature(self.files)

    def _files(self) -> list[Path]:
        return list(certificate_pairs_quiet(self.config)[0])

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(reload.WATCH_INTERVAL)
            self.check()

    def check(self, force: bool = False) -> None:
        files = self._files()
        signature = reload.signature(files)
        if not force and (files, signature) == (self.files, self.signature):
            return
        self.files, self.signature = files, signature
        try:
            cert, key = certificate_pairs(self.config)[0]
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
        except (TLSSetupError, OSError, ssl.SSLError) as exc:
            logs.event("tls.reload_failed", logging.ERROR, worker="http", reason=str(exc))
            return
        self.current = context
        self.front.sni_callback = self._pick
        logs.event(
            "tls.reloaded", worker="http", cert=str(cert), not_after=certificate_not_after(cert)
        )

    def _pick(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if connection.context is not self.current:
            connection.context = self.current
