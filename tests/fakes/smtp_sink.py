"""A scriptable receiving SMTP server: "other people's MX servers" for tests.

``SMTPSink`` listens on a loopback address (any of 127.0.0.0/8, which Linux
routes to ``lo`` without configuration), speaks enough ESMTP for a sending
MTA (EHLO/HELO, STARTTLS, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, RSET, NOOP,
QUIT, pipelining) and records what it receives. It runs its own asyncio loop
in a background thread, so synchronous tests drive it directly::

    with SMTPSink("127.0.0.2") as sink:
        sink.reply_to("RCPT", "450 4.2.0 Try later", times=2)
        sink.reject_recipient("bad@example.test", "550 5.1.1 No such user")
        ...  # make relaygate deliver to 127.0.0.2:sink.port
        [msg] = sink.wait_for_messages(1)
        assert msg.rcpt_to == ["good@example.test"]

It is independent of relaygate's own SMTP code (and of aiosmtpd): a bug
shared by the server and the test double would hide itself.

Several MX hosts on one port (a relay configured with one "MX port"): see
``sinks_on_one_port``. TLS: ``make_tls_context`` makes a throwaway CA and a
server certificate; give the CA file to the side that should trust it.

Every wait is bounded: command reads (``command_timeout``), TLS handshakes,
start, stop and ``wait_for_messages``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import email.message
import email.parser
import email.policy
import ipaddress
import itertools
import ssl
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "COMMANDS",
    "DEFAULT_EXTENSIONS",
    "Received",
    "SMTPSink",
    "SinkEvent",
    "make_tls_context",
    "sinks_on_one_port",
]

#: What ``reply_to`` and ``delay_reply`` accept. ``CONNECT`` is the banner,
#: ``DATA`` the reply to the DATA command (normally 354), ``DATA_END`` the
#: reply after the message's final dot.
COMMANDS = frozenset(
    {
        "CONNECT",
        "EHLO",
        "HELO",
        "STARTTLS",
        "AUTH",
        "MAIL",
        "RCPT",
        "DATA",
        "DATA_END",
        "RSET",
        "NOOP",
        "QUIT",
    }
)

#: Advertised by default (STARTTLS and AUTH are added from ``tls`` and
#: ``require_auth``). ``DSN`` may be added: then RET/ENVID/NOTIFY/ORCPT pass.
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    "PIPELINING",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "SIZE",
)
_KNOWN_EXTENSIONS = frozenset({*DEFAULT_EXTENSIONS, "DSN"})

_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_TLS_HANDSHAKE_TIMEOUT = 5.0
_LINE_LIMIT = 1 << 20  # longest line read (commands and message lines)


@dataclass(frozen=True)
class Received:
    """One mail transaction that reached the end of DATA."""

    mail_from: str  # "" for the null reverse-path <>
    rcpt_to: list[str]  # accepted recipients, in order
    data: bytes  # the message as sent, dot-unstuffed, with its final CRLF
    tls: bool
    tls_version: str | None  # "TLSv1.3", ...
    auth_user: str | None
    helo: str  # the EHLO/HELO argument
    peer: str  # "127.0.0.1:54321"
    connection_id: int  # equal ids: one connection carried both transactions
    esmtp: bool = True  # EHLO (True) or HELO (False)
    mail_options: list[str] = field(default_factory=list)  # ["SIZE=123", "BODY=8BITMIME"]
    rcpt_options: list[list[str]] = field(default_factory=list)  # parallel to rcpt_to
    reply: str = ""  # the reply sent after the final dot

    def message(self) -> email.message.EmailMessage:
        """``data`` parsed with the modern email policy."""
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(self.data)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed


@dataclass(frozen=True)
class SinkEvent:
    """One entry of ``SMTPSink.events``.

    ``kind`` is one of: ``connect`` (text: peer), ``refused``, ``command``
    (text: the command line; AUTH credentials are replaced by ``***``),
    ``tls`` (text: TLS version), ``tls-failed``, ``drop``, ``message`` (text:
    the reply after DATA), ``timeout``, ``stopped`` (open when ``stop()``
    ran), ``disconnect``, ``error`` (a bug in the sink: please look).
    """

    connection_id: int
    kind: str
    text: str


@dataclass
class _Scripted:
    reply: str
    delay: float
    remaining: int | None  # None: until reset_behaviour()


class _Closed(Exception):
    """The session is over (peer gone, timeout, drop)."""


def _check_loopback(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IP address on loopback, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"host must be on loopback (127.0.0.0/8 or ::1), not {host}")


def _check_reply(reply: str) -> int:
    if len(reply) < 3 or not reply[:3].isdigit() or reply[:1] not in "2345":
        raise ValueError(f"not an SMTP reply: {reply!r}")
    if len(reply) > 3 and reply[3] not in " -\n":
        raise ValueError(f"not an SMTP reply: {reply!r}")
    return int(reply[:3])


def _code(reply: str) -> int:
    return int(reply[:3])


def _format_reply(reply: str) -> bytes:
    """``"250 ok"`` or several lines separated by ``\\n`` (codes optional after the first).

    Lone surrogates U+DC80..U+DCFF become the raw bytes 0x80..0xFF (a reply
    given as bytes arrives here so), to send text that is not UTF-8."""
    code = reply[:3]
    texts: list[str] = []
    for line in reply.split("\n"):
        coded = len(line) >= 3 and line[:3].isdigit() and (len(line) == 3 or line[3] in " -")
        texts.append(line[4:] if coded else line)
    out = [f"{code}-{text}" for text in texts[:-1]] + [f"{code} {texts[-1]}"]
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")


def _parse_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """``FROM:<a@b> SIZE=1`` -> ``("a@b", ["SIZE=1"])``; None if malformed."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    quoted = escaped = False
    for index in range(1, len(rest)):
        char = rest[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            path = rest[1:index]
            tail = rest[index + 1 :]
            if tail and not tail.startswith(" "):
                return None
            if path.startswith("@") and ":" in path:  # obsolete source route
                path = path.split(":", 1)[1]
            return path, tail.split()
    return None


def _redact(verb: str, line: str) -> str:
    if verb == "AUTH":
        parts = line.split()
        if len(parts) > 2:
            return " ".join([*parts[:2], "***"])
    return line


class SMTPSink:
    """A receiving SMTP server on ``host:port``; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
        require_auth: tuple[str, str] | None = None,
        implicit_tls: bool = False,
        hostname: str = "mx.test",
        auth_requires_tls: bool = False,
        extensions: Collection[str] = DEFAULT_EXTENSIONS,
        max_message_size: int = 10 * 1024 * 1024,
        max_recipients: int | None = None,
        command_timeout: float = 30.0,
    ) -> None:
        """
        ``tls``: offer STARTTLS (or, with ``implicit_tls``, speak TLS from the
        first byte). ``require_auth``: (user, password); AUTH PLAIN LOGIN is
        advertised and required before MAIL; with ``auth_requires_tls`` only
        after STARTTLS (as most smarthosts do). ``extensions``: which of
        ``DEFAULT_EXTENSIONS`` (+ ``DSN``) to advertise and honour; leave one
        out to see how the sender copes (e.g. no SMTPUTF8: a non-ASCII address
        gets 553 5.6.7). ``max_recipients``: more RCPTs per transaction get
        452 4.5.3. ``command_timeout``: idle seconds before 421 and close.
        """
        _check_loopback(host)
        if implicit_tls and tls is None:
            raise ValueError("implicit_tls needs a tls context")
        if auth_requires_tls and tls is None:
            raise ValueError("auth_requires_tls needs a tls context")
        unknown = {ext.upper() for ext in extensions} - _KNOWN_EXTENSIONS
        if unknown:
            raise ValueError(f"unknown extensions: {sorted(unknown)}")
        self._host = host
        self._port = port
        self._tls = tls
        self._require_auth = require_auth
        self._implicit_tls = implicit_tls
        self.hostname = hostname
        self._auth_requires_tls = auth_requires_tls
        self._extensions = tuple(ext.upper() for ext in extensions)
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.command_timeout = command_timeout

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._messages: list[Received] = []
        self._rejected: list[Received] = []
        self._events: list[SinkEvent] = []
        self._connections = 0
        self._connection_ids = itertools.count(1)
        self._queue_ids = itertools.count(1)
        self._replies: dict[str, list[_Scripted]] = {}
        self._delays: dict[str, list[_Scripted]] = {}
        self._recipient_rules: dict[str, str] = {}
        self._known_recipients: tuple[set[str], str] | None = None
        self._drops = 0
        self._refuse = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        """Listen; returns once accepting. After ``stop()`` it may start again
        (on the same port, so a sender sees the "MX" come back)."""
        if self._thread is not None:
            raise RuntimeError("SMTPSink already started")
        loop = asyncio.SelectorEventLoop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.set_exception_handler(self._on_loop_error)
            try:
                if self._implicit_tls:
                    server = loop.run_until_complete(
                        asyncio.start_server(
                            self._on_connect,
                            self._host,
                            self._port,
                            ssl=self._tls,
                            ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT,
                            limit=_LINE_LIMIT,
                        )
                    )
                else:
                    server = loop.run_until_complete(
                        asyncio.start_server(
                            self._on_connect, self._host, self._port, limit=_LINE_LIMIT
                        )
                    )
            except BaseException as exc:
                failure.append(exc)
                loop.close()
                ready.set()
                return
            self._server = server
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=f"smtp-sink-{self._host}", daemon=True)
        thread.start()
        if not ready.wait(_STARTUP_TIMEOUT):
            raise TimeoutError("SMTPSink did not start")
        if failure:
            thread.join(_STOP_TIMEOUT)
            raise failure[0]
        assert self._server is not None
        self._port = self._server.sockets[0].getsockname()[1]
        self._loop = loop
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (bounded)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=_STOP_TIMEOUT)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(_STOP_TIMEOUT)
        self._loop = None
        self._thread = None
        self._server = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT / 2)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _STOP_TIMEOUT / 2)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("SMTPSink not started: no port yet")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, e.g. for ``smtplib.SMTP(*sink.address)``."""
        return (self._host, self.port)

    @property
    def hostport(self) -> str:
        return f"{self._host}:{self.port}"

    # -- records -----------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        """Accepted transactions (250 after the data), oldest first (a copy)."""
        with self._lock:
            return list(self._messages)

    @property
    def rejected(self) -> list[Received]:
        """Transactions whose data was received but refused after the final dot."""
        with self._lock:
            return list(self._rejected)

    @property
    def events(self) -> list[SinkEvent]:
        with self._lock:
            return list(self._events)

    @property
    def connections(self) -> int:
        """TCP connections accepted (refused ones included; with implicit TLS,
        only those whose handshake succeeded)."""
        with self._lock:
            return self._connections

    def commands(self, connection_id: int | None = None) -> list[str]:
        """The verbs received (``["EHLO", "MAIL", ...]``), optionally of one connection."""
        with self._lock:
            return [
                event.text.split(" ", 1)[0].upper()
                for event in self._events
                if event.kind == "command"
                and (connection_id is None or event.connection_id == connection_id)
            ]

    def clear(self) -> None:
        """Forget messages, events and the connection count (not the behaviour)."""
        with self._lock:
            self._messages.clear()
            self._rejected.clear()
            self._events.clear()
            self._connections = 0

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least ``n`` messages were accepted; return them all.
        Raises TimeoutError (with the event log) after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= n, timeout):
                log = "\n".join(f"  {e.connection_id} {e.kind} {e.text}" for e in self._events)
                raise TimeoutError(
                    f"{len(self._messages)} of {n} messages after {timeout}s; events:\n{log}"
                )
            return list(self._messages)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` holds (re-checked on every event)."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise TimeoutError(f"condition not met after {timeout}s")

    # -- behaviour script --------------------------------------------------

    def reply_to(self, command: str, reply: str | bytes, *, times: int | None = 1) -> None:
        """The next ``times`` ``command`` commands (None: all, until
        ``reset_behaviour``) get ``reply`` instead of the normal one.

        A 4xx/5xx reply refuses the command (no state change; 421 also
        closes the connection). A 2xx/3xx reply only replaces the text: the
        command is processed normally (``"250 2.0.0 Ok: queued as X"`` for
        DATA_END; a multi-line EHLO reply, lines separated by ``\\n``,
        replaces the advertised extensions). Several calls queue up in order.
        ``reply`` as bytes is sent as given, invalid UTF-8 included (a hostile
        or broken server); NUL and bare CR in it are sent as they are too.
        """
        if isinstance(reply, bytes):
            reply = reply.decode("utf-8", "surrogateescape")
        self._queue(self._replies, command, _Scripted(reply, 0.0, times), reply)

    def delay_reply(self, command: str, seconds: float, *, times: int | None = 1) -> None:
        """Wait ``seconds`` before answering the next ``times`` ``command``s
        (``CONNECT``: the banner), e.g. to trip the sender's timeouts."""
        self._queue(self._delays, command, _Scripted("", seconds, times), None)

    def _queue(
        self,
        table: dict[str, list[_Scripted]],
        command: str,
        entry: _Scripted,
        reply: str | None,
    ) -> None:
        command = command.upper()
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; one of {sorted(COMMANDS)}")
        if reply is not None:
            _check_reply(reply)
        if entry.remaining is not None and entry.remaining < 1:
            raise ValueError("times must be at least 1 (or None)")
        with self._lock:
            table.setdefault(command, []).append(entry)

    def reject_recipient(self, address: str, reply: str | bytes = "550 5.1.1 No such user") -> None:
        """Every RCPT of ``address`` (case-insensitive) gets ``reply`` (4xx/5xx; bytes
        as in ``reply_to``)."""
        if isinstance(reply, bytes):
            reply = reply.decode("utf-8", "surrogateescape")
        if _check_reply(reply) < 400:
            raise ValueError("a recipient rule must refuse (4xx or 5xx)")
        with self._lock:
            self._recipient_rules[address.lower()] = reply

    def only_recipients(
        self, addresses: Iterable[str], reply: str = "550 5.1.1 No such user"
    ) -> None:
        """Refuse every RCPT except ``addresses`` (a server with real mailboxes,
        no catch-all); ``reject_recipient`` rules still come first."""
        if _check_reply(reply) < 400:
            raise ValueError("a recipient rule must refuse (4xx or 5xx)")
        with self._lock:
            self._known_recipients = ({a.lower() for a in addresses}, reply)

    def accept_recipient(self, address: str) -> None:
        """Undo ``reject_recipient``."""
        with self._lock:
            self._recipient_rules.pop(address.lower(), None)

    def drop_during_data(self, times: int = 1) -> None:
        """The next ``times`` DATA commands: after 354 and the first line of
        the body, the connection is closed with no reply."""
        with self._lock:
            self._drops += times

    def refuse_connections(self, refuse: bool = True) -> None:
        """Close every new connection at once, before the banner."""
        with self._lock:
            self._refuse = refuse

    def reset_behaviour(self) -> None:
        """Back to normal replies: drop every script and rule."""
        with self._lock:
            self._replies.clear()
            self._delays.clear()
            self._recipient_rules.clear()
            self._known_recipients = None
            self._drops = 0
            self._refuse = False

    # -- for sessions (loop thread) ----------------------------------------

    def _take(self, table: dict[str, list[_Scripted]], command: str) -> _Scripted | None:
        with self._lock:
            queue = table.get(command)
            if not queue:
                return None
            entry = queue[0]
            if entry.remaining is not None:
                entry.remaining -= 1
                if entry.remaining <= 0:
                    queue.pop(0)
            return entry

    def _take_reply(self, command: str) -> str | None:
        entry = self._take(self._replies, command)
        return None if entry is None else entry.reply

    def _take_delay(self, command: str) -> float:
        entry = self._take(self._delays, command)
        return 0.0 if entry is None else entry.delay

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drops > 0:
                self._drops -= 1
                return True
            return False

    def _recipient_rule(self, address: str) -> str | None:
        with self._lock:
            rule = self._recipient_rules.get(address.lower())
            if rule is None and self._known_recipients is not None:
                known, reply = self._known_recipients
                rule = None if address.lower() in known else reply
            return rule

    def _event(self, connection_id: int, kind: str, text: str) -> None:
        with self._changed:
            self._events.append(SinkEvent(connection_id, kind, text))
            self._changed.notify_all()

    def _record(self, received: Received, accepted: bool) -> None:
        with self._changed:
            (self._messages if accepted else self._rejected).append(received)
            self._events.append(SinkEvent(received.connection_id, "message", received.reply))
            self._changed.notify_all()

    def _next_queue_id(self) -> int:
        with self._lock:
            return next(self._queue_ids)

    def _extensions_for(self, session: _Session) -> list[str]:
        lines = [
            f"SIZE {self.max_message_size}" if ext == "SIZE" else ext for ext in self._extensions
        ]
        if self._tls is not None and not session.tls:
            lines.append("STARTTLS")
        if self._require_auth is not None and (session.tls or not self._auth_requires_tls):
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        kind = "tls-failed" if isinstance(exc, ssl.SSLError | ConnectionError) else "error"
        self._event(0, kind, f"{context.get('message')}: {exc!r}")

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._changed:
            connection_id = next(self._connection_ids)
            self._connections += 1
            refuse = self._refuse
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            if refuse:
                self._event(connection_id, "refused", peer)
                return
            self._event(connection_id, "connect", peer)
            session = _Session(self, reader, writer, connection_id, peer)
            try:
                await session.run()
            except (_Closed, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            except TimeoutError:
                self._event(connection_id, "timeout", "")
            except asyncio.CancelledError:  # stop(): end quietly, not as a failed task
                self._event(connection_id, "stopped", "")
            except Exception as exc:  # a sink bug: make it visible in the log
                self._event(connection_id, "error", repr(exc))
        finally:
            if not writer.transport.is_closing():
                writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            self._event(connection_id, "disconnect", "")
            self._tasks.discard(task)


class _Session:
    """One connection's SMTP dialog."""

    def __init__(
        self,
        sink: SMTPSink,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection_id: int,
        peer: str,
    ) -> None:
        self.sink = sink
        self.reader = reader
        self.writer = writer
        self.connection_id = connection_id
        self.peer = peer
        self.tls = sink._implicit_tls
        self.tls_version: str | None = None
        if self.tls:
            ssl_object = writer.get_extra_info("ssl_object")
            self.tls_version = ssl_object.version() if ssl_object is not None else None
        self.helo = ""
        self.esmtp = False
        self.auth_user: str | None = None
        self.closing = False
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtputf8 = False
        self.rcpt_to: list[str] = []
        self.rcpt_options: list[list[str]] = []

    def reset_transaction(self) -> None:
        self.mail_from = None
        self.mail_options = []
        self.smtputf8 = False
        self.rcpt_to = []
        self.rcpt_options = []

    async def send(self, reply: str) -> None:
        self.writer.write(_format_reply(reply))
        await asyncio.wait_for(self.writer.drain(), self.sink.command_timeout)
        if _code(reply) == 421:
            self.closing = True

    async def read_line(self) -> bytes:
        try:
            line = await asyncio.wait_for(self.reader.readline(), self.sink.command_timeout)
        except TimeoutError:
            self.sink._event(self.connection_id, "timeout", "")
            with contextlib.suppress(Exception):
                await self.send("421 4.4.2 Timeout, closing connection")
            raise _Closed from None
        except ValueError:  # longer than the stream limit
            with contextlib.suppress(Exception):
                await self.send("500 5.5.2 Line too long")
            raise _Closed from None
        if not line.endswith(b"\n"):  # EOF (possibly after a partial line)
            raise _Closed
        return line

    async def pause(self, command: str) -> None:
        delay = self.sink._take_delay(command)
        if delay > 0:
            await asyncio.sleep(delay)

    async def run(self) -> None:
        await self.pause("CONNECT")
        banner = self.sink._take_reply("CONNECT")
        if banner is None:
            await self.send(f"220 {self.sink.hostname} ESMTP test sink")
        else:
            await self.send(banner)
            if self.closing:
                return
            if _code(banner) >= 400:  # RFC 5321 3.1: wait for QUIT, refuse the rest
                while True:
                    line = await self.read_line()
                    if line.strip().upper() == b"QUIT":
                        await self.send("221 2.0.0 Bye")
                        return
                    await self.send("503 5.5.1 No service")
        while not self.closing:
            await self.dispatch(await self.read_line())

    async def dispatch(self, raw: bytes) -> None:
        try:
            line = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            self.sink._event(self.connection_id, "command", repr(raw))
            await self.send("500 5.5.2 Invalid UTF-8 in command")
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        self.sink._event(self.connection_id, "command", _redact(verb, line))
        scripted: str | None = None
        if verb in COMMANDS:
            await self.pause(verb)
            scripted = self.sink._take_reply(verb)
            if scripted is not None and _code(scripted) >= 400:
                await self.send(scripted)
                return
        arg = arg.strip(" ")
        handler = {
            "EHLO": self.ehlo,
            "HELO": self.helo_,
            "STARTTLS": self.starttls,
            "AUTH": self.auth,
            "MAIL": self.mail,
            "RCPT": self.rcpt,
            "DATA": self.data,
            "RSET": self.rset,
            "NOOP": self.noop,
            "QUIT": self.quit,
            "VRFY": self.vrfy,
        }.get(verb)
        if handler is None:
            await self.send("500 5.5.2 Command not recognized")
            return
        await handler(arg, scripted)

    async def ehlo(self, arg: str, scripted: str | None) -> None:
        if not arg:
            await self.send("501 5.5.4 Syntax: EHLO hostname")
            return
        self.reset_transaction()
        self.helo, self.esmtp = arg, True
        lines = [f"{self.sink.hostname} greets {arg}", *self.sink._extensions_for(self)]
        await self.send(scripted or "250 " + "\n".join(lines))

    async def helo_(self, arg: str, scripted: str | None) -> None:
        if not arg:
            await self.send("501 5.5.4 Syntax: HELO hostname")
            return
        self.reset_transaction()
        self.helo, self.esmtp = arg, False
        await self.send(scripted or f"250 {self.sink.hostname}")

    async def starttls(self, arg: str, scripted: str | None) -> None:
        context = self.sink._tls
        if arg:
            await self.send("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls:
            await self.send("503 5.5.1 TLS already active")
            return
        if context is None:
            await self.send("502 5.5.1 STARTTLS not available")
            return
        # Stop reading before the 220 goes out: a ClientHello read into the
        # stream buffer would be lost to the TLS layer (start_tls resumes).
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()
        await self.send(scripted or "220 2.0.0 Ready to start TLS")
        try:
            await asyncio.wait_for(
                self.writer.start_tls(context, ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT),
                _TLS_HANDSHAKE_TIMEOUT + 1,
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.sink._event(self.connection_id, "tls-failed", repr(exc))
            raise _Closed from None
        ssl_object = self.writer.get_extra_info("ssl_object")
        self.tls = True
        self.tls_version = ssl_object.version() if ssl_object is not None else None
        self.sink._event(self.connection_id, "tls", self.tls_version or "")
        self.helo, self.esmtp, self.auth_user = "", False, None  # RFC 3207: start over
        self.reset_transaction()

    async def challenge(self, text: str) -> bytes | None:
        """Send 334 ``text``; the decoded answer, or None once refused."""
        await self.send(f"334 {text}")
        answer = (await self.read_line()).strip()
        if answer == b"*":
            await self.send("501 5.7.0 Authentication cancelled")
            return None
        return await self.decode64(answer)

    async def decode64(self, value: bytes) -> bytes | None:
        if value == b"=":
            return b""
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            await self.send("501 5.5.2 Invalid base64 data")
            return None

    async def auth(self, arg: str, scripted: str | None) -> None:
        credentials = self.sink._require_auth
        if credentials is None:
            await self.send("502 5.5.1 AUTH not available")
            return
        if not self.esmtp:
            await self.send("503 5.5.1 Send EHLO first")
            return
        if self.sink._auth_requires_tls and not self.tls:
            await self.send("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.auth_user is not None:
            await self.send("503 5.5.1 Already authenticated")
            return
        if self.mail_from is not None:
            await self.send("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        parts = arg.split()
        if not 1 <= len(parts) <= 2:
            await self.send("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = parts[0].upper()
        initial = parts[1].encode("ascii", "replace") if len(parts) == 2 else None
        if mechanism == "PLAIN":
            if initial is None:
                decoded = await self.challenge("")
            else:
                decoded = await self.decode64(initial)
            if decoded is None:
                return
            fields = decoded.split(b"\0")
            if len(fields) != 3:
                await self.send("501 5.5.2 Malformed PLAIN response")
                return
            authzid, user_raw, password_raw = fields
            if authzid not in (b"", user_raw):
                await self.send("535 5.7.8 Authentication credentials invalid")
                return
        elif mechanism == "LOGIN":
            if initial is None:
                user_answer = await self.challenge("VXNlcm5hbWU6")
            else:
                user_answer = await self.decode64(initial)
            if user_answer is None:
                return
            password_answer = await self.challenge("UGFzc3dvcmQ6")
            if password_answer is None:
                return
            user_raw, password_raw = user_answer, password_answer
        else:
            await self.send("504 5.5.4 Unrecognized authentication type")
            return
        user = user_raw.decode("utf-8", "replace")
        password = password_raw.decode("utf-8", "replace")
        if (user, password) != credentials:
            await self.send("535 5.7.8 Authentication credentials invalid")
            return
        self.auth_user = user
        await self.send(scripted or "235 2.7.0 Authentication successful")

    def check_params(self, params: Sequence[str], allowed: Iterable[str]) -> str | None:
        """None if every parameter is acceptable, else the refusal."""
        allowed = set(allowed)
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if not self.esmtp or key not in allowed:
                return f"555 5.5.4 Unsupported parameter {key}"
            if key == "SIZE":
                if not value.isdigit():
                    return "501 5.5.4 Bad SIZE value"
                if int(value) > self.sink.max_message_size:
                    return "552 5.3.4 Message size exceeds fixed maximum message size"
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME") or (
                    value.upper() == "8BITMIME" and "8BITMIME" not in self.sink._extensions
                ):
                    return f"555 5.5.4 Unsupported BODY type {value}"
            elif key == "SMTPUTF8" and value:
                return "501 5.5.4 SMTPUTF8 takes no value"
        return None

    async def mail(self, arg: str, scripted: str | None) -> None:
        if not self.helo:
            await self.send("503 5.5.1 Send EHLO/HELO first")
            return
        if self.sink._require_auth is not None and self.auth_user is None:
            await self.send("530 5.7.0 Authentication required")
            return
        if self.mail_from is not None:
            await self.send("503 5.5.1 Nested MAIL command")
            return
        parsed = _parse_path(arg, "FROM:")
        if parsed is None:
            await self.send("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        address, params = parsed
        allowed = {"SIZE", "BODY"}
        if "SMTPUTF8" in self.sink._extensions:
            allowed.add("SMTPUTF8")
        if "DSN" in self.sink._extensions:
            allowed |= {"RET", "ENVID"}
        if self.sink._require_auth is not None:
            allowed.add("AUTH")
        refusal = self.check_params(params, allowed)
        if refusal is not None:
            await self.send(refusal)
            return
        smtputf8 = any(p.upper() == "SMTPUTF8" for p in params)
        if not address.isascii() and not smtputf8:
            await self.send("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        self.mail_from, self.mail_options, self.smtputf8 = address, list(params), smtputf8
        await self.send(scripted or "250 2.1.0 Ok")

    async def rcpt(self, arg: str, scripted: str | None) -> None:
        if self.mail_from is None:
            await self.send("503 5.5.1 Need MAIL command")
            return
        parsed = _parse_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            await self.send("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address, params = parsed
        allowed = {"NOTIFY", "ORCPT"} if "DSN" in self.sink._extensions else set()
        refusal = self.check_params(params, allowed)
        if refusal is not None:
            await self.send(refusal)
            return
        if not address.isascii() and not self.smtputf8:
            await self.send("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        rule = self.sink._recipient_rule(address)
        if rule is not None:
            await self.send(rule)
            return
        limit = self.sink.max_recipients
        if limit is not None and len(self.rcpt_to) >= limit:
            await self.send("452 4.5.3 Too many recipients")
            return
        self.rcpt_to.append(address)
        self.rcpt_options.append(list(params))
        await self.send(scripted or "250 2.1.5 Ok")

    async def data(self, arg: str, scripted: str | None) -> None:
        if arg:
            await self.send("501 5.5.4 Syntax: DATA")
            return
        if self.mail_from is None:
            await self.send("503 5.5.1 Need MAIL command")
            return
        if not self.rcpt_to:
            await self.send("554 5.5.1 No valid recipients")
            return
        await self.send(scripted or "354 End data with <CR><LF>.<CR><LF>")
        if self.sink._take_drop():
            with contextlib.suppress(TimeoutError, ValueError):
                await asyncio.wait_for(self.reader.readline(), 2.0)
            self.sink._event(self.connection_id, "drop", "")
            self.writer.transport.abort()
            raise _Closed
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await self.read_line()
            if line == b".\r\n":
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size <= self.sink.max_message_size:
                chunks.append(line)
        await self.pause("DATA_END")
        end_reply = self.sink._take_reply("DATA_END")
        if size > self.sink.max_message_size:
            reply, accepted = "552 5.3.4 Message size exceeds fixed maximum message size", False
        elif end_reply is not None and _code(end_reply) >= 400:
            reply, accepted = end_reply, False
        else:
            queue_id = f"S{self.sink._next_queue_id():06d}"
            reply, accepted = end_reply or f"250 2.0.0 Ok: queued as {queue_id}", True
        assert self.mail_from is not None
        received = Received(
            mail_from=self.mail_from,
            rcpt_to=list(self.rcpt_to),
            data=b"".join(chunks),
            tls=self.tls,
            tls_version=self.tls_version,
            auth_user=self.auth_user,
            helo=self.helo,
            peer=self.peer,
            connection_id=self.connection_id,
            esmtp=self.esmtp,
            mail_options=list(self.mail_options),
            rcpt_options=[list(o) for o in self.rcpt_options],
            reply=reply,
        )
        self.sink._record(received, accepted)  # visible before the sender sees the reply
        self.reset_transaction()
        await self.send(reply)

    async def rset(self, arg: str, scripted: str | None) -> None:
        if arg:
            await self.send("501 5.5.4 Syntax: RSET")
            return
        self.reset_transaction()
        await self.send(scripted or "250 2.0.0 Ok")

    async def noop(self, arg: str, scripted: str | None) -> None:
        await self.send(scripted or "250 2.0.0 Ok")

    async def quit(self, arg: str, scripted: str | None) -> None:
        await self.send(scripted or "221 2.0.0 Bye")
        self.closing = True

    async def vrfy(self, arg: str, scripted: str | None) -> None:
        await self.send("252 2.5.0 Cannot VRFY user")


def sinks_on_one_port(
    hosts: Sequence[str],
    factory: Callable[[str, int], SMTPSink] = SMTPSink,
    *,
    attempts: int = 20,
) -> list[SMTPSink]:
    """Start one sink per host (127.0.0.x), all on the same free port, for a
    sender configured with a single MX port. ``factory(host, port)`` builds
    each (e.g. ``lambda h, p: SMTPSink(h, p, tls=ctx)``). Started; stop them."""
    if not hosts:
        raise ValueError("no hosts")
    last_error: OSError | None = None
    for _ in range(attempts):
        first = factory(hosts[0], 0).start()
        started = [first]
        try:
            for host in hosts[1:]:
                started.append(factory(host, first.port).start())
        except OSError as exc:  # that port is taken on another address: try another
            last_error = exc
            for sink in started:
                sink.stop()
            continue
        return started
    raise OSError(f"no port free on all of {list(hosts)}: {last_error}")


def make_tls_context(
    hostname: str,
    tmp_dir: Path,
    *,
    ips: Sequence[str] = ("127.0.0.1",),
    expired: bool = False,
) -> tuple[ssl.SSLContext, Path]:
    """A server context whose certificate names ``hostname`` and ``ips``,
    issued by a throwaway CA; returns (context, CA certificate file).

    Trust the returned PEM file (``ssl.create_default_context(cafile=...)``,
    or relaygate's CA setting) to verify the sink; leave it out to see an
    untrusted certificate. ``ips=()`` leaves the addresses out (so only the
    name verifies); ``expired=True`` dates the server certificate in the past.
    Files written: ``<hostname>-ca.pem``, ``<hostname>.pem``, ``<hostname>.key``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Test CA for {hostname}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now + dt.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        names.append(x509.DNSName(hostname))
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips if ip != hostname]
    if expired:
        not_before, not_after = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
    else:
        not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=30)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    stem = hostname.replace("*", "_")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    ca_path = tmp_dir / f"{stem}-ca.pem"
    cert_path = tmp_dir / f"{stem}.pem"
    key_path = tmp_dir / f"{stem}.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, ca_path
