"""The SMTP server session: a sans-IO state machine (RFC 5321, 6409, 3207, 4954, 3030).

Rules of this file:
- Everything that decides what a byte from the client means lives here: line
  framing, command syntax, which command is legal in which state, the DATA
  terminator and dot-unstuffing, BDAT chunk counting, limits, reply codes.
- No sockets, clocks, threads, databases or logging. The driver feeds bytes
  with ``receive``, pulls events with ``next_event``, sends ``take_output``.
- A question the session cannot answer (is this password right, may this
  account send as that address, is the message stored) becomes an event; the
  session pauses until the driver answers through a method below. So replies
  to pipelined commands come out in order without any help from the driver.

Theory of operation. Input goes into one buffer. In a command state the
session cuts one line at a time, finds the verb, checks the transition table
``ALLOWED`` and runs the handler. In DATA it searches for CRLF.CRLF only: a
bare LF or CR never ends the data (SMTP smuggling), and a message containing
one is refused as a whole. In BDAT it counts octets. After STARTTLS anything
still buffered is dropped (STARTTLS command injection, CVE-2011-0411 class).
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass

from relaygate import sasl
from relaygate.smtp import replies
from relaygate.smtp.address import (
    AddressSyntaxError,
    check_mailbox,
    parse_parameters,
    split_path,
)
from relaygate.smtp.events import (
    AuthRequest,
    Close,
    Event,
    KeysRequest,
    MessageReady,
    RecipientRequest,
    Refused,
    SenderRequest,
    StartTLS,
)

MAX_COMMAND_LINE = 1000  # octets including CRLF (RFC 5321 4.5.3.1.4, 4.5.3.1.6)
MAX_AUTH_LINE = 12288  # RFC 4954 section 4: AUTH lines and SASL responses (OAuth tokens)
# Mechanisms whose secret is a bearer token: offered and accepted over TLS only,
# even on a development port that allows plaintext AUTH.
TLS_ONLY_MECHANISMS = frozenset({"OAUTHBEARER", "XOAUTH2"})
# Replies held before the session stops reading more pipelined commands: the
# driver must send them (and the client read them) first, so a client that
# pipelines without reading cannot make us hold unbounded output.
MAX_QUEUED_REPLIES = 64


class State(enum.Enum):
    CONNECTED = "connected"  # before EHLO/HELO
    GREETED = "greeted"  # EHLO done, no transaction
    MAIL = "mail"  # MAIL FROM accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading a DATA body
    BDAT = "bdat"  # reading a BDAT chunk
    AUTH = "auth"  # inside a SASL exchange
    WAITING = "waiting"  # an event awaits the driver's answer
    TLS_HANDSHAKE = "tls"  # STARTTLS accepted, handshake not done
    CLOSED = "closed"


_COMMAND_STATES = frozenset({State.CONNECTED, State.GREETED, State.MAIL, State.RCPT})
_ANY = _COMMAND_STATES
_TRANSACTION = frozenset({State.MAIL, State.RCPT})

# Which verb is legal in which state, and what to reply when it is not.
# The handler for a verb runs only when the state is in its set.
ALLOWED: dict[str, frozenset[State]] = {
    "EHLO": _ANY,
    "HELO": _ANY,
    "MAIL": frozenset({State.GREETED}),
    "RCPT": _TRANSACTION,
    "DATA": frozenset({State.RCPT}),
    "BDAT": _ANY,  # the chunk must be read even when refused (RFC 3030 section 2)
    "RSET": _ANY,
    "NOOP": _ANY,
    "QUIT": _ANY,
    "HELP": _ANY,
    "VRFY": _ANY,
    "EXPN": _ANY,
    "STARTTLS": frozenset({State.GREETED}),
    "AUTH": frozenset({State.GREETED}),
}

WRONG_STATE: dict[tuple[str, State], bytes] = {
    ("MAIL", State.CONNECTED): replies.NEED_EHLO,
    ("MAIL", State.MAIL): replies.NESTED_MAIL,
    ("MAIL", State.RCPT): replies.NESTED_MAIL,
    ("RCPT", State.CONNECTED): replies.NEED_MAIL,
    ("RCPT", State.GREETED): replies.NEED_MAIL,
    ("DATA", State.CONNECTED): replies.NEED_MAIL,
    ("DATA", State.GREETED): replies.NEED_MAIL,
    ("DATA", State.MAIL): replies.NO_VALID_RECIPIENTS,
    ("STARTTLS", State.CONNECTED): replies.NEED_EHLO,
    ("STARTTLS", State.MAIL): replies.NOT_IN_TRANSACTION,
    ("STARTTLS", State.RCPT): replies.NOT_IN_TRANSACTION,
    ("AUTH", State.CONNECTED): replies.NEED_EHLO,
    ("AUTH", State.MAIL): replies.NOT_IN_TRANSACTION,
    ("AUTH", State.RCPT): replies.NOT_IN_TRANSACTION,
}

# Verbs that only a web client would send: answer once and hang up.
_NOT_SMTP = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})
# A load balancer's PROXY header on a listener without proxy_protocol closes the
# connection, never read as SMTP (server/proxy.py parses it where it is expected).
PROXY_NOT_EXPECTED_REASON = "proxy header without proxy_protocol"
_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
# Submission relays nothing for anonymous clients (RFC 6409 section 4.3).
_NEEDS_AUTH = frozenset({"MAIL", "RCPT", "DATA"})


@dataclass(frozen=True)
class Settings:
    hostname: str
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_bad_commands: int = 10
    starttls_available: bool = False  # this listener offers STARTTLS
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")
    # tls-server-end-point data of each certificate this listener serves (RFC 5929);
    # without it SCRAM-SHA-256-PLUS is neither offered nor accepted.
    channel_bindings: tuple[bytes, ...] = ()
    auth_without_tls: bool = False  # only for trusted plaintext listeners
    # Command lines (AUTH responses included) a client may send before it logs in;
    # a real client needs about six. 0 = no cap.
    max_commands_before_login: int = 50


class Session:
    """One SMTP conversation, from banner to close, without any I/O."""

    def __init__(self, settings: Settings, *, tls_active: bool = False) -> None:
        self.settings = settings
        self.tls_active = tls_active
        self.state = State.CONNECTED
        self._leading_empty = 0  # empty lines at the start; -1 once a PROXY header is ruled out
        self.helo_name = ""
        self.esmtp = False
        self.authenticated_user: str | None = None
        self.bad_commands = 0
        self.auth_failures = 0
        self.messages_accepted = 0
        self.commands_before_login = 0
        self._buffer = bytearray()
        self._output: list[bytes] = []
        self._events: list[Event] = []
        self._resume_state = State.GREETED
        self._discard_line = False  # skipping the rest of an over-long line
        # transaction
        self._mail_given = False
        self.mail_from = ""
        self.mail_parameters: dict[str, str | None] = {}
        self.recipients: list[str] = []
        self._pending_recipient = ""
        # DATA / BDAT
        self._data_scan = 0
        self._message = bytearray()
        self._message_too_big = False
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_refusal: bytes | None = None
        self._bdat_used = False
        # AUTH
        self._mechanism: sasl.Mechanism | None = None
        # After an OAuth error challenge: the reply owed once the client's dummy response comes.
        self._final_auth_reply: bytes | None = None
        self._handlers: dict[str, Callable[[str], None]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "BDAT": self._bdat,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "HELP": self._help,
            "VRFY": self._vrfy,
            "EXPN": self._expn,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
        }

    # ------------------------------------------------------------ driver side

    def greeting(self) -> None:
        self._output.append(f"220 {self.settings.hostname} ESMTP relaygate\r\n".encode())

    def receive(self, data: bytes) -> None:
        """Add bytes from the client; call ``next_event`` until it returns None."""
        if self.state in (State.CLOSED, State.TLS_HANDSHAKE):
            return  # plaintext after STARTTLS is dropped, never interpreted
        self._buffer += data

    def next_event(self) -> Event | None:
        """The next event, or None when more input (or an answer) is needed."""
        events = self._events
        output = self._output
        while not events and len(output) < MAX_QUEUED_REPLIES:
            state = self.state
            if state in _COMMAND_STATES or state is State.AUTH:
                progressed = self._next_line()
            elif state is State.DATA:
                progressed = self._read_data()
            elif state is State.BDAT:
                progressed = self._read_chunk()
            else:
                progressed = False
            if not progressed:
                break
        # A step may queue an event and still want more input (an over-long
        # line without its LF yet): the event must come out now, not later.
        return events.pop(0) if events else None

    def take_output(self) -> bytes:
        """Everything to send now (replies are batched for pipelined input)."""
        if not self._output:
            return b""
        out = b"".join(self._output)
        self._output.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def output_backlogged(self) -> bool:
        """Replies are piling up: send them before asking for more events."""
        return len(self._output) >= MAX_QUEUED_REPLIES

    @property
    def has_partial_input(self) -> bool:
        """Bytes of an unfinished command line or body are waiting (for timeouts)."""
        return bool(self._buffer) or self.state in (State.DATA, State.BDAT)

    @property
    def in_message(self) -> bool:
        return self.state in (State.DATA, State.BDAT) or self._bdat_used

    @property
    def in_transaction(self) -> bool:
        """A MAIL command started a transaction that has not ended (for error replies)."""
        return self._mail_given or self.in_message

    # answers to events

    def auth_succeeded(self, user: str) -> None:
        self._expect_waiting()
        self.authenticated_user = user
        self._output.append(replies.AUTH_OK)
        self.state = State.GREETED

    def auth_failed(
        self, reply: bytes = replies.AUTH_FAILED, challenge: bytes | None = None
    ) -> None:
        """Refuse the login with ``reply``; with a ``challenge`` (OAUTHBEARER,
        XOAUTH2) that goes first as a 334, and ``reply`` follows the client's
        dummy response (RFC 7628 section 3.2.3)."""
        self._expect_waiting()
        self._mechanism = None
        self.auth_failures += 1
        if challenge is not None:
            self._output.append(b"334 " + base64.b64encode(challenge) + b"\r\n")
            self._final_auth_reply = reply
            self.state = State.AUTH
            return
        self._send_auth_failure(reply)

    def _send_auth_failure(self, reply: bytes) -> None:
        self._output.append(reply)
        self.state = State.GREETED
        if reply.startswith(b"421"):
            self.state = State.CLOSED
            self._events.append(Close("too many authentication failures"))

    def provide_keys(self, keys: sasl.StoredKeys) -> None:
        """Answer a KeysRequest: the user's SCRAM keys, or decoys for an unknown user."""
        self._expect_waiting()
        mechanism = self._mechanism
        assert mechanism is not None
        self.state = State.AUTH
        self._sasl_step(mechanism.provide(keys))

    def accept_sender(self) -> None:
        self._expect_waiting()
        self._output.append(replies.SENDER_OK)
        self.state = State.MAIL

    def accept_recipient(self) -> None:
        self._expect_waiting()
        self.recipients.append(self._pending_recipient)
        self._output.append(replies.RECIPIENT_OK)
        self.state = State.RCPT

    def message_queued(self, queue_id: str) -> None:
        self._expect_waiting()
        self.messages_accepted += 1
        self._output.append(f"250 2.0.0 Ok: queued as {queue_id}\r\n".encode())
        self._reset_transaction()
        self.state = State.GREETED

    def refuse(self, reply: bytes) -> None:
        """Refuse the pending sender, recipient or message with ``reply``."""
        self._expect_waiting()
        self._output.append(reply)
        if self._resume_state is State.GREETED:
            self._reset_transaction()  # a refused message ends the transaction
        self.state = self._resume_state
        if reply.startswith(b"421"):
            self.state = State.CLOSED
            self._events.append(Close("refused with 421"))

    def tls_started(self) -> None:
        """The TLS handshake finished: start over as RFC 3207 section 4.2 says."""
        if self.state is not State.TLS_HANDSHAKE:
            raise RuntimeError("tls_started without STARTTLS")
        self.tls_active = True
        self.authenticated_user = None
        self.state = State.CONNECTED
        self.helo_name = ""
        self.esmtp = False
        self._buffer.clear()

    def timeout(self) -> None:
        self._close(replies.TIMEOUT, "timeout")

    def fail(self, reply: bytes) -> None:
        """The server could not decide (a local error): ``reply`` and close, from any state."""
        self.end(reply, "local error")

    def end(self, reply: bytes, reason: str) -> None:
        """Close now with ``reply`` (421), whatever the state; pending events are dropped."""
        self._events.clear()
        self._close(reply, reason)

    def logout(self, reply: bytes) -> None:
        """Refuse the pending command because the login is no longer valid.

        The transaction ends and the session is no longer authenticated: the
        client may AUTH again (with what is valid now).
        """
        self._expect_waiting()
        self.authenticated_user = None
        self._output.append(reply)
        self._reset_transaction()
        self.state = State.GREETED

    def shutdown(self) -> None:
        self._close(replies.SHUTTING_DOWN, "server shutting down")

    # ------------------------------------------------------------ internals

    def _expect_waiting(self) -> None:
        if self.state is not State.WAITING:
            raise RuntimeError(f"no decision pending (state {self.state.value})")

    def _wait(self, event: Event, resume: State) -> None:
        self._events.append(event)
        self._resume_state = resume
        self.state = State.WAITING

    def _proxy_header_line(self, raw: bytes) -> bool:
        """True if this line, at the start of the input, is part of a PROXY header.

        Decided line by line (so however the input is cut, the answer is the
        same): v1 is a first line "PROXY ..."; v2 starts with two empty lines
        and a line holding one NUL byte (its signature is CRLF CRLF NUL CRLF
        "QUIT" LF), so the two empty lines get their usual 500 first.
        """
        leading = self._leading_empty  # >= 0: the caller checks
        if not raw and leading < 2:
            self._leading_empty += 1
            return False
        self._leading_empty = -1  # decided: anything after is ordinary input
        return (leading == 0 and raw.startswith(b"PROXY ")) or (leading == 2 and raw == b"\0")

    def _close(self, reply: bytes, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self._output.append(reply)
        self.state = State.CLOSED
        self._buffer.clear()
        self._events.append(Close(reason))

    def _refuse_command(self, verb: str, reply: bytes, *, bad: bool = False) -> None:
        self._output.append(reply)
        self._events.append(Refused(verb, reply))
        if bad:
            self.bad_commands += 1
            if self.bad_commands >= self.settings.max_bad_commands:
                self._close(replies.TOO_MANY_ERRORS, "too many errors")

    def _reset_transaction(self) -> None:
        self._mail_given = False
        self.mail_from = ""
        self.mail_parameters = {}
        self.recipients = []
        self._message = bytearray()
        self._message_too_big = False
        self._bdat_used = False
        self._chunk_refusal = None

    # line framing

    def _next_line(self) -> bool:
        """Handle one complete line; False when no complete line is buffered."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        # AUTH lines carry initial responses (OAuth tokens of a few KB): RFC 4954's limit.
        auth_line = self.state is State.AUTH or buffer[:5].upper() == b"AUTH "
        limit = MAX_AUTH_LINE if auth_line else MAX_COMMAND_LINE
        if end < 0:
            if len(buffer) >= limit:
                del buffer[:]
                if not self._discard_line:
                    self._discard_line = True
                    self._line_too_long()
            return False
        if self._discard_line:  # the tail of a line already answered as too long
            del buffer[: end + 1]
            self._discard_line = False
            return True
        if end + 1 > limit:
            del buffer[: end + 1]
            self._line_too_long()
            return True
        raw = bytes(buffer[: end - 1 if end and buffer[end - 1] == 13 else end])
        del buffer[: end + 1]
        if self._leading_empty >= 0 and self._proxy_header_line(raw):
            self._close(replies.PROXY_NOT_EXPECTED, PROXY_NOT_EXPECTED_REASON)
            return True
        if self.authenticated_user is None and self.settings.max_commands_before_login:
            self.commands_before_login += 1
            if self.commands_before_login > self.settings.max_commands_before_login:
                self._close(replies.TOO_MANY_COMMANDS, "too many commands before login")
                return True
        if self.state is State.AUTH:
            self._auth_response(raw)
        else:
            self._command(raw)
        return True

    def _line_too_long(self) -> None:
        final = self._final_auth_reply
        if final is not None:  # the failure is settled already: its reply, not a 500
            self._final_auth_reply = None
            self._send_auth_failure(final)
            return
        if self.state is State.AUTH:
            self._mechanism = None
            self.state = State.GREETED
        self._refuse_command("", replies.LINE_TOO_LONG, bad=True)

    def _command(self, raw: bytes) -> None:
        if b"\0" in raw:
            self._refuse_command("", replies.NUL_IN_COMMAND, bad=True)
            return
        if b"\r" in raw:  # a bare CR must not reach helo_name, addresses, parameters
            self._refuse_command("", replies.BARE_CR_IN_COMMAND, bad=True)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse_command("", replies.BAD_UTF8, bad=True)
            return
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        handler = self._handlers.get(verb)
        if handler is None:
            if verb in _NOT_SMTP:
                self._close(replies.NOT_SMTP, "not an SMTP client")
            else:
                self._refuse_command(verb, replies.UNRECOGNIZED, bad=True)
            return
        if verb in _NEEDS_AUTH and self.authenticated_user is None:
            self._refuse_command(verb, self._auth_refusal())
            return
        if self.state not in ALLOWED[verb]:
            self._refuse_command(verb, WRONG_STATE.get((verb, self.state), replies.NEED_EHLO))
            return
        handler(argument.strip(" "))

    # commands

    def _ehlo_reply(self) -> bytes:
        s = self.settings
        lines = [
            s.hostname,
            "PIPELINING",
            f"SIZE {s.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        if s.starttls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.tls_active or s.auth_without_tls:
            offered = self._offered_mechanisms()
            if offered:
                lines.append("AUTH " + " ".join(offered))
        last = len(lines) - 1
        return "".join(
            f"250{' ' if i == last else '-'}{text}\r\n" for i, text in enumerate(lines)
        ).encode()

    def _offered_mechanisms(self) -> list[str]:
        s = self.settings
        bindings = s.channel_bindings if self.tls_active else ()
        return [
            m
            for m in s.auth_mechanisms
            if (not m.endswith("-PLUS") or bindings)
            and (self.tls_active or m not in TLS_ONLY_MECHANISMS)
        ]

    def _greet(self, argument: str, esmtp: bool) -> None:
        if not argument or " " in argument:
            self._refuse_command(
                "EHLO" if esmtp else "HELO", replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX
            )
            return
        self._reset_transaction()
        self.helo_name = argument
        self.esmtp = esmtp
        self.state = State.GREETED
        if esmtp:
            self._output.append(self._ehlo_reply())
        else:
            self._output.append(f"250 {self.settings.hostname}\r\n".encode())

    def _ehlo(self, argument: str) -> None:
        self._greet(argument, True)

    def _helo(self, argument: str) -> None:
        self._greet(argument, False)

    def _auth_refusal(self) -> bytes:
        needs_tls = self.settings.starttls_available and not self.tls_active
        return replies.STARTTLS_FIRST if needs_tls else replies.AUTH_REQUIRED

    def _mail(self, argument: str) -> None:
        if argument[:5].upper() != "FROM:":
            self._refuse_command("MAIL", replies.MAIL_SYNTAX, bad=True)
            return
        try:
            path, rest = split_path(argument[5:])
        except AddressSyntaxError:
            self._refuse_command("MAIL", replies.MAIL_SYNTAX, bad=True)
            return
        params = parse_parameters(rest)
        if params is None:
            self._refuse_command("MAIL", replies.DUPLICATE_PARAMETER)
            return
        reply = self._check_mail_parameters(params)
        if reply is not None:
            self._refuse_command("MAIL", reply)
            return
        smtputf8 = "SMTPUTF8" in params
        if path:  # the null path <> goes to the driver's policy as ""
            try:
                path = check_mailbox(path, smtputf8=smtputf8)
            except AddressSyntaxError as exc:
                self._refuse_command("MAIL", _sender_refusal(exc))
                return
        self.mail_from = path
        self.mail_parameters = params
        self._mail_given = True
        self._wait(SenderRequest(path, params), State.GREETED)

    def _check_mail_parameters(self, params: dict[str, str | None]) -> bytes | None:
        for key, value in params.items():
            if key == "SIZE":
                # isascii: str.isdigit() also accepts digits int() rejects ("\u00b2")
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    return replies.BAD_PARAMETER
                if int(value) > self.settings.max_message_size:
                    return replies.SIZE_EXCEEDED
            elif key == "BODY":
                if value is None or value.upper() not in _BODY_TYPES:
                    return replies.UNSUPPORTED_PARAMETER
            elif key == "SMTPUTF8":
                if value is not None:
                    return replies.BAD_PARAMETER
            elif key == "AUTH":
                pass  # RFC 4954 section 5: accepted; we use the session's identity
            else:
                return replies.UNSUPPORTED_PARAMETER
        return None

    def _rcpt(self, argument: str) -> None:
        if argument[:3].upper() != "TO:":
            self._refuse_command("RCPT", replies.RCPT_SYNTAX, bad=True)
            return
        try:
            path, rest = split_path(argument[3:])
            if not path:
                raise AddressSyntaxError("empty recipient")
            path = check_mailbox(path, smtputf8="SMTPUTF8" in self.mail_parameters)
        except AddressSyntaxError as exc:
            self._refuse_command("RCPT", _recipient_refusal(exc))
            return
        if rest:
            self._refuse_command("RCPT", replies.UNSUPPORTED_PARAMETER)
            return
        if len(self.recipients) >= self.settings.max_recipients:
            self._refuse_command("RCPT", replies.TOO_MANY_RECIPIENTS)
            return
        self._pending_recipient = path
        self._wait(RecipientRequest(path), self.state)

    def _data(self, argument: str) -> None:
        if argument:
            self._refuse_command("DATA", replies.NO_PARAMETERS)
            return
        if self._bdat_used:
            self._refuse_command("DATA", replies.DATA_AFTER_BDAT)
            return
        self._output.append(replies.START_DATA)
        # The CRLF that ended the DATA line starts the first body line, so one
        # search for CRLF.CRLF also finds the terminator of an empty message.
        self._buffer[0:0] = b"\r\n"
        self._data_scan = 0
        self._dot_lines = False
        self._message_too_big = False
        self.state = State.DATA

    def _read_data(self) -> bool:
        buffer = self._buffer
        # One search finds both the terminator (CRLF "." CRLF) and dot-stuffed
        # lines (CRLF "." anything else), so the body is read once, not twice.
        # Once a dot line is seen the body will be copied to unstuff it anyway:
        # from then on only the terminator is looked for.
        scan = self._data_scan
        end = -1
        while not self._dot_lines:
            end = buffer.find(b"\r\n.", scan)
            if end < 0 or len(buffer) < end + 5:
                break  # no candidate, or too few bytes after it to tell which
            if buffer[end + 3] == 13 and buffer[end + 4] == 10:
                return self._end_data(end)
            self._dot_lines = True
            scan = end + 3
        if self._dot_lines:
            end = buffer.find(b"\r\n.\r\n", scan)
            if end >= 0:
                return self._end_data(end)
        # The content ends at most 2 bytes before the buffer does (a partial
        # terminator ".\r" may follow its CRLF), and may be max + 2 long
        # (the leading CRLF): only then is it sure to be too big, whatever
        # way the input was split.
        limit = self.settings.max_message_size + 4
        if len(buffer) > limit:
            # Too big: keep scanning for the terminator, keep no content (a
            # partial terminator or candidate is within the last 4 bytes).
            self._message_too_big = True
            del buffer[:-4]
            self._data_scan = 0
            return False
        # Next time: from an undecided candidate, or from where one may begin.
        if end >= 0:
            self._data_scan = end
        else:
            self._data_scan = max(scan, len(buffer) - (4 if self._dot_lines else 2))
        return False

    def _end_data(self, end: int) -> bool:
        buffer = self._buffer
        too_big = self._message_too_big or end > self.settings.max_message_size
        # The buffer itself becomes the body (no copy of the megabytes): the
        # rest of the input moves to a new buffer, then the body is trimmed to
        # the content (the leading CRLF that _data added left out).
        self._buffer = bytearray(memoryview(buffer)[end + 5 :])
        self.state = State.RCPT
        if too_big:
            self._refuse_message(replies.SIZE_EXCEEDED)
            return True
        del buffer[end + 2 :]
        # Dot-unstuffing: every line starting with "." loses that dot (4.5.2).
        # The leading CRLF still in front makes the first line one of them.
        if self._dot_lines:
            unstuff(buffer)
        del buffer[:2]
        self._finish_message(buffer)
        return True

    def _refuse_message(self, reply: bytes) -> None:
        self._output.append(reply)
        self._events.append(Refused("DATA", reply))
        self._reset_transaction()
        self.state = State.GREETED

    def _finish_message(self, body: bytes | bytearray) -> None:
        crs = body.count(b"\r")
        if crs != body.count(b"\n") or crs != body.count(b"\r\n"):
            self._refuse_message(replies.BARE_LINE_ENDING)
            return
        self._wait(
            MessageReady(
                self.mail_from,
                list(self.recipients),
                body,
                smtputf8="SMTPUTF8" in self.mail_parameters,
                eight_bit=(self.mail_parameters.get("BODY") or "").upper() == "8BITMIME",
            ),
            State.GREETED,
        )

    def _bdat(self, argument: str) -> None:
        parts = argument.split()
        if (
            not parts
            or len(parts) > 2
            or not (parts[0].isascii() and parts[0].isdigit())
            or len(parts[0]) > 18
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            # Without a valid size the chunk cannot be skipped: hang up.
            self._close(replies.BDAT_SYNTAX, "bad BDAT syntax")
            return
        self._chunk_left = self._chunk_size = int(parts[0])
        self._chunk_last = len(parts) == 2
        refusal: bytes | None = None
        if self.authenticated_user is None:
            # The chunk would have to be read and thrown away (RFC 3030 section 2):
            # a client that never logged in could hold us for gigabytes. Hang up.
            self._close(self._auth_refusal(), "BDAT before login")
            return
        if self.state is not State.RCPT:
            refusal = replies.NO_VALID_RECIPIENTS if self.state is State.MAIL else replies.NEED_MAIL
        elif len(self._message) + self._chunk_left > self.settings.max_message_size:
            # Too big whatever follows: say so and hang up rather than read it all.
            self._close(replies.SIZE_EXCEEDED, "BDAT over the size limit")
            return
        if refusal is None:
            self._bdat_used = True
        self._chunk_refusal = refusal
        self._resume_state = self.state
        self.state = State.BDAT

    def _read_chunk(self) -> bool:
        buffer = self._buffer
        take = min(self._chunk_left, len(buffer))
        if take == 0 and self._chunk_left:
            return False
        if self._chunk_refusal is None:
            self._message += memoryview(buffer)[:take]
        del buffer[:take]
        self._chunk_left -= take
        if self._chunk_left:
            return False
        self.state = self._resume_state
        refusal = self._chunk_refusal
        if refusal is not None:
            self._chunk_refusal = None
            self._output.append(refusal)
            self._events.append(Refused("BDAT", refusal))
            if self.state in _TRANSACTION:
                self._reset_transaction()
                self.state = State.GREETED
            return True
        if not self._chunk_last:
            self._output.append(f"250 2.0.0 {self._chunk_size} octets received\r\n".encode())
            return True
        body = self._message  # handed over, not copied
        self._message = bytearray()
        self._finish_message(body)
        return True

    def _rset(self, argument: str) -> None:
        self._reset_transaction()
        if self.state is not State.CONNECTED:
            self.state = State.GREETED
        self._output.append(replies.RSET_OK)

    def _noop(self, argument: str) -> None:
        self._output.append(replies.NOOP_OK)

    def _quit(self, argument: str) -> None:
        self._close(replies.BYE, "quit")

    def _help(self, argument: str) -> None:
        self._output.append(replies.HELP)

    def _vrfy(self, argument: str) -> None:
        self._output.append(replies.VRFY)

    def _expn(self, argument: str) -> None:
        self._output.append(replies.EXPN)

    def _starttls(self, argument: str) -> None:
        if argument:
            self._refuse_command("STARTTLS", replies.NO_PARAMETERS)
        elif self.tls_active:
            self._refuse_command("STARTTLS", replies.TLS_ALREADY_ACTIVE)
        elif not self.settings.starttls_available:
            self._refuse_command("STARTTLS", replies.TLS_NOT_AVAILABLE)
        else:
            self._output.append(replies.READY_TLS)
            self._buffer.clear()  # anything pipelined after STARTTLS is injection
            self.state = State.TLS_HANDSHAKE
            self._events.append(StartTLS())

    # AUTH

    def _auth(self, argument: str) -> None:
        if self.authenticated_user is not None:
            self._refuse_command("AUTH", replies.ALREADY_AUTHENTICATED)
            return
        if not self.tls_active and not self.settings.auth_without_tls:
            self._refuse_command("AUTH", replies.ENCRYPTION_REQUIRED)
            return
        parts = argument.split(" ")
        if not parts[0] or len(parts) > 2:
            self._refuse_command("AUTH", replies.AUTH_SYNTAX, bad=True)
            return
        name = parts[0].upper()
        if name in TLS_ONLY_MECHANISMS and not self.tls_active:
            self._refuse_command("AUTH", replies.ENCRYPTION_REQUIRED)
            return
        mechanism = (
            sasl.create(name, self.settings.channel_bindings if self.tls_active else ())
            if name in self.settings.auth_mechanisms
            else None
        )
        if mechanism is None:
            self._refuse_command("AUTH", replies.UNKNOWN_MECHANISM)
            return
        initial: bytes | None = None
        if len(parts) == 2:
            if parts[1] == "=":
                initial = b""
            else:
                decoded = self._decode_base64(parts[1])
                if decoded is None:
                    return
                initial = decoded
        self._mechanism = mechanism
        self._sasl_step(mechanism.start(initial))

    def _auth_response(self, raw: bytes) -> None:
        final = self._final_auth_reply
        if final is not None:  # the dummy response after an error challenge, whatever it is
            self._final_auth_reply = None
            self._send_auth_failure(final)
            return
        mechanism = self._mechanism
        assert mechanism is not None
        if raw == b"*":
            self._end_auth(replies.AUTH_CANCELLED)
            return
        decoded = self._decode_base64(raw)
        if decoded is None:
            return
        self._sasl_step(mechanism.respond(decoded))

    def _decode_base64(self, text: str | bytes) -> bytes | None:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._end_auth(replies.BAD_BASE64)
            return None

    def _end_auth(self, reply: bytes) -> None:
        self._mechanism = None
        self.state = State.GREETED
        self._refuse_command("AUTH", reply)

    def _sasl_step(self, step: sasl.Step) -> None:
        mechanism = self._mechanism
        name = mechanism.name if mechanism is not None else ""
        if isinstance(step, sasl.Challenge):
            self._output.append(b"334 " + base64.b64encode(step.data) + b"\r\n")
            self.state = State.AUTH
        elif isinstance(step, sasl.NeedKeys):
            self._wait(KeysRequest(name, step.username), State.AUTH)
        elif isinstance(step, sasl.Credentials | sasl.Verified | sasl.Rejected | sasl.BearerToken):
            self._mechanism = None
            self._wait(AuthRequest(name, step), State.GREETED)
        else:
            self._end_auth(replies.BAD_SASL_MESSAGE)


def _sender_refusal(exc: AddressSyntaxError) -> bytes:
    if exc.non_ascii:
        return replies.NEED_SMTPUTF8
    return replies.SENDER_DOMAIN_TOO_LONG if exc.too_long else replies.BAD_SENDER_SYNTAX


def _recipient_refusal(exc: AddressSyntaxError) -> bytes:
    if exc.non_ascii:
        return replies.NEED_SMTPUTF8
    return replies.RECIPIENT_DOMAIN_TOO_LONG if exc.too_long else replies.BAD_RECIPIENT_SYNTAX


def unstuff(buffer: bytearray) -> None:
    """Remove the dot after every CRLF "." in place (RFC 5321 4.5.2).

    In place, so a large message is never held twice. Each dot line costs a
    step in Python; past one per KiB on average (a hostile message of dot
    lines), the rest is done by one ``replace`` at C speed.
    """
    found = buffer.find(b"\r\n.")
    if found < 0:
        return
    budget = max(64, len(buffer) // 1024)
    view = memoryview(buffer)
    write = found + 2
    read = found + 3
    while True:
        found = buffer.find(b"\r\n.", read)
        if budget <= 0 and found >= 0:
            tail = bytes(view[read:]).replace(b"\r\n.", b"\r\n")
            view[write : write + len(tail)] = tail
            write += len(tail)
            break
        end = len(buffer) if found < 0 else found + 2
        view[write : write + end - read] = view[read:end]
        write += end - read
        if found < 0:
            break
        read = found + 3
        budget -= 1
    view.release()
    del buffer[write:]
