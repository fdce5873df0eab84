"""The HTTP process: uvicorn serving http/app.py on the socket the supervisor
bound. A process of its own (like delivery), so the admin API and its database
reads never take time from the SMTP workers' event loops."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn

from relaygate import logs
from relaygate.config import Config
from relaygate.http.app import create_app
from relaygate.server.tls import TLSSetupError, certificate_pairs

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
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
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
    asyncio.run(server.serve(sockets=[sock]))
    return 0
