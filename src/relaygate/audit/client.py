"""A small SMTP client for probing: raw bytes when needed, STARTTLS when asked,
a timeout on every step and bounds on everything the server sends.

Not aiosmtplib: the probes need to send malformed data on purpose (bare LF in
DATA), to read a reply that may never come or never end, and to count replies
that should not exist (smuggled commands); a client that fixes line endings
and matches replies to commands hides exactly that.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

from relaygate.audit.findings import Reply
from relaygate.audit.text import clean

MAX_LINE = 2048  # bytes in one reply line (RFC 5321 allows 512)
MAX_LINES = 100  # lines in one reply
STREAM_LIMIT = 4096


class ProbeError(Exception):
    """A step failed (timeout, closed connection, oversized or malformed reply)."""


class Client:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        timeout: float,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Client:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=STREAM_LIMIT), timeout
            )
        except TimeoutError:
            raise ProbeError(f"no connection within {timeout:g} s") from None
        except OSError as exc:
            raise ProbeError(describe_os_error(exc)) from None
        client = cls(reader, writer, timeout)
        if tls is not None:
            # The handshake apart from the TCP connect, so that a refused
            # handshake is a TLS failure and a refused connection is not.
            try:
                await client.starttls(tls, server_hostname)
            except ProbeError:
                client.abort()
                raise
        return client

    @property
    def tls_object(self) -> ssl.SSLObject | None:
        obj = self.writer.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except TimeoutError:
            raise ProbeError(
                f"the server did not read what was sent within {self.timeout:g} s"
            ) from None
        except (OSError, RuntimeError) as exc:
            raise ProbeError(f"connection lost while sending: {describe_os_error(exc)}") from None

    async def _line(self, timeout: float, allowed: float) -> bytes:
        try:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
        except TimeoutError:
            raise ProbeError(f"no reply within {allowed:g} s") from None
        except asyncio.IncompleteReadError:
            raise ProbeError("the server closed the connection") from None
        except asyncio.LimitOverrunError:
            raise ProbeError(f"a reply line longer than {STREAM_LIMIT} bytes") from None
        except OSError as exc:  # ssl.SSLError too
            raise ProbeError(f"connection lost: {describe_os_error(exc)}") from None
        if len(line) > MAX_LINE:
            raise ProbeError(f"a reply line longer than {MAX_LINE} bytes")
        return line

    async def reply(self, timeout: float | None = None) -> Reply:
        """One (multi-line) reply, within ``timeout`` for the whole of it."""
        loop = asyncio.get_running_loop()
        allowed = self.timeout if timeout is None else timeout
        deadline = loop.time() + allowed
        texts: list[str] = []
        code: int | None = None
        for _ in range(MAX_LINES):
            left = deadline - loop.time()
            if left <= 0:
                raise ProbeError("the reply did not end in time")
            line = (await self._line(left, allowed)).rstrip(b"\r\n")
            head = line[:3]
            if len(line) < 3 or not head.isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise ProbeError(f"not an SMTP reply: {clean(line, 60)}")
            if code is None:
                code = int(head)
            elif int(head) != code:
                raise ProbeError("a multi-line reply changed its code")
            texts.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return Reply(code, " | ".join(texts))
        raise ProbeError(f"a reply longer than {MAX_LINES} lines")

    async def command(self, line: str) -> Reply:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def ehlo(self, name: str) -> tuple[str, list[str]]:
        """EHLO: (first line, keywords with parameters)."""
        reply = await self.command(f"EHLO {name}")
        if reply.code != 250:
            raise ProbeError(f"EHLO refused: {reply}")
        first, *rest = reply.text.split(" | ")
        return first, rest

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        try:
            await asyncio.wait_for(
                self.writer.start_tls(
                    context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=self.timeout + 5,  # wait_for's backstop
                ),
                self.timeout,
            )
        except TimeoutError:
            raise TLSFailed(f"TLS handshake not done within {self.timeout:g} s") from None
        except ssl.SSLError as exc:
            raise TLSFailed(_tls_reason(exc)) from None
        except (OSError, ConnectionError) as exc:
            reason = describe_os_error(exc)
            raise TLSFailed(f"connection lost during the handshake: {reason}") from None

    async def close(self) -> None:
        """QUIT if the server still listens, then close; never raises, never waits long."""
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), min(self.timeout, 2.0))
        except (ProbeError, TimeoutError, OSError, RuntimeError, ssl.SSLError):
            pass
        self.abort()

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()


class TLSFailed(ProbeError):
    """The TLS handshake did not complete."""


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or exc.reason or exc)
    return str(exc.reason or exc)


def describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):  # its errno is a getaddrinfo code, not errno
        return f"cannot resolve the host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        return os.strerror(exc.errno)  # not asyncio's "Connect call failed (address)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
