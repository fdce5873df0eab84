"""A deliberately unsafe SMTP submission server, for `relaygate check` to find fault with.

Everything the checklist looks for is wrong here, on purpose:
- the greeting shows a software version ("Sendmail 8.15.2");
- AUTH PLAIN LOGIN is advertised before TLS, and any credential gets 235;
- any MAIL and RCPT get 250 (an open relay);
- its TLS context allows TLS 1.0 and 1.1 (SECLEVEL=0), if the local OpenSSL does;
- its certificate expired yesterday and names only ``wrong.example``;
- no SIZE; lines are cut at bare LF, so ``<LF>.<LF>`` ends the data (SMTP smuggling).

``behaviour`` makes it hostile instead: "silent" (never greets), "endless"
(an EHLO reply that never ends), "long_line" (a reply line without end),
"stall_tls" (agrees to STARTTLS, then never does the handshake), "hostile_text"
(escape sequences, NUL and CR in the greeting), "refuse" (a 554 greeting),
"not_smtp" (answers like a web server), "mute_data" (never answers the end of
a message). "strict_close" is the one good behaviour: a bare LF in DATA gets
``521`` and the connection closed, as Postfix's smtpd_forbid_bare_newline does.

It runs its own asyncio loop in a thread; every wait is bounded (``LIFETIME``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LIFETIME = 60.0  # no connection is served longer than this
BANNER = b"220 bad.example ESMTP Sendmail 8.15.2/8.15.2; ready\r\n"
HOSTILE_BANNER = b"220 bad.example \x1b[2J\x1b]0;owned\x07 ready\x00 \rfake 250 ok\r\n"


def write_bad_certificate(directory: Path) -> tuple[Path, Path]:
    """An expired self-signed certificate for ``wrong.example``: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wrong.example")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("wrong.example")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "bad.crt", directory / "bad.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def legacy_tls_context(cert: Path, key: Path) -> tuple[ssl.SSLContext, bool]:
    """A server context that also accepts TLS 1.0/1.1; the flag says whether the
    local OpenSSL let us lower the floor (else TLS 1.2 is the minimum)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
    except (ssl.SSLError, ValueError):
        return context, False
    return context, True


class BadSMTPServer:
    def __init__(self, directory: Path, *, implicit: bool = False, behaviour: str = "bad") -> None:
        self.implicit = implicit
        self.behaviour = behaviour
        cert, key = write_bad_certificate(directory)
        self.cert_file = cert
        self.context, self.legacy_tls = legacy_tls_context(cert, key)
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[bytes] = []  # what ended with a "." line
        self.commands: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Self:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            0,
            ssl=self.context if self.implicit else None,
            ssl_handshake_timeout=10 if self.implicit else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.wait_for(self._session(reader, writer), LIFETIME)
        except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.behaviour == "silent":
            await asyncio.sleep(LIFETIME)
            return
        if self.behaviour == "not_smtp":
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            return
        if self.behaviour == "refuse":
            writer.write(b"554 5.7.1 go away\r\n")
            await writer.drain()
            return
        writer.write(HOSTILE_BANNER if self.behaviour == "hostile_text" else BANNER)
        tls = self.implicit
        while True:
            line = await reader.readline()  # cut at LF: bare LF ends a line here
            if not line:
                return
            self.commands.append(line)
            verb = line.strip().upper()
            if verb.startswith((b"EHLO", b"HELO")):
                if self.behaviour == "endless":
                    while True:
                        writer.write(b"250-and more\r\n" * 100)
                        await writer.drain()
                if self.behaviour == "long_line":
                    while True:
                        writer.write(b"250-" + b"x" * 10000)
                        await writer.drain()
                caps = [b"bad.example hello", b"PIPELINING", b"AUTH PLAIN LOGIN", b"8BITMIME"]
                if not tls:
                    caps.append(b"STARTTLS")
                last = len(caps) - 1
                writer.write(
                    b"".join(
                        b"250" + (b" " if i == last else b"-") + c + b"\r\n"
                        for i, c in enumerate(caps)
                    )
                )
            elif verb == b"STARTTLS" and not tls:
                writer.write(b"220 2.0.0 go ahead\r\n")
                await writer.drain()
                if self.behaviour == "stall_tls":
                    await asyncio.sleep(LIFETIME)
                    return
                await writer.start_tls(self.context)
                tls = True
            elif verb.startswith(b"AUTH"):
                if len(verb.split()) == 2:  # no initial response: ask for it
                    writer.write(b"334 \r\n")
                    await reader.readline()
                writer.write(b"235 2.7.0 anything goes\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                body = b""
                while True:
                    data_line = await reader.readline()
                    if self.behaviour == "strict_close" and not data_line.endswith(b"\r\n"):
                        writer.write(b"521 5.5.2 Error: bare <LF> received\r\n")
                        await writer.drain()
                        return
                    if not data_line or data_line.rstrip(b"\r\n") == b".":
                        break
                    body += data_line
                self.messages.append(body)
                if self.behaviour == "mute_data":
                    await asyncio.sleep(LIFETIME)
                    return
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            elif verb.startswith((b"MAIL", b"RCPT", b"RSET", b"NOOP")):
                writer.write(b"250 2.0.0 ok\r\n")
            else:
                writer.write(b"500 5.5.2 what?\r\n")
            await writer.drain()
