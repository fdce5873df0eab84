"""Listeners behind a load balancer: the PROXY protocol header, then TLS and SMTP.

A listener with ``proxy_protocol = true`` does not hand its connections to an
``asyncio.Server``. It accepts them itself and, before any transport exists:

1. closes at once a peer outside ``proxy_trusted`` (a client must not be able
   to name its own address);
2. reads the PROXY header (server/proxy.py) within ``header_timeout``, with
   ``MSG_PEEK`` first so it never takes a byte past the header: what follows
   (a TLS ClientHello, pipelined SMTP) stays in the socket for the transport;
3. hands the socket to the event loop with ``connect_accepted_socket``, with
   ``ssl=`` on implicit-TLS listeners: the handshake runs after the header,
   exactly as on a plain implicit-TLS listener (``loop.start_tls`` on a transport
   would lose bytes the client sent right behind the header).

From then on the connection is an ordinary ``SMTPConnection`` whose client is
the address in the header: the per-IP connection limit (checked in its
``connection_made``), logs, throttles, Received and the message log see that
address; the balancer's address is logged as ``proxy``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl

from relaygate import logs
from relaygate.config import ListenerConfig
from relaygate.server import proxy
from relaygate.server.connection import ConnectionHost, SMTPConnection
from relaygate.smtp.session import Settings

HEADER_TIMEOUT = 10.0  # seconds for the whole header (at most the command timeout)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HeaderRefused(Exception):
    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def peer_ip(text: str) -> str:
    """The peer as we compare it: an IPv4-mapped IPv6 peer is its IPv4 address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def is_trusted(peer: str, networks: tuple[_Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


class ProxyListener:
    """Accepts on one shared listening socket; each connection starts with a PROXY header."""

    def __init__(
        self,
        worker: ConnectionHost,
        sock: socket.socket,
        listener: ListenerConfig,
        settings: Settings,
    ) -> None:
        self.worker = worker
        self.sock = sock
        self.listener = listener
        self.settings = settings
        self.implicit = listener.tls == "implicit"
        self.trusted = tuple(ipaddress.ip_network(n) for n in listener.proxy_trusted)
        self.header_timeout = min(HEADER_TIMEOUT, worker.config.limits.command_timeout)
        self._pending: set[asyncio.Task[None]] = set()  # connections still in their header
        self._accepting: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept_loop())

    def close(self) -> None:
        """Stop accepting (shutdown); connections still reading a header are closed."""
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._pending):
            task.cancel()

    async def _accept_loop(self) -> None:
        loop = self.worker.loop
        try:
            while True:
                try:
                    conn, address = await loop.sock_accept(self.sock)
                except OSError as exc:  # EMFILE and the like: back off, keep serving
                    logs.event("accept.error", logging.WARNING, reason=type(exc).__name__)
                    await asyncio.sleep(0.1)
                    continue
                task = asyncio.ensure_future(self._serve(conn, address))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
        finally:
            self.sock.close()  # this process's copy: the other workers keep theirs

    async def _serve(self, conn: socket.socket, address: tuple[str, int]) -> None:
        session_id = os.urandom(5).hex()
        peer = peer_ip(str(address[0]))
        handed_over = False
        try:
            conn.setblocking(False)
            if self.worker.draining:
                return
            if not is_trusted(peer, self.trusted):
                self._refused(session_id, peer, "untrusted")
                return
            if len(self._pending) > self.worker.max_connections:
                self._refused(session_id, peer, "server_busy")
                return
            try:
                header = await asyncio.wait_for(self._read_header(conn), self.header_timeout)
            except TimeoutError:
                self._refused(session_id, peer, "timeout", level=logging.INFO)
                return
            except HeaderRefused as refusal:
                level = logging.INFO if refusal.reason == "closed" else logging.WARNING
                self._refused(session_id, peer, refusal.reason, refusal.detail, level)
                return
            except OSError as exc:
                self._refused(session_id, peer, "closed", type(exc).__name__, logging.INFO)
                return
            client_ip = header.source[0] if header.source is not None else peer
            logs.event(
                "proxy",
                logging.DEBUG,
                session=session_id,
                peer=peer,
                client_ip=client_ip,
                version=header.version,
            )
            handed_over = True  # from here the event loop owns (and closes) the socket
            await self._hand_over(conn, session_id, client_ip, peer)
        finally:
            if not handed_over:
                conn.close()

    async def _hand_over(
        self, conn: socket.socket, session_id: str, client_ip: str, peer: str
    ) -> None:
        worker = self.worker

        def factory() -> SMTPConnection:
            return SMTPConnection(
                worker,
                self.settings,
                self.implicit,
                session_id=session_id,
                client_ip=client_ip,
                proxy_peer=peer,
                listener=self.listener.address,
            )

        try:
            await worker.loop.connect_accepted_socket(
                factory,
                conn,
                ssl=worker.tls_context if self.implicit else None,
                ssl_handshake_timeout=(
                    worker.config.limits.tls_handshake_timeout if self.implicit else None
                ),
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # As on a plain implicit-TLS listener: a failed handshake is routine.
            logs.event(
                "connection.error",
                logging.DEBUG,
                session=session_id,
                client_ip=client_ip,
                reason=type(exc).__name__,
            )

    async def _read_header(self, conn: socket.socket) -> proxy.Header:
        """Read exactly the header's bytes: peek, parse, then take what it used."""
        have = b""
        while True:
            await self._readable(conn)
            try:
                peeked = conn.recv(proxy.MAX_HEADER - len(have), socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            if not peeked:
                raise HeaderRefused("truncated" if have else "closed")
            result = proxy.parse(have + peeked)
            if isinstance(result, proxy.Malformed):
                raise HeaderRefused("malformed", result.reason)
            if isinstance(result, proxy.Header):
                _take(conn, result.consumed - len(have))  # the header's bytes, no more
                return result
            have += _take(conn, len(peeked))  # NeedMore: every byte seen is header

    async def _readable(self, conn: socket.socket) -> None:
        loop = self.worker.loop
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = conn.fileno()
        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    def _refused(
        self,
        session_id: str,
        peer: str,
        reason: str,
        detail: str | None = None,
        level: int = logging.WARNING,
    ) -> None:
        logs.event(
            "proxy.refused",
            level,
            session=session_id,
            peer=peer,
            listener=self.listener.address,
            reason=reason,
            detail=detail,
        )


def _take(conn: socket.socket, size: int) -> bytes:
    """``size`` bytes that a peek showed are waiting: a plain recv returns them."""
    taken = b""
    while len(taken) < size:
        chunk = conn.recv(size - len(taken))
        if not chunk:
            raise HeaderRefused("truncated")
        taken += chunk
    return taken
