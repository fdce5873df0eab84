"""The HTTP process: uvicorn serving http/app.py on the socket the supervisor
bound. A process of its own (like delivery), so the admin API and its database
reads never take time from the SMTP workers' event loops."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn
from starlette.applications import Starlette

from relaygate import logs
from relaygate.config import Config
from relaygate.http.app import create_app
from relaygate.http.context import HttpContext
from relaygate.server import reload
from relaygate.server.tls import (
    TLSSetupError,
    certificate_pairs,
)

MAX_CONNECTIONS = 1000


def run_http(config: Config, sock: socket.socket) -> int:
    assert config.http is not None
    certfile = keyfile = None
    pairs = []
    if config.http.tls:
        try:
            pairs = certificate_pairs(config)[:1]
            certfile, keyfile = (str(p) for p in pairs[0])
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
    certificates = (
        reload.CertificateWatch(config, settings.ssl, pairs, "http")
        if settings.ssl is not None
        else None
    )

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
    server: uvicorn.Server,
    sock: socket.socket,
    app: Starlette,
    certificates: reload.CertificateWatch | None,
) -> None:
    def reload_config() -> None:
        context: HttpContext | None = getattr(app.state, "context", None)
        if context is None:
            return  # not started yet: it reads the file as it is
        new = reload.reload_config(context.config, "http")
        if new is None:
            return
        context.config = new
        context.logins.config = new.auth_throttle
        context.admin.webhooks.reconfigure(new.webhooks)
        if certificates is not None:
            certificates.config = new
            certificates.check()

    async def watch(certificates: reload.CertificateWatch) -> None:
        while True:
            await asyncio.sleep(reload.WATCH_INTERVAL)
            certificates.check()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload_config)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    watching = asyncio.create_task(watch(certificates)) if certificates is not None else None
    try:
        await server.serve(sockets=[sock])
    finally:
        if watching is not None:
            watching.cancel()
